"""The up-front memory estimate (core.memory) and where it is wired in."""

from __future__ import annotations

import numpy as np
import pytest

from napari_leakseg.core import io, memory
from napari_leakseg.core.errors import LeaksegError, MemoryEstimateError


@pytest.mark.parametrize("text,val", [("1000", 1000), ("4K", 4096), ("1.5M", int(1.5 * 2 ** 20)),
                                      ("2 GiB", 2 * 2 ** 30), ("1t", 2 ** 40)])
def test_parse_bytes(text, val):
    assert memory.parse_bytes(text) == val


@pytest.mark.parametrize("text", ["", "lots", "5X", "G"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        memory.parse_bytes(text)


def test_check_memory_message_names_job_and_suggests_zarr():
    with pytest.raises(MemoryEstimateError) as ei:
        memory.check_memory(10 * 2 ** 30, "membrane prediction", available=2 ** 30)
    msg = str(ei.value)
    assert "membrane prediction" in msg and "10.0 GiB" in msg and "1.0 GiB" in msg
    assert "zarr" in msg and "tiles" in msg
    assert isinstance(ei.value, LeaksegError)
    assert memory.check_memory(100, "x", available=2 ** 30) == 100


def test_env_limit_caps_available(monkeypatch):
    real = memory.available_bytes()
    monkeypatch.setenv(memory.ENV_LIMIT, "1M")
    assert memory.available_bytes() == min(real, 2 ** 20)
    monkeypatch.setenv(memory.ENV_LIMIT, "nonsense")
    assert memory.available_bytes() == real or memory.available_bytes() > 2 ** 20


def test_estimates_do_not_overflow():
    shape = (10 ** 6, 10 ** 6, 10 ** 3)
    assert memory.array_bytes(shape, np.float64) == 8 * 10 ** 15
    assert memory.estimate_job_bytes(shape, np.uint8, float_copies=2) == 10 ** 15 * 9


@pytest.mark.parametrize("ext,arr", [(".npy", np.zeros((7, 9, 3), np.int16)),
                                     (".tif", np.zeros((5, 7, 9), np.uint16)),
                                     (".png", np.zeros((7, 9), np.uint8)),
                                     (".png", np.zeros((7, 9, 4), np.uint8))])
def test_peek_file(tmp_path, ext, arr):
    p = io.imwrite(tmp_path / f"a{ext}", arr, kind="image")
    shape, dtype = memory.peek_file(p)
    assert shape == arr.shape and dtype == arr.dtype


def test_peek_file_never_raises(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    assert memory.peek_file(tmp_path / "bad.tif") is None
    assert memory.peek_file(tmp_path / "bad.npy") is None
    assert memory.peek_file(tmp_path / "missing.png") is None


def test_imread_refuses_header_far_beyond_memory(tmp_path):
    p = tmp_path / "huge.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f8", "fortran_order": False,
                                                 "shape": (10 ** 6, 10 ** 6)})
    with pytest.raises(MemoryEstimateError, match="zarr"):
        io.imread(p, lazy=False)
    # memory-mapped reads are lazy: not refused by the estimate (numpy reports the short file)
    with pytest.raises(LeaksegError):
        io.imread(p, mmap=True)


def test_imread_zarr_lazy_ok_eager_refused(tmp_path, monkeypatch):
    from napari_leakseg.zarr_io import write_ome_zarr

    p = write_ome_zarr(tmp_path / "a.zarr", np.zeros((300, 300), np.uint32))
    monkeypatch.setenv(memory.ENV_LIMIT, "100K")
    lazy = io.imread(p)  # lazy: fine
    assert lazy.shape == (300, 300)
    with pytest.raises(MemoryEstimateError, match="zarr"):
        io.imread(p, lazy=False)


@pytest.mark.gui
def test_read_image_layer_refused_before_loading(make_napari_viewer, monkeypatch):
    import dask.array as da

    from napari_leakseg._napari.layers import read_image

    viewer = make_napari_viewer()
    # a 128 GB lazy stack: napari shows one 64 MB plane; reading the whole stack must be refused
    big = da.zeros((2000, 4000, 4000), dtype=np.float32, chunks=(1, 4000, 4000))
    layer = viewer.add_image(big, name="huge", contrast_limits=(0, 1))
    with pytest.raises(MemoryEstimateError, match="huge"):
        read_image(layer, viewer, current_slice=False)
    monkeypatch.setenv(memory.ENV_LIMIT, "1M")
    with pytest.raises(MemoryEstimateError, match="zarr"):
        read_image(layer, viewer)  # even one plane is too much under a 1 MB limit
    monkeypatch.delenv(memory.ENV_LIMIT)
    small = viewer.add_image(np.ones((32, 32), np.float32), name="small")
    assert read_image(small, viewer).data.shape == (32, 32)
