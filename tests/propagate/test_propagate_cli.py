"""``leakseg propagate`` end to end on a tiny synthetic time-lapse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_leakseg.cli.main import main

FAST = ["--init-steps", "25", "--steps", "1", "--downsample", "1", "--device", "cpu", "-q"]


def _data(tmp_path, T=5):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:40, :40]
    stack = np.zeros((T, 40, 40), np.uint8)
    lab = np.zeros((T, 40, 40), np.uint8)
    for t in range(T):
        img = 60 + rng.normal(0, 5, (40, 40))
        for cy, cx in [(12 + t, 12), (28, 28 - t)]:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            img[m] += 120
            if t == 0:
                lab[t][m] = 1
        stack[t] = np.clip(img, 0, 255)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    tifffile.imwrite(tmp_path / "labels.tif", lab)
    return stack, lab


def test_cli_tif_and_sidecar(tmp_path, capsys):
    stack, lab = _data(tmp_path)
    out = tmp_path / "out.tif"
    rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
               "--out", str(out), *FAST])
    assert rc == 0
    res = tifffile.imread(out)
    assert res.shape == stack.shape
    np.testing.assert_array_equal(res[0], lab[0])
    assert res[1:].any()
    side = json.loads((tmp_path / "out.tif.json").read_text())
    assert side["frame_status"] == ["annotated"] + ["pseudo"] * 4
    # refuses to overwrite
    rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
               "--out", str(out), *FAST])
    assert rc == 2 and "exists" in capsys.readouterr().err


def test_cli_zarr_status_instances_ctc(tmp_path):
    import zarr

    from napari_leakseg.zarr_io import open_ome_zarr

    _data(tmp_path)
    # a lazy zarr input stack
    from napari_leakseg.zarr_io import write_ome_zarr

    write_ome_zarr(tmp_path / "stack.zarr", tifffile.imread(tmp_path / "stack.tif"), kind="image",
                   axes="tyx")
    out = tmp_path / "out.zarr"
    rc = main(["propagate", str(tmp_path / "stack.zarr"), "--labels", str(tmp_path / "labels.tif"),
               "--frames", "0", "--instances", "--ctc-dir", str(tmp_path / "RES"), "--tau", "0.8",
               "--out", str(out), "--confidence", str(tmp_path / "conf.tif"), *FAST])
    assert rc == 0
    prov = zarr.open_group(str(out), mode="r").attrs["napari_leakseg"]
    assert prov["capability"] == "propagate"
    assert prov["frame_status"] == ["annotated"] + ["pseudo"] * 4
    assert prov["params"]["tau"] == 0.8
    layers = open_ome_zarr(out)
    arr = np.asarray(layers[-1][0])
    assert arr.shape == (5, 40, 40) and set(np.unique(arr[0])) == {0, 1, 2}
    assert (tmp_path / "RES" / "res_track.txt").read_text().strip()
    assert (tmp_path / "RES" / "mask004.tif").exists()
    assert tifffile.imread(tmp_path / "conf.tif").shape == (5, 40, 40)


@pytest.mark.parametrize("extra, msg", [
    (["--frames", "3"], "only one class"),
    (["--tau", "2"], "tau must be"),
])
def test_cli_errors(tmp_path, capsys, extra, msg):
    _data(tmp_path)
    rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
               "--out", str(tmp_path / "o.tif"), *extra, *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.tif").exists()


def test_cli_shape_mismatch(tmp_path, capsys):
    _data(tmp_path)
    tifffile.imwrite(tmp_path / "short.tif", np.zeros((3, 40, 40), np.uint8))
    rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "short.tif"),
               "--out", str(tmp_path / "o.tif"), *FAST])
    assert rc == 2 and "3 frames but the image stack has 5" in capsys.readouterr().err


def test_cli_follows_the_annotated_cells_unless_no_follow(tmp_path):
    stack, lab = _data(tmp_path)
    yy, xx = np.mgrid[:40, :40]
    one = np.where(lab[0] * ((yy - 12) ** 2 + (xx - 12) ** 2 < 36), 1, 0).astype(np.uint8)  # only the first cell
    tifffile.imwrite(tmp_path / "one.tif", np.stack([one] + [np.zeros_like(one)] * (len(lab) - 1)))
    outs = {}
    for name, extra in (("follow", []), ("free", ["--no-follow"])):
        outs[name] = tmp_path / f"{name}.tif"
        rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "one.tif"), "--instances",
                   "--out", str(outs[name]), *extra, *FAST])
        assert rc == 0
    follow, free = tifffile.imread(outs["follow"]), tifffile.imread(outs["free"])
    for t in range(1, len(lab)):
        other = (yy - 28) ** 2 + (xx - (28 - t)) ** 2 < 20  # the cell nobody labelled
        first = (yy - (12 + t)) ** 2 + (xx - 12) ** 2 < 20
        assert free[t][other].mean() > 0.8 and follow[t][other].mean() == 0
        assert follow[t][first].mean() > 0.8
    assert json.loads((tmp_path / "free.tif.json").read_text())["params"]["follow"] is False


def test_cli_tta_on_by_default_and_off_with_no_tta(tmp_path):
    stack, lab = _data(tmp_path)
    outs = {}
    for name, extra in (("tta", []), ("plain", ["--no-tta"])):
        outs[name] = tmp_path / f"{name}.tif"
        rc = main(["propagate", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
                   "--out", str(outs[name]), *extra, *FAST])
        assert rc == 0
    assert json.loads((tmp_path / "tta.tif.json").read_text())["params"]["tta"] is True
    assert json.loads((tmp_path / "plain.tif.json").read_text())["params"]["tta"] is False
