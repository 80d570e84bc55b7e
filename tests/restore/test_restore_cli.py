"""``leakseg restore train/apply`` end to end on tiny synthetic SEM images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_leakseg.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from napari_leakseg.samples import sem_particles

    d = tmp_path_factory.mktemp("sem")
    clean, low, _ = sem_particles((96, 96), seed=5)
    tifffile.imwrite(d / "low.tif", np.stack([low] * 3, -1))  # RGB with equal channels, like real SEM files
    tifffile.imwrite(d / "high.tif", clean)
    np.save(d / "low.npy", low)
    np.save(d / "low2.npy", low[::-1].copy())
    return d


FAST = ["--steps", "6", "--crop", "32", "--batch-size", "2", "-q", "--device", "cpu"]


def test_train_apply_paired_with_risk(files, capsys):
    m = files / "paired.pt"
    assert main(["restore", "train", "--low", str(files / "low.tif"), "--high", str(files / "high.tif"),
                 "--out", str(m)] + FAST) == 0
    out = files / "restored.tif"
    assert main(["restore", "apply", "--model", str(m), str(files / "low.tif"), "--out", str(out),
                 "--risk-map", "-q"]) == 0
    y = tifffile.imread(out)
    r = tifffile.imread(files / "restored_risk.tif")
    assert y.shape == (96, 96) and y.dtype == np.float32 and np.isfinite(y).all()
    assert r.shape == (96, 96) and (r >= 0).all()
    # refuses to overwrite
    assert main(["restore", "apply", "--model", str(m), str(files / "low.tif"), "--out", str(out), "-q"]) == 2
    assert "exists" in capsys.readouterr().err


def test_train_degrade_selfsup_and_loss(files):
    for extra, name in ((["--high", str(files / "high.tif"), "--degrade", "noise=0.1,blur=1", "--loss", "mse"],
                         "deg.pt"),
                        (["--high", str(files / "high.tif"), "--estimate-from", str(files / "low.npy")], "est.pt"),
                        (["--low", str(files / "low.npy"), "--self-supervised", "--loss", "l1"], "ss.pt")):
        assert main(["restore", "train", "--out", str(files / name)] + extra + FAST) == 0
        assert (files / name).exists()
    outdir = files / "many"
    outdir.mkdir()
    assert main(["restore", "apply", "--model", str(files / "ss.pt"), str(files / "low.tif"),
                 str(files / "low2.npy"), "--out", str(outdir), "-q"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["low2_restored.tif", "low_restored.tif"]
    assert main(["restore", "apply", "--model", str(files / "ss.pt"), str(files / "low.tif"),
                 str(files / "low.npy"), "--out", str(outdir), "-q"]) == 2


def test_cli_errors(files, capsys):
    bad = [
        (["restore", "train", "--low", str(files / "low.tif"), "--out", str(files / "x.pt")], "give --low and --high"),
        (["restore", "train", "--high", str(files / "high.tif"), "--degrade", "fuzz=1",
          "--out", str(files / "x.pt")], "unknown degradation"),
        (["restore", "train", "--low", str(files / "low.tif"), "--high", str(files / "missing.tif"),
          "--out", str(files / "x.pt")], "does not exist"),
        (["restore", "apply", "--model", str(files / "nomodel.pt"), str(files / "low.tif"),
          "--out", str(files / "y.tif")], "does not exist"),
        (["restore", "train", "--low", str(files / "low.tif"), "--high", str(files / "high.tif"),
          "--out", str(files / "x.tif")], "must end in .pt"),
    ]
    for argv, msg in bad:
        assert main(argv + (["-q"] if argv[1] == "train" else [])) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    # shapes differ
    tifffile.imwrite(files / "small.tif", np.zeros((50, 60), np.uint8) + np.arange(60, dtype=np.uint8))
    assert main(["restore", "train", "--low", str(files / "low.tif"), "--high", str(files / "small.tif"),
                 "--out", str(files / "x.pt")] + FAST) == 2
    assert "different shapes" in capsys.readouterr().err
