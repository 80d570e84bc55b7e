"""Core restoration: SSIM vs scikit-image, registration, data bar, degradation model,
training (3 modes), cancel, save/load, tiling equality, fabrication check, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_leakseg import restore as R
from napari_leakseg.core.errors import InputError
from napari_leakseg.core.jobs import CancelToken, run_job
from napari_leakseg.core.normalize import normalize

# LEAKSEG_TEST_DEVICE=cuda runs these tests on a GPU (the device check); CI has none
DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")


def particles(shape=(96, 96), n=25, seed=0, r=(2.0, 4.0)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 0.1, np.float32)
    centers = []
    for _ in range(n):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        rr = rng.uniform(*r)
        img += 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (rr / 1.4) ** 2))
        centers.append((cy, cx, rr))
    return np.clip(img, 0, 1), np.array(centers)


@pytest.fixture(scope="module")
def sem():
    from napari_leakseg.samples import sem_particles

    clean, low, centers = sem_particles((128, 128), seed=3)
    return clean, low, centers


def test_no_napari_import():
    code = ("import sys, napari_leakseg.restore; "
            "assert 'napari' not in sys.modules and 'qtpy' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('napari', 'qtpy'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ssim_matches_skimage():
    rng = np.random.default_rng(0)
    a, _ = particles((64, 64))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    t = R.ssim(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None])
    ref = R.ssim_np(a, b)
    assert abs(float(t) - ref) < 0.02, (float(t), ref)
    assert float(R.ssim(torch.from_numpy(a)[None, None].float(), torch.from_numpy(a)[None, None].float())) > 0.999


def test_losses():
    x = torch.rand(2, 1, 32, 32)
    for k in R.LOSSES:
        f = R.restoration_loss(k)
        assert float(f(x, x)) < 1e-5
        assert float(f(x, x.flip(-1))) > 0.01
    with pytest.raises(InputError, match="unknown loss"):
        R.restoration_loss("gan")


def test_registration_subpixel():
    clean, _ = particles((128, 128), n=40, seed=1)
    true = (2.4, -1.7)
    moved = ndi.shift(clean, true, order=3, mode="nearest")  # the low image is the shifted field
    low = R.degrade(moved, R.Degradation(poisson=0.01, gaussian=0.05, blur=0.5), seed=0)
    lc, hc, shift, corr = R.register_pair(low, clean)
    assert abs(shift[0] - true[0]) < 0.25 and abs(shift[1] - true[1]) < 0.25, shift
    assert lc.shape == hc.shape and lc.shape[0] <= 128 - 2 and lc.shape[1] <= 128 - 1
    assert corr > 0.8
    # registered images agree better than the raw ones
    assert R._smooth_corr(lc, hc) > R._smooth_corr(low, clean)


def test_registration_refuses():
    a, _ = particles((64, 64), seed=1)
    b, _ = particles((64, 64), seed=2)
    with pytest.raises(InputError, match="cannot register"):
        R.register_pair(a, np.random.default_rng(0).random((64, 64)))
    with pytest.raises(InputError, match="different shapes"):
        R.register_pair(a, b[:60])


def test_data_bar_detection(sem):
    clean = sem[0]
    assert R.detect_data_bar(clean) == 0
    img = np.vstack([clean, np.zeros((20, 128), np.uint8)])
    img[128] = 255  # the bar's top line
    img[140:144, 10:60] = 255  # "text"
    img[-1] = 255
    assert R.detect_data_bar(img) == 20
    cropped, crop = R.crop_data_bar(img)
    assert cropped.shape == (128, 128) and crop[1] == 20
    cropped, crop = R.crop_data_bar(img, 25)
    assert cropped.shape == (123, 128)
    with pytest.raises(InputError, match="margin"):
        R.crop_data_bar(img, 500)


def test_gray_handling():
    g = (particles((64, 64))[0] * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], -1)
    rgb[0, :] = (0, 255, 0)  # a coloured frame line (as in real SEM files)
    out = R.as_gray(rgb)
    assert out.shape == (64, 64) and np.array_equal(out[1:], g[1:].astype(np.float32))
    col = rgb.copy()
    col[..., 0] = 255 - g
    with pytest.warns(UserWarning, match="colour"):
        R.as_gray(col)
    g16 = (particles((32, 32))[0] * 60000).astype(np.uint16)
    assert np.allclose(normalize(R.as_gray(g16)), normalize(g16.astype(np.float32)))
    with pytest.raises(InputError, match="empty"):
        R.as_gray(np.zeros((0, 5)))
    with pytest.raises(InputError, match="constant"):
        R.as_gray(np.zeros((32, 32)))


def test_degradation_model_and_estimate():
    clean, _ = particles((128, 128), n=30, seed=4)
    p = R.Degradation(poisson=0.01, gaussian=0.06, blur=1.2, jitter=0.8, downsample=2)
    x = R.degrade(clean, p, seed=0)
    assert x.shape == clean.shape and x.dtype == np.float32
    assert np.array_equal(x, R.degrade(clean, p, seed=0))  # deterministic given a seed
    assert not np.array_equal(x, R.degrade(clean, p, seed=1))
    # noise level: residual std ≈ sqrt(a*x + s^2) for noise only
    flat = np.full((128, 128), 0.5, np.float32)
    n = R.degrade(flat, R.Degradation(poisson=0.02, gaussian=0.05, blur=0), seed=0) - 0.5
    assert abs(n.std() - np.sqrt(0.02 * 0.5 + 0.05 ** 2)) < 0.01
    # blur lowers the gradient energy; jitter shifts rows
    b = R.degrade(clean, R.Degradation(poisson=0, gaussian=0, blur=2.0), seed=0)
    assert np.abs(np.diff(b, axis=1)).mean() < np.abs(np.diff(clean, axis=1)).mean()
    j = R.degrade(clean, R.Degradation(poisson=0, gaussian=0, blur=0, jitter=1.5), seed=0)
    assert np.abs(j - clean).max() > 0.05 and np.abs(np.diff(j - clean, axis=0)).mean() > 0
    # estimate the noise back from a synthetic low image (clean scale)
    low = R.degrade(clean, R.Degradation(poisson=0.0, gaussian=0.08, blur=0), seed=2)
    a, s = R.estimate_noise(low)  # in the image's own units
    assert a < 0.01 and abs(s - 0.08) < 0.015, (a, s)
    est = R.estimate_degradation(low)  # in units of the clean image scaled to [0, 1]
    from napari_leakseg.core.normalize import percentile_range

    lo, hi = percentile_range(clean)
    sd = np.sqrt(est.poisson * 0.3 + est.gaussian ** 2) * (hi - lo)
    assert 0.06 < sd < 0.11, est
    low2 = R.degrade(clean, R.Degradation(poisson=0.02, gaussian=0.03, blur=0), seed=2)
    a, s = R.estimate_noise(low2)
    assert a > 0.005, (a, s)  # signal-dependent noise is detected
    # parse
    assert R.Degradation.parse("noise=0.1,blur=2").gaussian == 0.1
    with pytest.raises(InputError, match="unknown degradation"):
        R.Degradation.parse("nois=0.1")
    with pytest.raises(InputError, match="≥ 0"):
        R.Degradation(blur=-1)


def test_estimate_blur_with_reference():
    clean, _ = particles((128, 128), n=60, seed=5, r=(1.0, 2.5))
    low = R.degrade(clean, R.Degradation(poisson=0, gaussian=0.02, blur=1.5), seed=0)
    est = R.estimate_degradation(low, clean)
    assert 0.8 <= est.blur <= 2.2, est


def _quick(**kw):
    base = dict(steps=8, batch_size=2, crop=32, base=8, depth=2, seed=0, device=DEVICE, val_every=4,
                preview=True)
    base.update(kw)
    return base


def test_train_paired_degrade_selfsup(sem, tmp_path):
    clean, low, _ = sem
    events = []
    m = R.train(low=[low], high=[clean], loss="ssim", callback=events.append, **_quick())
    assert m.metadata["train"]["mode"] == "paired"
    assert any(e.metrics.get("val_ssim") is not None for e in events)
    assert all(np.isfinite(e.metrics["loss"]) for e in events)
    out = R.restore_image(m, low, output="normalized")
    assert out.shape == low.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert R.restore_image(m, low).dtype == np.uint8  # the default keeps the input's dtype
    # determinism given a seed
    m2 = R.train(low=[low], high=[clean], loss="ssim", **_quick())  # same seed
    assert np.allclose(R.restore_image(m2, low, output="normalized"), out, atol=1e-5)
    # save / load / predictor
    p = m.save(tmp_path / "r.pt")
    loaded = R.RestoreModel.load(p)
    assert np.allclose(R.restore_image(loaded, low, output="normalized"), out, atol=1e-5)
    from napari_leakseg.core.predictor import load_predictor

    pred = load_predictor(p, device=DEVICE)
    assert pred.output == "image" and pred.capability == "restore"
    y = pred.finalize(pred.fn(normalize(low)[None]))
    assert y.shape == low.shape
    md = R.train(high=[clean], mode="degrade", degradation="noise=0.08,blur=0.8", loss="mse", **_quick())
    assert md.metadata["train"]["degradation"]["gaussian"] == 0.08
    me = R.train(high=[clean], mode="degrade", estimate_from=low, **_quick())
    assert me.metadata["train"]["degradation"]["gaussian"] > 0
    ms = R.train(low=[low], mode="self-supervised", **_quick())
    assert ms.metadata["train"]["mode"] == "self-supervised"
    assert np.isfinite(R.restore_image(ms, low)).all()


def test_training_improves_ssim(sem):
    clean, low, _ = sem
    m = R.train(low=[low], high=[clean], **_quick(steps=40, crop=64, batch_size=2, base=8, depth=2, lr=5e-3))
    c = normalize(clean)
    before = R.ssim_np(R.match_intensity(normalize(low), c), c)
    after = R.ssim_np(R.match_intensity(R.restore_image(m, low), c), c)
    assert after > before + 0.05, (before, after)


def test_cancel_keeps_best(sem):
    clean, low, _ = sem
    tok = CancelToken()
    seen = []

    def cb(ev):
        seen.append(ev)
        if ev.step >= 8:
            tok.cancel()

    res = run_job(R.train_restore(low=[low], high=[clean], **_quick(steps=100)), cb, cancel=tok)
    assert res.cancelled and isinstance(res.value, R.RestoreModel)
    assert res.value.metadata["train"]["best_step"] in (4, 8) and res.value.metadata["train"]["steps_done"] == 8
    assert len(seen) < 20


def test_tiled_equals_untiled(sem):
    clean, low, _ = sem
    m = R.train(low=[low], high=[clean], **_quick(steps=6))
    big = np.tile(low, (2, 2))  # 256×256
    whole = R.restore_image(m, big, tile=256, output="normalized")
    tiled = R.restore_image(m, big, tile=96, overlap=32, output="normalized")
    assert np.abs(whole - tiled).mean() < 0.01 and np.abs(whole - tiled).max() < 0.1
    stack = R.restore_image(m, np.stack([low, low]), output="normalized")
    assert stack.shape == (2,) + low.shape and np.allclose(stack[0], stack[1])


def test_fabrication_check():
    clean, centers = particles((128, 128), n=20, seed=7)
    fake = clean.copy()
    yy, xx = np.mgrid[:128, :128]
    # a spot far from every real particle
    d = np.min(np.hypot(centers[:, 0, None, None] - yy, centers[:, 1, None, None] - xx), 0)
    fy, fx = np.unravel_index(np.argmax(np.where((yy > 12) & (yy < 116) & (xx > 12) & (xx < 116), d, 0)), d.shape)
    fake += 0.7 * np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * 2.0 ** 2))
    res = R.fabrication_check(fake, clean)
    assert res["fabricated"] == 1 and res["missed"] == 0, res
    fb = res["fabricated_blobs"][0]
    assert abs(fb[0] - fy) <= 2 and abs(fb[1] - fx) <= 2
    same = R.fabrication_check(clean, clean)
    assert same["fabricated"] == 0 and same["missed"] == 0 and same["n_reference"] >= 15
    # remove a particle -> missed
    cy, cx, rr = R.detect_blobs(clean)[0]  # a detected particle
    gone = clean.copy()
    gone[(yy - cy) ** 2 + (xx - cx) ** 2 < (2 * rr + 2) ** 2] = 0.1
    assert R.fabrication_check(gone, clean)["missed"] >= 1


def test_risk_map_marks_invented_structure():
    clean, centers = particles((128, 128), n=20, seed=8)
    noisy = R.degrade(clean, R.Degradation(poisson=0.01, gaussian=0.06, blur=0), seed=0)
    yy, xx = np.mgrid[:128, :128]
    d = np.min(np.hypot(centers[:, 0, None, None] - yy, centers[:, 1, None, None] - xx), 0)
    fy, fx = np.unravel_index(np.argmax(np.where((yy > 12) & (yy < 116) & (xx > 12) & (xx < 116), d, 0)), d.shape)
    invented = clean + 0.6 * np.exp(-((yy - fy) ** 2 + (xx - fx) ** 2) / (2 * 2.0 ** 2))
    risk = R.fabrication_risk_map(noisy, invented)
    assert risk.shape == clean.shape
    near = risk[fy - 2:fy + 3, fx - 2:fx + 3].max()
    assert near > 4 and near > 2 * np.percentile(risk, 99), (near, np.percentile(risk, 99))
    honest = R.fabrication_risk_map(noisy, clean)
    assert honest[fy - 2:fy + 3, fx - 2:fx + 3].max() < near / 2


def test_bad_inputs(sem):
    clean, low, _ = sem
    with pytest.raises(InputError, match="different shapes"):
        R.train(low=[low], high=[clean[:100]], **_quick())
    with pytest.raises(InputError, match="1 low-quality and 2 high"):
        R.train(low=[low], high=[clean, clean], **_quick())
    with pytest.raises(InputError, match="cannot register"):
        R.train(low=[low], high=[np.random.default_rng(0).integers(0, 255, low.shape).astype(np.uint8)],
                **_quick())
    with pytest.raises(InputError, match="empty"):
        R.train(low=[np.zeros((0, 0))], mode="self-supervised", **_quick())
    with pytest.raises(InputError, match="unknown training mode"):
        R.train(low=[low], mode="gan", **_quick())
    with pytest.raises(InputError, match="needs high"):
        R.train(low=[low], mode="degrade", **_quick())
    with pytest.raises(InputError, match="too small"):
        R.as_gray(np.ones((8, 8)))
    # 16-bit data trains and restores
    m = R.train(low=[low.astype(np.uint16) * 250], high=[clean], **_quick(steps=2))
    assert np.isfinite(R.restore_image(m, low.astype(np.uint16) * 250)).all()
