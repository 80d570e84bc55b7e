"""OME-Zarr writer/reader: bit-identical round trips, metadata, atomic writes, bad stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_leakseg import __version__
from napari_leakseg.core.errors import InputError, OutputExistsError
from napari_leakseg.zarr_io import (
    PROVENANCE_KEY, finish_store, create_level0, open_ome_zarr, read_zarr, stage_store,
    write_ome_zarr,
)

LABEL_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64]


def _roundtrip(tmp_path, data, **kw):
    p = write_ome_zarr(tmp_path / "x.zarr", data, **kw)
    return open_ome_zarr(p)


def test_labels_roundtrip_bit_identical_keeps_scale_axes_provenance(tmp_path):
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 70000, (3, 130, 90)).astype(np.uint32)
    items = _roundtrip(tmp_path, lab, name="cells", axes="tyx", scale=(2.0, 0.25, 0.5),
                       translate=(0, 10, 5),
                       provenance={"capability": "propagate", "params": {"k": np.int64(3)},
                                   "source_layer": "cells"},
                       properties=[{"label-value": 5, "class": "nucleus"}])
    assert len(items) == 1
    arr, meta, kind = items[0]
    assert kind == "labels" and isinstance(arr, da.Array)
    out = arr.compute()
    assert out.dtype == lab.dtype and np.array_equal(out, lab)
    assert meta["name"] == "cells"
    assert meta["scale"] == [2.0, 0.25, 0.5]
    assert meta["translate"] == [0.0, 10.0, 5.0]
    assert meta["metadata"]["axes"] == ["t", "y", "x"]
    prov = meta["metadata"][PROVENANCE_KEY]
    assert prov["capability"] == "propagate" and prov["params"] == {"k": 3}
    assert prov["source_layer"] == "cells" and prov["version"] == __version__ and prov["date"]
    assert meta["features"] == {"index": [5], "class": ["nucleus"]}
    il = meta["metadata"]["image-label"]
    assert il["properties"][0]["label-value"] == 5 and il["colors"]


def test_layout_is_ngff_chunked_compressed(tmp_path):
    lab = np.zeros((2, 700, 600), np.uint16)
    lab[:, 100:200, 50:400] = 7
    p = write_ome_zarr(tmp_path / "x.zarr", lab, name="seg")
    root = zarr.open_group(str(p), mode="r")
    assert root["labels"].attrs["labels"] == ["seg"]
    g = root["labels/seg"]
    ms = g.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["space"] * 3
    meta = json.loads((p / "labels" / "seg" / ms["datasets"][0]["path"] / ".zarray").read_text())
    assert meta["chunks"] == [1, 512, 512]
    assert meta["compressor"] is not None
    nbytes = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert nbytes < lab.nbytes / 20  # compressed
    # ome-zarr-py (the reference implementation) reads it as a label image
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(p / "labels" / "seg")))())
    assert nodes and np.array_equal(np.asarray(nodes[0].data[0]), lab)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ndim=st.integers(2, 4), dtype=st.sampled_from(LABEL_DTYPES), seed=st.integers(0, 2**16),
       data=st.data())
def test_hypothesis_labels_roundtrip(tmp_path_factory, ndim, dtype, seed, data):
    shape = tuple(data.draw(st.integers(1, 9 if i < ndim - 2 else 70)) for i in range(ndim))
    scale = tuple(data.draw(st.floats(0.01, 100, allow_nan=False)) for _ in range(ndim))
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    lab = rng.integers(max(info.min, -2**62), min(info.max, 2**62), shape, dtype=np.int64 if info.min < 0 else np.uint64,
                       endpoint=True).astype(dtype)
    lazy = data.draw(st.booleans())
    tmp = tmp_path_factory.mktemp("h")
    src = da.from_array(lab, chunks=tuple(max(1, s // 2) for s in shape)) if lazy else lab
    arr, meta, kind = _roundtrip(tmp, src, scale=scale, chunks=tuple(max(1, s // 3) for s in shape))[0]
    out = arr.compute()
    assert kind == "labels" and out.dtype == lab.dtype and out.shape == lab.shape
    assert np.array_equal(out, lab)
    assert meta["scale"] == [float(s) for s in scale]
    assert len(meta["metadata"]["axes"]) == ndim


def test_image_roundtrip_and_pyramid(tmp_path):
    img = np.random.default_rng(0).random((300, 260)).astype(np.float32)
    p = write_ome_zarr(tmp_path / "i.zarr", img, kind="image", scale=(0.5, 0.5), n_levels=3)
    (arr, meta, kind), = open_ome_zarr(p)
    assert kind == "image" and np.array_equal(arr.compute(), img)
    (levels, meta, _), = open_ome_zarr(p, multiscale=True)
    assert meta["multiscale"] and [l.shape for l in levels] == [(300, 260), (150, 130), (75, 65)]


def test_extra_labels_and_image_with_labels(tmp_path):
    img = np.arange(4 * 50 * 60, dtype=np.uint16).reshape(4, 50, 60)
    lab = (img % 5).astype(np.uint8)
    status = np.array([1, 2, 2, 3], np.uint8)[:, None, None]  # one value per frame
    p = write_ome_zarr(tmp_path / "s.zarr", lab, axes="tyx", name="tracks",
                       extra_labels={"frame_status": (status, {"axes": "tyx"})})
    items = {m["name"]: (a, m, k) for a, m, k in open_ome_zarr(p)}
    assert set(items) == {"tracks", "frame_status"}
    assert np.array_equal(items["frame_status"][0].compute(), status)
    assert read_zarr(p).shape == lab.shape


def test_refuses_existing_and_overwrite_replaces(tmp_path):
    p = write_ome_zarr(tmp_path / "x.zarr", np.ones((8, 8), np.uint8))
    with pytest.raises(OutputExistsError, match="exists"):
        write_ome_zarr(p, np.zeros((8, 8), np.uint8))
    assert read_zarr(p).compute().max() == 1
    write_ome_zarr(p, np.full((8, 8), 2, np.uint8), overwrite=True)
    assert read_zarr(p).compute().max() == 2
    assert [x.name for x in tmp_path.iterdir()] == ["x.zarr"]  # no leftovers
    with pytest.raises(OutputExistsError, match="does not exist"):
        write_ome_zarr(tmp_path / "nope" / "y.zarr", np.ones((8, 8), np.uint8))


def test_fractional_float_labels_are_refused(tmp_path):
    with pytest.raises(InputError, match="fractional"):
        write_ome_zarr(tmp_path / "x.zarr", np.full((4, 4), 0.5))
    assert not (tmp_path / "x.zarr").exists()
    p = write_ome_zarr(tmp_path / "y.zarr", np.full((4, 4), 3.0))  # whole numbers are fine
    assert read_zarr(p).compute().max() == 3


def test_failed_export_leaves_no_store(tmp_path):
    """A write that fails half-way (here: a block raising) leaves neither the final name
    nor a temporary directory."""
    def boom(b):
        if b.sum() > 0:
            raise RuntimeError("disk full")
        return b

    lazy = da.zeros((4, 64, 64), np.uint8, chunks=(1, 64, 64))
    lazy = da.concatenate([lazy, da.ones((1, 64, 64), np.uint8, chunks=(1, 64, 64))]).map_blocks(boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_ome_zarr(tmp_path / "x.zarr", lazy, colors=[])
    assert list(tmp_path.iterdir()) == []


def test_killed_export_never_looks_complete(tmp_path):
    """Kill the writing process mid-export: the final name never appears."""
    code = (
        "import os, numpy as np, dask.array as da\n"
        "from napari_leakseg.zarr_io import write_ome_zarr\n"
        "def die(b, block_info=None):\n"
        "    if block_info[0]['chunk-location'][0] == 3: os._exit(9)\n"
        "    return b\n"
        "x = da.ones((6, 64, 64), np.uint8, chunks=(1, 64, 64)).map_blocks(die, dtype=np.uint8)\n"
        f"write_ome_zarr({str(tmp_path / 'x.zarr')!r}, x, colors=[])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 9
    assert not (tmp_path / "x.zarr").exists()
    leftovers = [x.name for x in tmp_path.iterdir()]
    assert all(n.startswith(".x.zarr.partial-") for n in leftovers)  # hidden, clearly partial


def test_staged_store_only_appears_when_finished(tmp_path):
    final = tmp_path / "o.zarr"
    tmp = stage_store(final)
    arr = create_level0(tmp, (2, 40, 50), np.uint16, name="pred", chunks=(1, 16, 16))
    arr[:] = 3
    assert not final.exists()
    finish_store(tmp, final, name="pred", axes="zyx", scale=(3, 1, 1), provenance={"capability": "x"})
    assert not tmp.exists()
    (a, meta, kind), = open_ome_zarr(final)
    assert kind == "labels" and a.compute().min() == 3 and meta["scale"] == [3.0, 1.0, 1.0]


@pytest.mark.parametrize("make, msg", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "not a readable zarr|holds no"),
    (lambda p: (p.mkdir(), (p / ".zgroup").write_text("{not json")), "not a readable zarr|corrupt"),
])
def test_missing_or_corrupt_store(tmp_path, make, msg):
    p = tmp_path / "bad.zarr"
    make(p)
    with pytest.raises(InputError, match=msg):
        open_ome_zarr(p)


def test_corrupt_multiscales_metadata(tmp_path):
    p = write_ome_zarr(tmp_path / "x.zarr", np.ones((8, 8), np.uint8), name="l")
    g = zarr.open_group(str(p / "labels" / "l"), mode="r+")
    g.attrs["multiscales"] = [{"datasets": [{"path": "missing"}]}]
    with pytest.raises(InputError, match="corrupt"):
        open_ome_zarr(p)


def test_reads_ngff_label_store_written_by_ome_zarr(tmp_path):
    """Another tool's store: image + labels written by ome-zarr-py's default (NGFF 0.5 / zarr v3)."""
    from ome_zarr.writer import write_image, write_labels

    img = np.random.default_rng(0).integers(0, 255, (2, 64, 80)).astype(np.uint8)
    lab = (img > 128).astype(np.uint16)
    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="w")
    write_image(img, root, axes="zyx", scale_factors=[])
    write_labels(lab, root, name="mask", axes="zyx", scaler=None, scale_factors=[])
    items = {k: (a, m) for a, m, k in open_ome_zarr(tmp_path / "o.zarr")}
    assert np.array_equal(items["image"][0].compute(), img)
    assert np.array_equal(items["labels"][0].compute(), lab)
    assert items["labels"][1]["name"] == "mask"


def test_zarr_io_and_distributed_do_not_import_napari_or_qt():
    code = ("import sys, napari_leakseg.zarr_io, napari_leakseg.distributed, napari_leakseg.cli.apply, "
            "napari_leakseg.cli.export; "
            "bad = [m for m in ('napari', 'qtpy', 'PyQt5') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
