"""The reference head: a per-pixel classifier fitted to the user's references at prediction time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_leakseg import membrane as M
from napari_leakseg.core.errors import InputError
from napari_leakseg.core.pixel_head import PixelHead

# the tiny model trained on two synthetic samples (a module fixture), shared with the core tests
from test_membrane_core import DEVICE, sample, trained  # noqa: F401  (pytest fixture)


def unseen(seed):
    """A stack the model never saw: bright, blurred, thicker walls on a textured background."""
    img, lab = sample(seed, (80, 80))
    big = ndi.gaussian_filter(ndi.zoom(img.astype(np.float32), 1.5, order=1), 1.2)
    mem = ndi.zoom((lab == 1).astype(np.uint8), 1.5, order=0).astype(bool)
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.normal(0, 1, big.shape), 4) * 30
    out = (255 - big + tex).clip(0, 255).astype(np.uint8)
    return out, np.where(mem, 1, 2).astype(np.uint8)


def f1(prob, lab):
    p, t = prob >= 0.5, lab == 1
    return 2 * (p & t).sum() / max(1, p.sum() + t.sum())


def test_pixel_head_learns_the_labelled_pixels_and_ignores_unlabelled_ones():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0, 1, (2, 40, 40)).astype(np.float32))  # feature 0 decides, 1 is noise
    y = (x[0] > 0.5).float()
    y_bad = y.clone()
    y_bad[:, :20] = 1 - y_bad[:, :20]  # wrong labels on the left half ...
    y_bad[:, :20] = float("nan")  # ... that are not labelled
    head = PixelHead(steps=150, seed=0).fit([x], [y_bad])
    pred = head.predict(x) >= 0.5
    assert (pred == (y > 0.5)).float().mean() > 0.95
    assert (pred[:, :20] == (y[:, :20] > 0.5)).float().mean() > 0.9  # unlabelled half follows the rule
    # deterministic for a seed; the caller's random stream is not touched
    torch.manual_seed(1)
    a = torch.rand(1)
    torch.manual_seed(1)
    h2 = PixelHead(steps=150, seed=0).fit([x], [y_bad])
    assert torch.equal(torch.rand(1), a)
    assert torch.allclose(h2.predict(x), head.predict(x))
    with pytest.raises(InputError, match="no labelled pixels"):
        PixelHead(steps=5).fit([x], [torch.full((40, 40), float("nan"))])
    with pytest.raises(InputError, match="differ in shape"):
        PixelHead(steps=5).fit([x], [y[:10]])


def test_reference_head_makes_references_pay_off_on_an_unseen_stack(trained):
    """Bright, blurred, thicker walls than in training: the references' labels, read pixel by
    pixel by the head, raise the F1 well above the attention alone, on every target slice."""
    torch.set_num_threads(1)
    ref_img, ref_lab = unseen(10)
    targets = [unseen(s) for s in (11, 12)]
    scores = {}
    for head in (True, False):
        pr = M.MembranePredictor(trained, device=DEVICE, ref_head=head)
        pr.set_references([ref_img], [ref_lab])
        assert (pr.head is not None) == head
        scores[head] = [f1(pr.probability(im), lab) for im, lab in targets]
    assert all(a > b + 0.05 for a, b in zip(scores[True], scores[False])), scores
    assert min(scores[True]) > 0.6, scores


def test_reference_head_only_with_user_references_and_off_reproduces_attention(trained):
    img, lab = sample(5)
    saved = M.MembranePredictor(trained, device=DEVICE)  # the model's saved references: no head
    assert saved.head is None
    plain = saved.probability(img)
    ref_img, ref_lab = sample(9)
    off = M.MembranePredictor(trained, device=DEVICE, ref_head=False).set_references([ref_img], [ref_lab])
    on = M.MembranePredictor(trained, device=DEVICE).set_references([ref_img], [ref_lab])
    p_off, p_on = off.probability(img), on.probability(img)
    np.testing.assert_array_equal(p_off, M.MembranePredictor(trained, device=DEVICE, ref_head=False)
                                  .set_references([ref_img], [ref_lab]).probability(img))
    assert not np.allclose(p_on, p_off) and not np.allclose(plain, p_on)
    assert p_on.dtype == np.float32 and p_on.shape == img.shape and 0 <= p_on.min() and p_on.max() <= 1
    # the function API passes it through
    res = M.predict_membrane(trained, img, [ref_img], [ref_lab], device=DEVICE, ref_head=False)
    np.testing.assert_array_equal(res["probability"], p_off)


def test_reference_head_ignores_unlabelled_pixels_and_is_tiled(trained):
    """Labels with 0 = unlabelled: only the labelled part trains the head; tiles give the same result."""
    ref_img, ref_lab = sample(9, (128, 128))
    part = ref_lab.copy()
    part[:, 64:] = 0  # right half unlabelled
    wrong = part.copy()
    wrong[:, 64:] = 1  # the same right half labelled all membrane
    img, lab = sample(6, (150, 150))
    a = M.MembranePredictor(trained, device=DEVICE).set_references([ref_img], [part])
    b = M.MembranePredictor(trained, device=DEVICE).set_references([ref_img], [wrong])
    pa, pb = a.probability(img), b.probability(img)
    assert (pb >= 0.5).mean() > (pa >= 0.5).mean() + 0.1  # the wrong labels would have been learned
    assert f1(pa, lab) > f1(pb, lab)
    tiled = M.MembranePredictor(trained, device=DEVICE, tile=64, overlap=16).set_references([ref_img], [part])
    pt = tiled.probability(img)
    assert np.abs(pt - pa).mean() < 0.02 and ((pt >= 0.5) == (pa >= 0.5)).mean() > 0.97


@pytest.mark.shared_data
def test_reference_head_on_a_real_confocal_stack(trained, shared_data):
    """A model trained on synthetic dark EM-like walls, given one annotated slice of the real
    ovule stack (bright cell walls, light microscopy): the head lifts F1 on two other slices."""
    import imageio.v3 as iio

    ovule = shared_data / "em" / "ovule_confocal"
    if not ovule.is_dir():
        pytest.skip(f"{ovule} is absent")

    def load(i):
        img = iio.imread(ovule / "image" / f"z{i:03d}.png")
        mem = iio.imread(ovule / "membrane" / f"z{i:03d}.png") == 255
        return np.asarray(img), np.where(mem, 1, 2).astype(np.uint8)

    ref_img, ref_lab = load(3)
    scores = {}
    for head in (True, False):
        pr = M.MembranePredictor(trained, device=DEVICE, ref_head=head).set_references([ref_img], [ref_lab])
        scores[head] = [f1(pr.probability(im), lab) for im, lab in (load(10), load(17))]
    assert min(scores[True]) > 0.5 and all(a > b + 0.05 for a, b in zip(scores[True], scores[False])), scores


def test_large_references_fit_the_head_from_sampled_pixels_in_bands():
    """Above the size limit the head sees sampled labelled pixels whose features, computed in row
    bands with a halo, equal those of the whole image."""
    img, lab = sample(3, (300, 200))
    norm = M.normalize(img)
    prob = (lab == 1).astype(np.float32) * 0.8 + 0.1
    mask = np.where(lab == 1, 1.0, 0.0).astype(np.float32)
    mask[:50] = np.nan  # unlabelled rows
    whole_f, whole_t = M._head_samples(norm, prob, mask, "cpu", np.random.default_rng(0))
    assert whole_f.shape[1:] == img.shape and torch.equal(torch.isnan(whole_t), torch.from_numpy(np.isnan(mask)))
    f, t = M._head_samples(norm, prob, mask, "cpu", np.random.default_rng(0), max_px=20000, band=64)
    assert f.shape[1:] == (t.shape[0], 1) and 15000 < t.shape[0] < 25000  # about max_px of 50000 labelled
    assert not torch.isnan(t).any()  # only labelled pixels
    # with room for every labelled pixel (50 000) but above the size (60 000): banded, in raster order,
    # and each pixel's features equal the whole image's (the halo covers the filter bank)
    f, t = M._head_samples(norm, prob, mask, "cpu", np.random.default_rng(0), max_px=50000, band=64)
    lab = torch.from_numpy(~np.isnan(mask)).reshape(-1)
    ref = whole_f.reshape(whole_f.shape[0], -1)[:, lab]
    assert f.shape == (ref.shape[0], ref.shape[1], 1)
    assert torch.allclose(f[..., 0], ref, atol=1e-3)
    assert torch.equal(t[:, 0], whole_t.reshape(-1)[lab])


def test_many_references_share_one_bound_on_the_pixels_that_fit_the_head(trained, monkeypatch):
    seen = []
    fit = PixelHead.fit

    def spy(self, features, targets):
        seen.append(sum(int(t.numel()) for t in targets))
        return fit(self, features, targets)

    monkeypatch.setattr(PixelHead, "fit", spy)
    monkeypatch.setattr(M, "_HEAD_MAX_PX", 20000)
    refs = [sample(s) for s in (20, 21, 22, 23)]  # 4 × 96² = 36 864 labelled pixels
    pr = M.MembranePredictor(trained, device="cpu").set_references([r[0] for r in refs], [r[1] for r in refs])
    assert pr.head is not None and 14000 < seen[-1] < 26000, seen  # about 20 000, not 36 864
    small = M.MembranePredictor(trained, device="cpu").set_references([refs[0][0]], [refs[0][1]])
    assert small.head is not None and seen[-1] == 96 * 96  # under the bound: every pixel


def test_pixel_head_prediction_equals_its_network_on_standardised_features():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(3, 2, (5, 30, 20)).astype(np.float32))
    y = torch.from_numpy((rng.uniform(size=(30, 20)) > 0.5).astype(np.float32))
    head = PixelHead(steps=10, seed=0).fit([x], [y])
    with torch.no_grad():
        ref = torch.sigmoid(head.net((x.reshape(5, -1).T - head.mean) / head.std)[:, 0]).reshape(30, 20)
    assert torch.allclose(head.predict(x), ref, atol=1e-5)
