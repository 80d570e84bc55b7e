"""``leakseg membrane train|predict`` end to end on tiny synthetic files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_leakseg.cli.main import main


def _sample(seed):
    try:
        from napari_leakseg.samples import membranes

        return membranes(shape=(64, 64), n_cells=8, seed=seed)
    except ImportError:  # pragma: no cover
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 255, (64, 64)).astype(np.uint8)
        lab = np.where(img < 60, 1, 2).astype(np.uint8)
        return img, lab


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    (d / "imgs").mkdir()
    (d / "labs").mkdir()
    for s in range(2):
        img, lab = _sample(s)
        tifffile.imwrite(d / "imgs" / f"{s}.tif", img)
        # ISBI-style labels: 0 = membrane, 255 = cell
        tifffile.imwrite(d / "labs" / f"{s}.tif", np.where(lab == 1, 0, 255).astype(np.uint8))
    return d


TRAIN = ["--epochs", "1", "--steps-per-epoch", "3", "--crop", "32", "--batch-size", "2", "--device", "cpu", "-q"]


def test_cli_train_and_predict(files, capsys):
    torch.set_num_threads(1)
    d = files
    model = d / "m.pt"
    assert main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(d / "labs"),
                 "--membrane-value", "0", "--out", str(model), *TRAIN]) == 0
    assert model.exists()
    # refuses to overwrite
    assert main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(d / "labs"),
                 "--membrane-value", "0", "--out", str(model), *TRAIN]) == 2
    assert "exists" in capsys.readouterr().err
    out, prob, cells = d / "o.tif", d / "p.tif", d / "c.tif"
    assert main(["membrane", "predict", "--model", str(model), "--ref-images", str(d / "imgs" / "0.tif"),
                 "--ref-labels", str(d / "labs" / "0.tif"), "--membrane-value", "0",
                 str(d / "imgs" / "1.tif"), "--out", str(out), "--probability", str(prob),
                 "--cells", str(cells), "--device", "cpu", "-q"]) == 0
    m, p, c = tifffile.imread(out), tifffile.imread(prob), tifffile.imread(cells)
    assert m.shape == p.shape == c.shape == (64, 64)
    assert set(np.unique(m)) <= {0, 1} and p.dtype == np.float32 and c.max() >= 1
    # --no-ref-head: the attention alone (the head fitted to the references changes the probability)
    prob2 = d / "p_nohead.tif"
    assert main(["membrane", "predict", "--model", str(model), "--ref-images", str(d / "imgs" / "0.tif"),
                 "--ref-labels", str(d / "labs" / "0.tif"), "--membrane-value", "0", "--no-ref-head",
                 str(d / "imgs" / "1.tif"), "--out", str(d / "o2.tif"), "--probability", str(prob2),
                 "--device", "cpu", "-q"]) == 0
    assert np.abs(tifffile.imread(prob2) - p).mean() > 1e-3
    # saved references (no --ref-*) and several images into a folder
    od = d / "outdir"
    od.mkdir()
    assert main(["membrane", "predict", "--model", str(model), str(d / "imgs" / "0.tif"),
                 str(d / "imgs" / "1.tif"), "--out", str(od), "--device", "cpu", "-q"]) == 0
    assert sorted(f.name for f in od.iterdir()) == sorted(
        f"{s}_{k}.tif" for s in (0, 1) for k in ("membrane", "probability", "cells"))


def test_cli_bad_inputs_are_one_line_errors(files, capsys, tmp_path):
    d = files
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, np.zeros((10, 10), np.uint8))
    # label without membrane (default membrane value 1 on 0/255 labels)
    rc = main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(d / "labs"),
               "--out", str(tmp_path / "x.pt"), *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "no membrane pixels" in err and len(err.strip().splitlines()) == 1
    # shape mismatch
    rc = main(["membrane", "train", "--images", str(d / "imgs" / "0.tif"), "--labels", str(bad),
               "--membrane-value", "0", "--out", str(tmp_path / "x.pt"), *TRAIN])
    assert rc == 2 and "shape" in capsys.readouterr().err
    # count mismatch
    rc = main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(bad),
               "--out", str(tmp_path / "x.pt"), *TRAIN])
    assert rc == 2 and "pair up" in capsys.readouterr().err
    # a model of another capability
    from napari_leakseg.core import store

    other = tmp_path / "other.pt"
    store.save({"w": torch.zeros(1)}, other, {"capability": "scribble"})
    rc = main(["membrane", "predict", "--model", str(other), str(d / "imgs" / "0.tif"),
               "--out", str(tmp_path / "o.tif"), "--device", "cpu", "-q"])
    assert rc == 2 and "not a 'membrane' model" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


def test_cli_binary_mask_labels(files, capsys, tmp_path):
    """0/1 masks with --membrane-value 1 train (0 = not membrane); read with 255 they are refused."""
    torch.set_num_threads(1)
    d = files
    masks = tmp_path / "masks"
    masks.mkdir()
    for f in sorted((d / "labs").iterdir()):
        tifffile.imwrite(masks / f.name, (tifffile.imread(f) == 0).astype(np.uint8))
    rc = main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(masks),
               "--membrane-value", "255", "--out", str(tmp_path / "x.pt"), *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "values found: 0, 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    rc = main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(masks),
               "--membrane-value", "1", "--out", str(tmp_path / "x.pt"), *TRAIN])
    assert rc == 0 and (tmp_path / "x.pt").exists()


def test_apply_runs_a_saved_membrane_model(files, tmp_path):
    """`leakseg apply` (dask, tiled) runs the model with its saved references."""
    torch.set_num_threads(1)
    d = files
    model = tmp_path / "m.pt"
    assert main(["membrane", "train", "--images", str(d / "imgs"), "--labels", str(d / "labs"),
                 "--membrane-value", "0", "--out", str(model), *TRAIN]) == 0
    out = tmp_path / "o.zarr"
    assert main(["apply", "--model", str(model), "--input", str(d / "imgs" / "1.tif"),
                 "--out", str(out), "-q"]) == 0
    from napari_leakseg.core.io import imread

    m = np.asarray(imread(out, lazy=False)).squeeze()
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1}
    # identical to the in-process prediction (same tiles, same references)
    from napari_leakseg import membrane as M

    ref = M.predict_membrane(str(model), tifffile.imread(d / "imgs" / "1.tif"), device="cpu")["membrane"]
    assert (m == ref).mean() > 0.999


def test_cli_several_sets_and_finetune(files, capsys, tmp_path):
    """`train --set` takes stacks with their own membrane values; `finetune` adapts a model in fixed time."""
    torch.set_num_threads(1)
    d = files
    # the second set: bright membranes, a 0/255 membrane mask (membrane value 255)
    (tmp_path / "b_img").mkdir()
    (tmp_path / "b_mem").mkdir()
    for f in sorted((d / "imgs").iterdir()):
        tifffile.imwrite(tmp_path / "b_img" / f.name, 255 - tifffile.imread(f))
        tifffile.imwrite(tmp_path / "b_mem" / f.name,
                         np.where(tifffile.imread(d / "labs" / f.name) == 0, 255, 0).astype(np.uint8))
    model = tmp_path / "m.pt"
    assert main(["membrane", "train", "--set", str(d / "imgs"), str(d / "labs"), "0",
                 "--set", str(tmp_path / "b_img"), str(tmp_path / "b_mem"), "255",
                 "--out", str(model), *TRAIN]) == 0
    from napari_leakseg import membrane as M

    tm = M.load_model(model)
    assert [s["membrane_value"] for s in tm.metadata["sets"]] == [0, 255]
    assert [s["polarity"] < 0 for s in tm.metadata["sets"]] == [True, False]
    # a --set whose labels do not hold its membrane value: one line naming the values found
    rc = main(["membrane", "train", "--set", str(d / "imgs"), str(d / "labs"), "1",
               "--out", str(tmp_path / "y.pt"), *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "values found: 0, 255" in err and len(err.strip().splitlines()) == 1
    rc = main(["membrane", "train", "--set", str(d / "imgs"), str(d / "labs"), "x",
               "--out", str(tmp_path / "y.pt"), *TRAIN])
    assert rc == 2 and "integer" in capsys.readouterr().err
    # fine-tune on one annotated bright-walled slice, then predict with the tuned model (no references)
    tuned = tmp_path / "tuned.pt"
    assert main(["membrane", "finetune", "--model", str(model), "--images", str(tmp_path / "b_img" / "0.tif"),
                 "--labels", str(tmp_path / "b_mem" / "0.tif"), "--membrane-value", "255", "--seconds", "1",
                 "--device", "cpu", "--out", str(tuned), "-q"]) == 0
    meta = M.load_model(tuned).metadata
    assert meta["train"]["fine_tuned"] and meta["input_invert"] is True
    assert main(["membrane", "finetune", "--model", str(model), "--images", str(tmp_path / "b_img" / "0.tif"),
                 "--labels", str(tmp_path / "b_mem" / "0.tif"), "--membrane-value", "255", "--seconds", "1",
                 "--device", "cpu", "--out", str(tuned), "-q"]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "o.tif"
    assert main(["membrane", "predict", "--model", str(tuned), "--no-references", "--scale", "1.5",
                 str(tmp_path / "b_img" / "1.tif"), "--out", str(out), "--device", "cpu", "-q"]) == 0
    assert tifffile.imread(out).shape == (64, 64)
