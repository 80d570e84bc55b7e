"""Device, jobs, normalisation, labels: real behaviour on real arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_leakseg.core import device, jobs, labels, normalize
from napari_leakseg.core.errors import DeviceError, InputError, JobCancelled


# ------------------------------------------------------------------ device
def test_auto_device_is_cpu_without_gpu():
    d = device.resolve_device("auto")
    if not torch.cuda.is_available():
        assert d.type in ("cpu", "mps")
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.available_devices()[0] == "auto" and device.available_devices()[-1] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_explicit_cuda_fails_clearly():
    with pytest.raises(DeviceError, match="cuda.*not.*available|no CUDA"):
        device.resolve_device("cuda")


def test_fast_layout_is_channels_last_on_cpu_only_and_changes_no_result():
    from napari_leakseg.core.unet import UNet

    assert device.fast_layout("cpu") == torch.channels_last
    assert device.fast_layout(torch.device("cuda")) == torch.contiguous_format  # not measured on a GPU
    assert device.fast_layout("mps") == torch.contiguous_format  # MPS kernels are not all channels-last
    torch.manual_seed(0)
    net = UNet(1, 3, base=4, depth=2, norm="group").eval()
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        ref = net(x)
        assert not net.down[0][3].weight.is_contiguous(memory_format=torch.channels_last)  # a 3×3 conv, 4 → 4 channels
        net = net.to(memory_format=torch.channels_last)
        assert net.down[0][3].weight.is_contiguous(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape and not torch.equal(ref, torch.zeros_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_unknown_device():
    with pytest.raises(DeviceError, match="unknown device"):
        device.resolve_device("tpu")


# ------------------------------------------------------------------ jobs
def _counting_job(n, keep_on_cancel=True):
    best = None
    try:
        for i in range(n):
            best = i
            yield jobs.Progress(i + 1, n, f"step {i}", preview=i)
    except JobCancelled:
        if keep_on_cancel:
            return ("cancelled-at", best)
        raise
    return ("done", best)


def test_run_job_to_end():
    seen = []
    res = jobs.run_job(_counting_job(5), seen.append)
    assert res.value == ("done", 4) and not res.cancelled
    assert [e.step for e in seen] == [1, 2, 3, 4, 5]


def test_cancel_keeps_best_result():
    res = jobs.run_job(_counting_job(100), lambda ev: ev.step < 3 or False)
    assert res.cancelled and res.value == ("cancelled-at", 2)


def test_cancel_without_result():
    token = jobs.CancelToken()

    def cb(ev):
        if ev.step == 2:
            token.cancel()

    res = jobs.run_job(_counting_job(100, keep_on_cancel=False), cb, cancel=token)
    assert res.cancelled and res.value is None


def test_job_errors_propagate():
    def bad():
        yield jobs.Progress(1, 2)
        raise InputError("scribbles have one class")

    with pytest.raises(InputError, match="one class"):
        jobs.run_job(bad())


def test_throttle():
    t = jobs.Throttle(10.0)
    assert t() and not t() and t(force=True)


# ------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int64, bool])
def test_normalize_dtypes(dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((40, 50)) * (255 if dtype != bool else 1)).astype(dtype)
    before = a.copy()
    x = normalize.normalize(a)
    assert x.dtype == np.float32 and x.shape == a.shape
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(a, before)  # input untouched
    if dtype != bool:
        assert -0.05 < np.percentile(x, 1) < 0.05 and 0.95 < np.percentile(x, 99.8) < 1.05


def test_normalize_constant_is_zero_not_nan():
    x = normalize.normalize(np.full((8, 8), 7, np.uint16))
    assert np.all(x == 0)


def test_check_image_rejects_nan_and_empty():
    a = np.ones((5, 5), np.float32)
    a[2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        normalize.check_image(a)
    with pytest.raises(InputError, match="empty"):
        normalize.check_image(np.zeros((0, 5)))


def test_channels_first_and_gray_rgb():
    rgb = np.zeros((10, 12, 3), np.uint8)
    assert normalize.to_channels_first(rgb).shape == (3, 10, 12)
    assert normalize.to_channels_first(rgb[..., 0]).shape == (1, 10, 12)
    assert normalize.rgb_is_gray(np.repeat(np.arange(20, dtype=np.uint8).reshape(4, 5, 1), 3, -1))
    rgb[0, 0] = (1, 2, 3)
    assert not normalize.rgb_is_gray(rgb)
    with pytest.raises(InputError):
        normalize.to_channels_first(np.zeros((2, 3, 4, 5)))


# ------------------------------------------------------------------ labels
def test_check_labels():
    img_shape = (6, 7)
    ok = labels.check_labels(np.ones(img_shape, np.float32), img_shape)
    assert ok.dtype.kind in "iu"
    with pytest.raises(InputError, match="does not match"):
        labels.check_labels(np.ones((6, 6), np.uint8), img_shape)
    with pytest.raises(InputError, match="negative"):
        labels.check_labels(-np.ones(img_shape, np.int32), img_shape)
    with pytest.raises(InputError, match="non-integer"):
        labels.check_labels(np.full(img_shape, 0.5), img_shape)
    with pytest.raises(InputError, match="at most 255"):
        labels.check_labels(np.full(img_shape, 300), img_shape, max_id=255)


def test_compact_keeps_scribble_ids():
    lab = np.array([[0, 2, 7], [9, 9, 1], [40, 2, 7]])
    out = labels.compact(lab, keep=2)
    assert out[0, 1] == 2 and out[1, 2] == 1 and out[0, 0] == 0
    assert sorted(np.unique(out)) == [0, 1, 2, 3, 4, 5]
    assert out.dtype == np.uint8
