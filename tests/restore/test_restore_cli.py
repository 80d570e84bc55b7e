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
    assert y.shape == (96, 96) and y.dtype == np.uint8  # RGB uint8 in: grey uint8 out
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


def test_apply_keeps_input_dtype_unless_asked(files, tmp_path):
    m = tmp_path / "ss.pt"
    assert main(["restore", "train", "--low", str(files / "low.npy"), "--self-supervised", "--method", "lines",
                 "--out", str(m)] + FAST) == 0
    low = np.load(files / "low.npy")
    assert low.dtype == np.uint8
    assert main(["restore", "apply", "--model", str(m), str(files / "low.npy"), "--out", str(tmp_path / "a.tif"),
                 "-q"]) == 0
    a = tifffile.imread(tmp_path / "a.tif")
    assert a.dtype == np.uint8 and a.shape == low.shape and abs(float(a.mean()) - float(low.mean())) < 5
    assert main(["restore", "apply", "--model", str(m), str(files / "low.npy"), "--out", str(tmp_path / "n.tif"),
                 "--output-scale", "normalized", "-q"]) == 0
    n = tifffile.imread(tmp_path / "n.tif")
    assert n.dtype == np.float32 and float(n.max()) < 3


def test_pix2pix_warns_and_writes_risk_map(files, tmp_path, capsys):
    m = tmp_path / "gan.pt"
    assert main(["restore", "train", "--low", str(files / "low.tif"), "--high", str(files / "high.tif"),
                 "--loss", "pix2pix", "--out", str(m)] + FAST) == 0
    assert "can invent particles" in capsys.readouterr().err
    out = tmp_path / "g.tif"
    assert main(["restore", "apply", "--model", str(m), str(files / "low.tif"), "--out", str(out), "-q"]) == 0
    assert "GAN" in capsys.readouterr().err
    assert (tmp_path / "g_risk.tif").exists()  # the risk map is on for GAN models


def test_noise2noise_and_similar_sample(files, tmp_path, capsys):
    low = np.load(files / "low.npy")
    np.save(tmp_path / "b.npy", np.roll(low, 1, axis=1))  # a second scan, drifted by one pixel
    assert main(["restore", "train", "--noise2noise", "--low", str(files / "low.npy"), "--low2",
                 str(tmp_path / "b.npy"), "--out", str(tmp_path / "n2n.pt")] + FAST) == 0
    # a clean image of a similar sample: the degradation is estimated from the low images
    assert main(["restore", "train", "--self-supervised", "--low", str(files / "low.npy"), str(files / "low2.npy"),
                 "--high", str(files / "high.tif"), "--out", str(tmp_path / "sim.pt")] + FAST) == 0
    from napari_leakseg import restore as R

    meta = R.RestoreModel.load(tmp_path / "sim.pt").metadata["train"]
    assert meta["mode"] == "degrade" and meta["degradation"]["gaussian"] > 0
    assert main(["restore", "train", "--low", str(files / "low.npy"), "--low2", str(tmp_path / "b.npy"),
                 "--out", str(tmp_path / "x.pt"), "-q"]) == 2
    assert "--noise2noise" in capsys.readouterr().err
