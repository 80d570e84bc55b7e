"""Soak: many consecutive runs of each fast core function in one process; RSS must not grow.

200 iterations each with ``LEAKSEG_SOAK=full``; 30 in CI (short mode). Leaked
tensors, arrays or zarr handles would show up as steady RSS growth.
"""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch

from conftest import soak_iterations

pytestmark = pytest.mark.soak

N = soak_iterations()
#: allowed RSS growth between the warm-up and the end (allocator noise is a few MB)
BOUND_MB = 40


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2 ** 20


def _soak(fn, n=N, warmup=5):
    rng = np.random.default_rng(0)
    for i in range(warmup):
        fn(rng, i)
    start = _rss_mb()
    peak = start
    for i in range(n):
        fn(rng, i)
        if i % 10 == 0:
            peak = max(peak, _rss_mb())
    end = _rss_mb()
    assert end - start < BOUND_MB, f"RSS grew {end - start:.1f} MB over {n} runs (peak {peak - start:.1f})"
    return end - start


def test_soak_normalize():
    from napari_leakseg.core.normalize import check_image, normalize

    def f(rng, i):
        a = rng.random((256, 256)) * (i + 1)
        check_image(a)
        out = normalize(a.astype([np.float32, np.float64, np.uint16][i % 3]))
        assert out.dtype == np.float32

    _soak(f)


def test_soak_tiling():
    from napari_leakseg.core.tiling import predict_tiled

    def f(rng, i):
        img = rng.random((1, 200, 170)).astype(np.float32)
        out = predict_tiled(lambda t: t + 1, img, tile=64, overlap=16)
        assert out.shape == img.shape

    _soak(f)


def test_soak_relabel():
    from napari_leakseg.core.labels import check_labels, compact

    def f(rng, i):
        lab = rng.integers(0, 5000, (256, 256))
        compact(check_labels(lab), keep=3)

    _soak(f)


def test_soak_zarr_round_trip(tmp_path):
    from napari_leakseg.zarr_io import read_zarr, write_ome_zarr

    def f(rng, i):
        a = rng.integers(0, 1000, (2, 32, 40)).astype(np.uint16)
        p = write_ome_zarr(tmp_path / f"s{i % 3}.zarr", a, overwrite=True)
        np.testing.assert_array_equal(np.asarray(read_zarr(p)), a)

    _soak(f, n=max(10, N // 2))


def test_soak_model_forward():
    from napari_leakseg.core.tiling import predict_tiled
    from napari_leakseg.core.unet import UNet, numpy_fn

    torch.manual_seed(0)
    net = UNet(1, 2, base=4, depth=2).eval()
    fn = numpy_fn(net, torch.device("cpu"), multiple=4)

    def f(rng, i):
        img = rng.random((1, 64, 72)).astype(np.float32)
        out = predict_tiled(fn, img, tile=48, overlap=8)
        assert out.shape == (2, 64, 72)

    _soak(f)


def test_soak_store_round_trip(tmp_path):
    from napari_leakseg.core import store
    from napari_leakseg.core.unet import UNet

    net = UNet(1, 1, base=4, depth=2)

    def f(rng, i):
        p = store.save(net, tmp_path / "m.pt", {"capability": "restore"}, overwrite=True)
        sd, meta = store.load(p, capability="restore")
        assert meta["capability"] == "restore"

    _soak(f)


@pytest.mark.gui
def test_soak_layer_round_trip(make_napari_viewer):
    """write_layer updates the same output layer: no growth in layers or memory."""
    from napari_leakseg._napari.layers import read_image, write_layer

    viewer = make_napari_viewer()
    src = viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="img")

    def f(rng, i):
        img = read_image(src, viewer)
        write_layer(viewer, "out", (img.data > 0.5).astype(np.uint8), "labels", source=src)

    _soak(f)
    assert len(viewer.layers) == 2
