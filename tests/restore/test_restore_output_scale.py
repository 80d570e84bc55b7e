"""Restored images on the input's intensity scale and dtype (issue 17, part 3)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_leakseg import restore as R
from napari_leakseg.core.errors import InputError
from napari_leakseg.core.normalize import normalize

DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def model_and_data():
    from napari_leakseg.samples import sem_particles

    clean, low, _ = sem_particles((96, 96), seed=4)
    m = R.train(low=[low], high=[clean], steps=20, batch_size=2, crop=64, base=8, depth=2, seed=0,
                device=DEVICE, val_every=10, preview=False, lr=5e-3)
    return m, clean, low


def test_input_scale_fit_recovers_gain_and_offset():
    rng = np.random.default_rng(0)
    clean = ndi_particles()
    image = 40.0 + 180.0 * clean + rng.normal(0, 12, clean.shape)  # noisy, in "detector units"
    g, o = R.input_scale_fit(clean, image)
    assert abs(g - 180) < 6 and abs(o - 40) < 3, (g, o)


def ndi_particles():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(1)
    x = np.zeros((128, 128), np.float32)
    x[rng.integers(8, 120, 40), rng.integers(8, 120, 40)] = 1
    x = ndi.gaussian_filter(x, 2.0)
    return x / x.max()


def test_uint8_in_uint8_out(model_and_data):
    m, clean, low = model_and_data
    assert low.dtype == np.uint8
    y = R.restore_image(m, low)
    assert y.dtype == np.uint8 and y.shape == low.shape
    # on the input's scale: the same mean brightness and a similar range, unlike the 0-1 output
    assert abs(float(y.mean()) - float(low.mean())) < 3, (y.mean(), low.mean())
    n = R.restore_image(m, low, output="normalized")
    assert n.dtype == np.float32 and float(n.max()) < 2 and float(y.max()) > 100
    f = R.restore_image(m, low, output="float")
    assert f.dtype == np.float32 and np.abs(np.clip(np.rint(f), 0, 255) - y).max() == 0
    # the input scale is the least-squares map of the normalised output onto the input
    g, o = R.input_scale_fit(n, low)
    assert np.allclose(f, g * n + o, atol=1e-3)
    # 16-bit and float inputs keep their type and scale
    y16 = R.restore_image(m, low.astype(np.uint16) * 200)
    assert y16.dtype == np.uint16 and abs(float(y16.mean()) - 200 * float(low.mean())) < 600
    yf = R.restore_image(m, low.astype(np.float64) / 255)
    assert yf.dtype == np.float32 and abs(float(yf.mean()) - float(low.mean()) / 255) < 0.02
    # the clean scan is closer to the restoration than to the input, in raw units
    mse = lambda a: float(np.mean((a.astype(np.float64) - clean) ** 2))  # noqa: E731
    assert mse(y) < mse(low)
    with pytest.raises(InputError, match="output scale"):
        R.restore_image(m, low, output="raw")


def test_data_bar_kept_and_stack(model_and_data):
    m, clean, low = model_and_data
    img = np.vstack([low, np.zeros((20, 96), np.uint8)])
    img[96] = 255  # the bar's top line
    img[104:108, 10:60] = 255  # "text"
    img[-1] = 255
    y = R.restore_image(m, img)
    assert y.dtype == np.uint8 and np.array_equal(y[96:], img[96:])
    from napari_leakseg.core.jobs import run_job

    res = run_job(R.iter_apply(m, np.stack([low, low[::-1]]), risk_map=True)).value
    assert res["restored"].dtype == np.uint8 and res["restored"].shape == (2, 96, 96)
    assert res["risk"].dtype == np.float32


def test_big_zarr_out_on_input_scale(model_and_data, tmp_path):
    zarr = pytest.importorskip("zarr")
    m, clean, low = model_and_data
    big = np.tile(low, (2, 2))
    z = zarr.open_array(str(tmp_path / "o.zarr"), mode="w", shape=(1,) + big.shape, chunks=(1, 64, 64),
                        dtype="float32")
    from napari_leakseg.core.jobs import run_job

    run_job(R.iter_restore(m, big, tile=96, overlap=32, out=z))
    direct = R.restore_image(m, big, tile=96, overlap=32)
    got = np.asarray(z[0])
    assert np.abs(got - direct.astype(np.float32)).max() <= 1.0  # same map, rounding aside
    assert R.output_dtype(big) == np.uint8 and R.output_dtype(big, "normalized") == np.float32
