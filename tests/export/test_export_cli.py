"""``leakseg export``: any label/image file → OME-Zarr, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_leakseg.cli.main import main
from napari_leakseg.core import io
from napari_leakseg.zarr_io import open_ome_zarr


@pytest.mark.parametrize("ext", [".tif", ".npy", ".png", ".zarr"])
def test_export_any_label_file_bit_identical(tmp_path, ext):
    lab = np.zeros((40, 50), np.uint16)
    lab[5:20, 5:30] = 3
    lab[25:35, 10:45] = 999
    src = io.imwrite(tmp_path / f"in{ext}", lab)
    out = tmp_path / "out.zarr"
    assert main(["export", str(src), "--out", str(out), "--scale", "0.5,0.25", "-q"]) == 0
    (arr, meta, kind), = open_ome_zarr(out)
    assert kind == "labels" and np.array_equal(arr.compute(), lab) and arr.dtype == lab.dtype
    assert meta["scale"] == [0.5, 0.25] and meta["name"] == ("labels" if ext == ".zarr" else "in")
    prov = meta["metadata"]["napari_leakseg"]
    assert prov["operation"] == "leakseg export" and prov["source"].endswith(f"in{ext}")


def test_export_stack_image_and_axes(tmp_path):
    img = np.random.default_rng(0).random((3, 30, 20)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", img)
    out = tmp_path / "s.zarr"
    assert main(["export", str(tmp_path / "s.tif"), "--out", str(out), "--kind", "image",
                 "--axes", "tyx", "--chunks", "1,16,16", "--name", "movie", "-q"]) == 0
    (arr, meta, kind), = open_ome_zarr(out)
    assert kind == "image" and np.array_equal(arr.compute(), img)
    assert meta["metadata"]["axes"] == ["t", "y", "x"] and meta["name"] == "movie"
    assert arr.chunksize == (1, 16, 16)


def test_export_errors(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.full((4, 4), 0.5))
    assert main(["export", str(tmp_path / "f.npy"), "--out", str(tmp_path / "f.zarr")]) == 2
    assert "--kind image" in capsys.readouterr().err
    assert not (tmp_path / "f.zarr").exists()
    np.save(tmp_path / "l.npy", np.ones((4, 4), np.uint8))
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "l.zarr"), "-q"]) == 0
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "l.zarr")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "l.zarr"), "--overwrite", "-q"]) == 0
    assert main(["export", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "m.zarr")]) == 2
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "x.zarr"), "--scale", "1,a"]) == 2
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "x.zarr"), "--scale", "1,2,3"]) == 2
    assert main(["export", str(tmp_path / "l.npy"), "--out", str(tmp_path / "x.tif")]) == 2
    err = capsys.readouterr().err
    assert "scale" in err and ".zarr" in err
