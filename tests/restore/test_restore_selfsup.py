"""Self-supervised restoration for scan-line-correlated SEM noise, Noise2Noise from two scans,
pix2pix (GAN) training and the degradation estimated from several low images (issue 17)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_leakseg import restore as R
from napari_leakseg.core.errors import InputError
from napari_leakseg.core.normalize import normalize

DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")
SCAN = R.Degradation(poisson=0.01, gaussian=0.08, blur=0, scan_corr=0.7)  # correlated along rows


def _quick(**kw):
    base = dict(steps=30, batch_size=2, crop=64, base=8, depth=2, seed=0, device=DEVICE, val_every=10,
                preview=False, lr=5e-3, bar=None)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def field():
    from napari_leakseg.samples import sem_particles

    clean = normalize(sem_particles((128, 128), seed=6)[0])
    return clean, R.degrade(clean, SCAN, seed=1)


def test_line_pairs_and_lines_fn_row_mapping():
    img = np.arange(9 * 4, dtype=np.float32).reshape(9, 4)
    (e, o), (o2, e2) = R.line_pairs(img)
    assert np.array_equal(e[:, 0], img[0:8:2, 0]) and np.array_equal(o[:, 0], img[1:8:2, 0])
    assert np.array_equal(o2[:, 0], img[1:6:2, 0]) and np.array_equal(e2[:, 0], img[2:8:2, 0])
    # every input row k is paired with the row just below it in the original image
    for a, b in ((e, o), (o2, e2)):
        assert np.all(b - a == 4)
    # lines_fn: the even rows give the odd rows and the odd rows the next even ones
    t = np.arange(7, dtype=np.float32)[None, :, None] * np.ones((1, 7, 3), np.float32)
    out = R.lines_fn(lambda x: x + 1000)(t)  # a "network" that shifts values: shows where rows go
    assert out.shape == t.shape
    assert np.array_equal(out[0, 1::2, 0], t[0, 0::2, 0][:3] + 1000)  # row 2k+1 ← input row 2k
    assert np.array_equal(out[0, 2::2, 0], t[0, 1::2, 0][:3] + 1000)  # row 2k+2 ← input row 2k+1


def test_nb2nb_subsampler_pairs_pixels_of_different_lines():
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(8.0)[None, None, :, None].expand(2, 1, 8, 8).contiguous()
    cols = torch.arange(8.0)[None, None, None, :].expand(2, 1, 8, 8).contiguous()
    i1, i2 = R._nb2nb_indices(rows.shape, gen)
    assert torch.all((R._nb2nb_sub(rows, i1) - R._nb2nb_sub(rows, i2)).abs() == 1)  # adjacent lines
    assert torch.all(R._nb2nb_sub(cols, i1) == R._nb2nb_sub(cols, i2))  # same column
    assert len(set(i1.flatten().tolist())) == 4  # all four cell positions are used


def test_scan_direction_kept_by_augmentation():
    img = np.repeat(np.arange(64, dtype=np.float32)[:, None], 64, 1)  # every row constant
    rng = np.random.default_rng(0)
    for aug in ("flips", "hflip"):
        x, _ = R._random_crops([(img, img)], 16, 32, rng, augment=aug)
        assert torch.all(x.std(dim=3) == 0), aug  # rows stay rows: the scan direction is kept
    x, _ = R._random_crops([(img, img)], 32, 32, rng, augment="full")
    assert torch.any(x.std(dim=3) > 0)  # rotations turn rows into columns


def test_flips_fn_undoes_its_flips():
    t = np.random.default_rng(0).random((1, 7, 5)).astype(np.float32)
    assert np.allclose(R.flips_fn(lambda x: x)(t), t)  # an equivariant function is unchanged
    # a function that adds the row and column index: each flip is undone, so the four
    # predictions average to the mean row and column index everywhere
    out = R.flips_fn(lambda x: x + np.arange(7)[:, None] + 10 * np.arange(5)[None, :])(t)
    assert np.allclose(out, t + 3 + 10 * 2)


def test_ssim_noisy_target_corrects_for_the_target_noise(field):
    clean, _ = field
    a, s = 0.01, 0.08
    noisy = R.degrade(clean, R.Degradation(poisson=a, gaussian=s, blur=0, scan_corr=0.7), seed=5)
    c, t = (torch.from_numpy(np.asarray(v, np.float32))[None, None] for v in (clean, noisy))
    plain = float(R.ssim(c, t))
    corrected = float(R.ssim_noisy_target(c, t, a, s))
    # the clean image scores much higher against its noisy scan than by the plain SSIM (≈ 0.75 vs 0.39)
    assert corrected > plain + 0.25 and corrected > 0.65
    # and it scores best: neither flattened nor exaggerated contrast is rewarded
    for k in (0.6, 0.8, 1.2, 1.6):
        assert float(R.ssim_noisy_target((c - c.mean()) * k + c.mean(), t, a, s)) < corrected, k
    # nor an inverted image (both SSIM factors negative: their product must not count)
    assert float(R.ssim_noisy_target(-c, t, a, s)) < 0.05


def test_lines_ssim_restores_structured_noise_better_than_the_input():
    # our own synthetic SEM particles with noise correlated along the rows; no clean image in training
    from napari_leakseg.samples import sem_particles

    cleans = [normalize(sem_particles((128, 128), seed=sd)[0]) for sd in (6, 7)]
    lows = [R.degrade(c, SCAN, seed=10 + i) for i, c in enumerate(cleans)]
    m = R.train(low=lows, mode="self-supervised", **_quick(steps=150, batch_size=4, val_every=25))
    assert m.metadata["train"]["ss_method"] == "lines-ssim"  # the default self-supervised method
    n = m.metadata["train"]["noise"]
    assert 0.04 < n[1] < 0.12  # the noise level (gaussian 0.08 before normalisation) was estimated

    def score(x):
        return R.ssim_np(R.match_intensity(x, cleans[0]), cleans[0])

    y = R.restore_image(m, lows[0], output="normalized")
    assert score(y) > score(lows[0]) + 0.25, (score(y), score(lows[0]))
    m.metadata["tta"] = None  # the four flips help
    assert score(R.restore_image(m, lows[0], output="normalized")) < score(y)


def test_lines_ssim_on_real_sem_crops(shared_data):
    import tifffile

    d = shared_data / "sem" / "dwell_time"

    def pair(i):
        lo = R.as_gray(tifffile.imread(d / "low" / f"100ns_{i:03d}.tif"))
        hi = R.as_gray(tifffile.imread(d / "high" / f"30us_{i:03d}.tif"))
        lc, (t, b, le, r) = R.crop_data_bar(lo)
        lr, hr, _, _ = R.register_pair(lc, hi[t:hi.shape[0] - b, le:hi.shape[1] - r])
        return lr[100:292, 100:292], normalize(hr[100:292, 100:292])

    (l1, _), (l7, h7) = pair(1), pair(7)
    m = R.train(low=[l1, l7], mode="self-supervised", ss_method="lines-ssim",
                **_quick(steps=150, batch_size=4, val_every=25))
    y = R.restore_image(m, l7.astype(np.uint8))
    assert y.dtype == np.uint8 and y.shape == l7.shape

    def score(x):
        return R.ssim_np(R.match_intensity(x, h7), h7)

    assert score(y) > score(l7) + 0.2, (score(y), score(l7))  # 192² crops, 150 steps: ≈ 0.70 vs 0.41


def _val_losses(events):
    return [e.metrics["val_loss"] for e in events if e.metrics.get("val_loss") is not None]


@pytest.mark.parametrize("method", ["lines-ssim", "lines", "nb2nb", "n2v"])
def test_self_supervised_methods_learn_scan_noise(field, method):
    # on a 128² image and 30 steps a self-supervised U-Net does not yet beat its input (the real
    # comparison is the benchmark); here: it learns (its held-out self-supervised loss falls)
    clean, low = field
    events = []
    m = R.train(low=[low], mode="self-supervised", ss_method=method, callback=events.append, **_quick())
    tr = m.metadata["train"]
    assert tr["mode"] == "self-supervised" and tr["ss_method"] == method
    assert tr["loss"] == ("ssim-noisy-target" if method == "lines-ssim" else "mse")
    assert m.metadata["inference"] == ("lines" if method in ("lines", "lines-ssim") else "direct")
    assert m.metadata["tta"] == ("flips" if method == "lines-ssim" else None)
    if method == "n2v":
        assert tr["blind_x"] >= 1  # the scan correlation was detected: structured blind spot
    vl = _val_losses(events)
    assert len(vl) == 3 and min(vl[1:]) < vl[0], vl
    y = R.restore_image(m, low, output="normalized")
    assert y.shape == low.shape and np.isfinite(y).all()
    with pytest.raises(InputError, match="self-supervised method"):
        R.train(low=[low], mode="self-supervised", ss_method="n3v", **_quick(steps=1))


def test_noise2noise_two_scans(field, tmp_path):
    clean, _ = field
    a = R.degrade(clean, SCAN, seed=2)
    b = R.degrade(ndi.shift(clean, (1.5, -2.0), order=3, mode="nearest"), SCAN, seed=3)  # drift between scans
    events = []
    m = R.train(low=[a], low2=[b], callback=events.append, **_quick())
    assert m.metadata["train"]["mode"] == "noise2noise" and m.metadata["train"]["n_images"] == 2
    vl = _val_losses(events)
    assert min(vl[1:]) < vl[0], vl
    # the registered pair: the second scan was moved onto the first (drift removed)
    pairs = R._noise2noise_pairs([a], [b], None, 0.3)
    x, y = pairs[0]
    assert x.shape == y.shape and x.shape[0] <= 128 - 1 and x.shape[1] <= 128 - 2
    y_moved = R.match_intensity(ndi.gaussian_filter(y, 2), ndi.gaussian_filter(x, 2))
    assert np.corrcoef(ndi.gaussian_filter(x, 2).ravel(), y_moved.ravel())[0, 1] > 0.9
    out = R.restore_image(m, a, output="normalized")
    p = m.save(tmp_path / "n2n.pt")
    assert np.allclose(R.restore_image(R.RestoreModel.load(p), a, output="normalized"), out, atol=1e-5)
    with pytest.raises(InputError, match="two scans of every field"):
        R.train(low=[a, a], low2=[b], mode="noise2noise", **_quick(steps=1))
    with pytest.raises(InputError, match="needs two scans"):
        R.train(low=[a], mode="noise2noise", **_quick(steps=1))


def test_pix2pix_trains_and_is_flagged(field):
    clean, low = field
    m = R.train(low=[low], high=[clean], loss="pix2pix", **_quick(steps=6))
    assert m.metadata["gan"] is True and m.metadata["train"]["loss"] == "pix2pix"
    assert np.isfinite(R.restore_image(m, low, output="normalized")).all()
    d = R.PatchDiscriminator()
    out = d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    assert out.shape[1] == 1 and out.shape[-1] < 64  # a map of patch decisions, not one number
    with pytest.raises(InputError, match="clean targets"):
        R.train(low=[low], mode="self-supervised", loss="pix2pix", **_quick(steps=1))


def test_degradation_estimated_from_several_lows(field):
    clean, _ = field
    lows = [R.degrade(clean, SCAN, seed=s) for s in range(3)]
    many = R.estimate_degradation_many(lows, clean)
    singles = [R.estimate_degradation(x, clean) for x in lows]
    assert min(s.gaussian for s in singles) <= many.gaussian <= max(s.gaussian for s in singles)
    assert many.scan_corr > 0.3  # the row correlation is found
    m = R.train(high=[clean], mode="degrade", estimate_from=lows, **_quick(steps=2))
    assert m.metadata["train"]["degradation"]["scan_corr"] == many.scan_corr
