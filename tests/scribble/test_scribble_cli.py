"""``leakseg segment`` end to end on small synthetic files."""

import numpy as np
import pytest

from napari_leakseg.cli.main import main


def _image():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 48, 3), np.uint8)
    img[:, :24] = (220, 40, 40)
    img[:, 24:] = (40, 40, 220)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _two_class_files(tmp_path):
    """The red/blue image and one stroke per half, saved as img.npy and scr.npy in ``tmp_path``."""
    img = _image()
    scr = np.zeros(img.shape[:2], np.uint8)
    scr[20, 4:20] = 1
    scr[20, 28:44] = 2
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "scr.npy", scr)
    return img, scr


def _refused(tmp_path, capsys, options, needle):
    """`leakseg segment` on the files of _two_class_files with ``options``: exit 2, one stderr line
    containing ``needle``, no output written."""
    rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), *options,
               "--out", str(tmp_path / "x.npy")])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.npy").exists()


def test_cli_scribbles_255_convention_and_model(tmp_path, capsys):
    from napari_leakseg.core import io, store

    img = _image()
    scr = np.full(img.shape[:2], 255, np.uint8)
    scr[20, 4:20] = 0    # class 0 (e.g. VOC background) on the red half
    scr[20, 28:44] = 15  # class 15 on the blue half
    io.imwrite(tmp_path / "img.png", img, kind="image")
    io.imwrite(tmp_path / "scr.png", scr)
    out = tmp_path / "seg.tif"
    rc = main(["segment", str(tmp_path / "img.png"), "--scribbles", str(tmp_path / "scr.png"),
               "--unlabeled-value", "255", "--max-iter", "30", "--device", "cpu", "-q",
               "--classes-only", "--save-model", str(tmp_path / "m.pt"), "--out", str(out)])
    assert rc == 0
    lab = io.imread(out)
    assert lab.shape == img.shape[:2]
    assert set(np.unique(lab)) <= {0, 15}  # the file's own class values come back
    assert (lab[:, :20] == 0).mean() > 0.9 and (lab[:, 28:] == 15).mean() > 0.9
    sd, meta = store.load(tmp_path / "m.pt", capability="scribble")
    assert meta["arch"]["in_channels"] >= 3
    # refusing to overwrite
    rc = main(["segment", str(tmp_path / "img.png"), "--max-iter", "2", "--out", str(out)])
    assert rc == 2
    assert "exists" in capsys.readouterr().err


def test_cli_unsupervised_npy_and_errors(tmp_path, capsys):
    img = _image()
    np.save(tmp_path / "img.npy", img)
    out = tmp_path / "seg.npy"
    rc = main(
        ["segment", str(tmp_path / "img.npy"), "--segments", "3", "--max-iter", "20", "--seed", "1",
         "-q", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    lab = np.load(out)
    assert lab.shape == img.shape[:2] and 1 <= len(np.unique(lab)) <= 3
    np.save(tmp_path / "bad.npy", np.zeros((5, 5), np.uint8))
    rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "bad.npy"),
               "--out", str(tmp_path / "x.npy")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # --max-iter and --time-budget are exclusive
        main(["segment", "a.png", "--max-iter", "3", "--time-budget", "2", "--out", "b.png"])


def test_cli_merge_option(tmp_path, capsys):
    """--merge 0 gives the unmerged result of the Python API; a negative distance is a one-line error."""
    from napari_leakseg.scribble import segment

    img = _image()
    np.save(tmp_path / "img.npy", img)
    out = tmp_path / "seg.npy"
    rc = main(["segment", str(tmp_path / "img.npy"), "--merge", "0", "--max-iter", "20", "-q", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    np.testing.assert_array_equal(np.load(out), segment(img, max_iter=20, device="cpu", merge=0).labels)
    rc = main(["segment", str(tmp_path / "img.npy"), "--merge", "-1", "--out", str(tmp_path / "x.npy")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "merge must be" in err and err.count("\n") == 1
    assert not (tmp_path / "x.npy").exists()


def test_cli_edge_smoothing_option(tmp_path, capsys):
    """--edge-smoothing 0 gives the Python API's result without the guided filter (and a model without
    it); a negative radius is a one-line error that writes nothing."""
    from napari_leakseg.core import store
    from napari_leakseg.scribble import segment

    img, scr = _two_class_files(tmp_path)
    out = tmp_path / "seg.npy"
    rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), "--classes-only",
               "--edge-smoothing", "0", "--max-iter", "20", "-q", "--device", "cpu", "--out", str(out),
               "--save-model", str(tmp_path / "m.pt")])
    assert rc == 0
    want = segment(img, scr, classes_only=True, max_iter=20, device="cpu", guide_r=0).labels
    np.testing.assert_array_equal(np.load(out), want)
    sd, meta = store.load(tmp_path / "m.pt", capability="scribble")
    assert "guide" not in sd and "guide_r" not in meta["arch"]
    # a warm start keeps the saved model's smoothing: asking for another one is a clear error
    rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), "--classes-only",
               "--warm-start", str(tmp_path / "m.pt"), "--edge-smoothing", "8", "--out", str(tmp_path / "w.npy")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "edge smoothing 8" in err and "trained with 0" in err and err.count("\n") == 1
    assert not (tmp_path / "w.npy").exists()
    rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), "--classes-only",
               "--warm-start", str(tmp_path / "m.pt"), "--max-iter", "5", "-q", "--device", "cpu",
               "--out", str(tmp_path / "w.npy")])
    assert rc == 0
    _refused(tmp_path, capsys, ["--edge-smoothing", "-1"], "edge smoothing")


def test_cli_sharpen_option(tmp_path, capsys):
    """--sharpen 0 gives the Python API's result without the final sharpening round, --sharpen N runs N
    more iterations; a negative count is a one-line error that writes nothing."""
    from napari_leakseg.scribble import segment

    img, scr = _two_class_files(tmp_path)
    for n in (0, 5):
        out = tmp_path / f"seg{n}.npy"
        rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), "--classes-only",
                   "--sharpen", str(n), "--max-iter", "20", "-q", "--device", "cpu", "--out", str(out)])
        assert rc == 0
        want = segment(img, scr, classes_only=True, max_iter=20, device="cpu", sharpen_iter=n)
        np.testing.assert_array_equal(np.load(out), want.labels)
        assert sum(h.get("stage") == "sharpen" for h in want.history) == n
    _refused(tmp_path, capsys, ["--sharpen", "-1"], "sharpening (sharpen_iter) must be")


def test_cli_colour_option(tmp_path, capsys):
    """--colour rgb / lab give the Python API's result with that filter bank, and the saved model records
    it (lab is the default for RGB images); an unknown colour space is a one-line error."""
    from napari_leakseg.core import store
    from napari_leakseg.scribble import segment

    img, scr = _two_class_files(tmp_path)
    for colour in ("rgb", "lab", None):
        out, model = tmp_path / f"seg{colour}.npy", tmp_path / f"m{colour}.pt"
        rc = main(["segment", str(tmp_path / "img.npy"), "--scribbles", str(tmp_path / "scr.npy"), "--classes-only",
                   *(["--colour", colour] if colour else []), "--max-iter", "20", "-q", "--device", "cpu",
                   "--out", str(out), "--save-model", str(model)])
        assert rc == 0
        want = segment(img, scr, classes_only=True, max_iter=20, device="cpu", colour=colour)
        np.testing.assert_array_equal(np.load(out), want.labels)
        assert store.load(model, capability="scribble")[1]["arch"].get("colour", "rgb") == (colour or "lab")
    _refused(tmp_path, capsys, ["--classes-only", "--colour", "hsv"], "colour must be 'lab'")
