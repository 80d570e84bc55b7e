"""Core tests for reference-assisted membrane segmentation (tiny, CPU, fast)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_leakseg import membrane as M
from napari_leakseg.core import store
from napari_leakseg.core.errors import InputError, ModelFileError
from napari_leakseg.core.jobs import run_job
from napari_leakseg.core.tiling import predict_tiled

# LEAKSEG_TEST_DEVICE=cuda runs these tests on a GPU (the device check); CI has none
DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")

TINY = dict(epochs=2, steps_per_epoch=4, batch_size=2, crop=64, base=8, depth=2, emb_dim=8,
            keys_per_ref=32, device=DEVICE, seed=0)


def sample(seed=0, shape=(96, 96)):
    try:
        from napari_leakseg.samples import membranes

        return membranes(shape=shape, n_cells=12, seed=seed)  # labels: 1 membrane, 2 cell
    except ImportError:  # pragma: no cover - before samples.py existed
        rng = np.random.default_rng(seed)
        pts = rng.uniform(0, 1, (12, 2)) * np.array(shape)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        cells = np.argmin((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2, -1)
        from scipy import ndimage as ndi

        mem = ndi.morphological_gradient(cells, size=3) > 0
        img = (200 - 120 * mem + rng.normal(0, 8, shape)).clip(0, 255).astype(np.uint8)
        return img, np.where(mem, 1, 2).astype(np.uint8)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    ims, lbs = zip(*[sample(s) for s in (0, 1)])
    return M.train_membrane(list(ims), list(lbs), membrane_value=1, **TINY)


def test_no_napari_import():
    code = ("import sys, napari_leakseg.membrane; "
            "bad=[m for m in ('napari','qtpy','PyQt5') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_copies_labels_of_matching_reference_pixels():
    # 3 reference pixels: two membrane keys, one cell key. A query equal to a key
    # must receive (with a sharp softmax) that key's label.
    keys = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    vals = torch.tensor([1.0, 1.0, 0.0])
    q = keys[[0, 2, 1, 2]][None]  # (1, 4, 3)
    p = M.attend(q, keys[None, None], vals[None, None], torch.tensor(40.0))
    assert p.shape == (1, 4)
    np.testing.assert_allclose(p[0].numpy(), [1, 0, 1, 0], atol=1e-6)
    # a flat softmax (scale 0) gives the reference's label mean
    p0 = M.attend(q, keys[None, None], vals[None, None], torch.tensor(0.0))
    np.testing.assert_allclose(p0[0].numpy(), 2 / 3, atol=1e-6)
    # several references are averaged
    keys2 = torch.stack([keys, keys])[None]
    vals2 = torch.stack([vals, 1 - vals])[None]
    p2 = M.attend(q, keys2, vals2, torch.tensor(40.0))
    np.testing.assert_allclose(p2[0].numpy(), 0.5, atol=1e-6)
    # chunking does not change the result
    pc = M.attend(q, keys2, vals2, torch.tensor(5.0), chunk=1)
    np.testing.assert_allclose(pc.numpy(), M.attend(q, keys2, vals2, torch.tensor(5.0)).numpy(), atol=1e-6)


def test_model_shapes_baseline_and_reference_and_fusion_uses_references():
    torch.manual_seed(0)
    net = M.MembraneNet(base=8, depth=2, emb_dim=8, keys_per_ref=16)
    base = M.MembraneNet(base=8, depth=2, use_reference=False)
    x = torch.rand(2, 1, 32, 32)
    assert base(x).shape == (2, 1, 32, 32)
    assert not hasattr(base, "proj")
    f, e = net.encode(x)
    assert e.shape == (2, 8, 32, 32)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2, 32, 32))
    lab = torch.zeros(32, 32)
    lab[::4] = 1
    k, v = M.sample_keys(e[0], lab, 16)
    assert k.shape == (16, 8) and float(v.sum()) == 8  # class balanced
    keys, vals = k[None, None].expand(2, 1, 16, 8), v[None, None].expand(2, 1, 16)
    logit, p = net.fuse_logits(f, e, keys, vals)
    assert logit.shape == (2, 1, 32, 32) and p.shape == (2, 1, 32, 32)
    assert (p >= 0).all() and (p <= 1).all()
    # fusion starts at the baseline (w = 0); once w != 0 the reference labels matter
    torch.testing.assert_close(logit, net.head(f))
    with torch.no_grad():
        net.fuse.fill_(1.0)
    logit, _ = net.fuse_logits(f, e, keys, vals)
    logit2, _ = net.fuse_logits(f, e, keys, 1 - vals)
    assert not torch.allclose(logit, logit2)


def test_label_conventions_and_bad_inputs():
    m = M.membrane_mask_from_labels(np.array([[0, 1], [2, 1]]), membrane_value=1)
    assert np.isnan(m[0, 0]) and m[0, 1] == 1 and m[1, 0] == 0
    m0 = M.membrane_mask_from_labels(np.array([[0, 255]]), membrane_value=0)
    np.testing.assert_array_equal(m0, [[1, 0]])
    img, lab = sample()
    with pytest.raises(InputError, match="shape"):
        M.prepare_references([img], [lab[:50]])
    with pytest.raises(InputError, match="no membrane"):
        M.prepare_references([img], [np.full_like(lab, 2)])
    with pytest.raises(InputError, match="only membrane"):
        M.prepare_references([img], [np.ones_like(lab)])
    with pytest.raises(InputError, match="fewer than 1"):
        M.prepare_references([], [])
    with pytest.raises(InputError, match="pair up"):
        M.prepare_references([img, img], [lab])
    with pytest.raises(InputError, match="values found: 1, 2"):
        M.prepare_references([img], [lab], membrane_value=0 + 5)
    # stacks: unannotated (constant) slices are skipped
    stack = np.stack([img, img, img])
    lstack = np.stack([lab, np.zeros_like(lab), lab])
    pairs, _ = M.prepare_references(stack, lstack)
    assert len(pairs) == 2
    # different dtype/scale is normalised the same; a big range difference warns
    p16, _ = M.prepare_references([img.astype(np.uint16) * 200], [lab])
    p8, _ = M.prepare_references([img], [lab])
    np.testing.assert_allclose(p16[0][0], p8[0][0], atol=1e-5)
    assert M.intensity_scale_warning((0, 50000), [(0, 255)]) is not None
    assert M.intensity_scale_warning((0, 250), [(0, 255)]) is None
    # caller's arrays untouched
    lab_copy = lab.copy()
    M.prepare_references([img], [lab])
    np.testing.assert_array_equal(lab, lab_copy)


def test_binary_masks_and_mismatched_membrane_values():
    img, lab = sample()
    mask01 = (lab == 1).astype(np.uint8)  # a 0/1 membrane mask: 0 = not membrane, not "unlabeled"
    m = M.membrane_mask_from_labels(mask01, membrane_value=1)
    assert np.isfinite(m).all()
    np.testing.assert_array_equal(m, mask01)
    assert 0.05 < m.mean() < 0.6  # not "all membrane"
    pairs, _ = M.prepare_references([img], [mask01], membrane_value=1)
    np.testing.assert_array_equal(pairs[0][1], mask01)
    # 0/255 membrane masks (the em/ stacks' membrane/*.png) with membrane value 255
    m255 = M.membrane_mask_from_labels(mask01 * 255, membrane_value=255)
    np.testing.assert_array_equal(m255, mask01)
    # the stated value does not occur: refused, naming the values found
    with pytest.raises(InputError, match=r"values found: 0, 1\b"):
        M.prepare_references([img], [mask01], membrane_value=255)
    with pytest.raises(InputError, match=r"values found: 0, 255"):
        M.prepare_references([img], [mask01 * 255], membrane_value=1)
    # instance labels are not membrane labels
    inst = (np.arange(lab.size).reshape(lab.shape) % 20).astype(np.uint16)
    with pytest.raises(InputError, match="20 distinct values"):
        M.membrane_mask_from_labels(inst, membrane_value=1)
    # ISBI style with more than one cell value is refused too
    with pytest.raises(InputError, match="distinct values"):
        M.membrane_mask_from_labels(np.array([[0, 128, 255]]), membrane_value=0)


def test_cells_from_probability_grid_and_min_size():
    prob = np.zeros((64, 64), np.float32)
    prob[:, 31:33] = 1
    prob[31:33, :] = 1
    cells = M.cells_from_probability(prob, min_size=10, smooth=0)
    assert len(np.unique(cells)) == 4 and cells.min() >= 1  # every pixel belongs to a cell
    prob[5:7, 0:6] = 1  # a tiny 5x6 corner piece: merged away by min_size
    prob[0:7, 5:7] = 1
    assert len(np.unique(M.cells_from_probability(prob, min_size=40, smooth=0))) == 4
    assert len(np.unique(M.cells_from_probability(prob, min_size=5, smooth=0))) == 5
    bg = M.cells_from_probability(prob, min_size=10, smooth=0, membrane_background=True)
    assert (bg[prob >= 0.5] == 0).all()


def test_train_predict_save_load_roundtrip(trained, tmp_path):
    assert isinstance(trained, M.TrainedMembrane)
    assert trained.bank is not None and len(trained.bank) >= 1
    assert len(trained.history) == 2 and all(np.isfinite(h["loss"]) for h in trained.history)
    img, lab = sample(5)
    res = M.predict_membrane(trained, img, device=DEVICE)
    assert res["probability"].shape == img.shape and res["probability"].dtype == np.float32
    assert set(np.unique(res["membrane"])) <= {0, 1}
    assert res["cells"].shape == img.shape
    path = tmp_path / "m.pt"
    trained.save(path)
    sd, meta = store.load(path, capability="membrane")
    assert meta["capability"] == "membrane" and meta["arch"]["use_reference"] is True
    assert "bank.keys" in sd and meta["membrane_value"] == 1
    res2 = M.predict_membrane(str(path), img, device=DEVICE)
    np.testing.assert_allclose(res2["probability"], res["probability"], atol=1e-5)
    # explicit references replace the saved ones and change the result
    other_img, other_lab = sample(9)
    res3 = M.predict_membrane(str(path), img, [other_img], [other_lab], device=DEVICE, n_refs=2)
    assert not np.allclose(res3["probability"], res["probability"])
    # predictor_from_model works with the shared tiler (bounded memory path)
    pr = M.predictor_from_model(sd, meta, device=DEVICE)
    x = M.normalize(img)[None]
    prob = predict_tiled(pr.fn, x, tile=64, overlap=16)
    assert prob.shape == (1,) + img.shape
    assert pr.finalize(prob).shape == img.shape
    # a stack is predicted slice by slice
    st = M.predict_membrane(trained, np.stack([img, img]), device=DEVICE)
    assert st["probability"].shape == (2,) + img.shape and st["done"] == 2


def test_wrong_capability_and_missing_references(tmp_path, trained):
    p = tmp_path / "r.pt"
    store.save({"w": torch.zeros(1)}, p, {"capability": "restore"})
    with pytest.raises(ModelFileError, match="not a 'membrane'"):
        M.load_model(p)
    no_bank = M.TrainedMembrane(trained.model, trained.metadata, None)
    img, _ = sample(3)
    with pytest.raises(InputError, match="fewer than 1 reference"):
        M.predict_membrane(no_bank, img, device=DEVICE)
    with pytest.raises(InputError, match="both"):
        M.predict_membrane(trained, img, [img], None, device=DEVICE)


def test_cancel_keeps_best_model_and_seed_is_deterministic():
    torch.set_num_threads(1)
    img, lab = sample(0, (64, 64))
    kw = dict(TINY, epochs=3, steps_per_epoch=2)
    seen = []

    def cb(ev):
        seen.append(ev)
        return not ("epoch" in ev.metrics and ev.metrics.get("best_loss") is not None)

    res = run_job(M.iter_train_membrane([img], [lab], **kw), cb)
    assert res.cancelled and isinstance(res.value, M.TrainedMembrane)
    assert res.value.cancelled and res.value.metadata["train"]["steps_done"] == 2
    assert any("loss" in e.metrics for e in seen)
    if DEVICE != "cpu":
        # CUDA: the attention's gather and upsampling backward use atomic adds, so the same seed
        # does not give bit-identical weights there (measured on an H100)
        return
    a = M.train_membrane([img], [lab], **dict(kw, epochs=1))
    b = M.train_membrane([img], [lab], **dict(kw, epochs=1))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_baseline_and_feedback_variants_train_and_finetune():
    torch.set_num_threads(1)
    img, lab = sample(0, (64, 64))
    base = M.train_membrane([img], [lab], use_reference=False, feedback=False, **dict(TINY, epochs=1))
    assert base.bank is None
    out = M.predict_membrane(base, img, device=DEVICE)
    assert out["probability"].shape == img.shape
    fb = M.train_membrane([img], [lab], feedback=True, **dict(TINY, epochs=1))
    assert fb.model.in_channels == 2
    out = M.predict_membrane(fb, img, device=DEVICE, feedback_iters=1)
    assert out["probability"].shape == img.shape
    with pytest.raises(InputError, match="without feedback"):
        M.MembranePredictor(base, device=DEVICE, feedback_iters=1)
    tuned = M.train_membrane([img], [lab], init=fb, **dict(TINY, epochs=1))
    assert tuned.metadata["train"]["fine_tuned"] and tuned.model.feedback


def test_learns_membranes_on_synthetic_sample():
    torch.set_num_threads(1)
    ims, lbs = zip(*[sample(s) for s in (0, 1)])
    tm = M.train_membrane(list(ims), list(lbs), **dict(TINY, epochs=4, steps_per_epoch=10, batch_size=4))
    img, lab = sample(7)
    p = M.predict_membrane(tm, img, device=DEVICE)["membrane"].astype(bool)
    t = lab == 1
    f1 = 2 * (p & t).sum() / (p.sum() + t.sum())
    assert f1 > 0.6, f1


def test_scale_is_chosen_by_how_well_it_reproduces_the_references():
    """The scale the target is read at is the candidate (measured from the labels' width, 1,
    their geometric mean) that best reproduces the references' own labels; a target labelled
    the same way scores at least as well at that scale as at the others (the network's output:
    the reference head, fitted after the scale is chosen, is off)."""
    from skimage.morphology import skeletonize

    torch.set_num_threads(1)
    ims, lbs = zip(*[sample(s) for s in (0, 1)])
    tm = M.train_membrane(list(ims), list(lbs), **dict(TINY, epochs=4, steps_per_epoch=10, batch_size=4))
    ref_img, ref_lab = sample(8)
    thin = np.where(skeletonize(ref_lab == 1), 1, 2).astype(np.uint8)  # 1-px lines over 3-px membranes
    img, lab = sample(9)
    lab_thin = skeletonize(lab == 1)

    def f1(pr):
        p = pr.probability(img) >= 0.5
        return 2 * (p & lab_thin).sum() / max(1, p.sum() + lab_thin.sum())

    measured = M.MembranePredictor(tm, device=DEVICE, ref_head=False)
    measured.set_references([ref_img], [thin], choose_scale=False)
    assert measured.scale > 1.5 and measured.scale_scores == {}
    chosen = M.MembranePredictor(tm, device=DEVICE, ref_head=False)
    chosen.set_references([ref_img], [thin])
    scores = chosen.scale_scores
    assert len(scores) == 3 and 1.0 in scores and all(0 <= v <= 1 for v in scores.values())
    assert round(chosen.scale, 4) == max(scores, key=scores.get)
    others = []
    for s in scores:
        pr = M.MembranePredictor(tm, device=DEVICE, scale=s, ref_head=False)
        pr.set_references([ref_img], [thin])
        others.append(f1(pr))
    assert f1(chosen) >= max(others) - 0.02, (scores, f1(chosen), others)
    # an explicit scale is never second-guessed
    fixed = M.MembranePredictor(tm, device=DEVICE, scale=2.0, ref_head=False)
    fixed.set_references([ref_img], [thin])
    assert fixed.scale == 2.0 and fixed.scale_scores == {}


def _zoomed_inverted(seed, factor=2.0):
    """A sample at `factor`x the pixel scale with bright membranes, labelled as a 0/255 mask."""
    from scipy import ndimage as ndi

    img, lab = sample(seed, (64, 64))
    big = ndi.zoom(img.astype(np.float32), factor, order=1)
    mem = ndi.zoom((lab == 1).astype(np.uint8), factor, order=0)
    return (255 - big).clip(0, 255).astype(np.uint8), (mem * 255).astype(np.uint8)


def test_membrane_width_and_polarity_from_labels():
    img, lab = sample(0)
    pairs, _ = M.prepare_references([img], [lab])
    w1 = M.membrane_width([pairs[0][1]])
    bimg, bmask = _zoomed_inverted(0, 2.0)
    bpairs, _ = M.prepare_references([bimg], [bmask], membrane_value=255)
    w2 = M.membrane_width([bpairs[0][1]])
    assert 1.5 < w1 < 5 and 1.6 < w2 / w1 < 2.4, (w1, w2)
    assert M.membrane_polarity(pairs) < -0.1 < 0.1 < M.membrane_polarity(bpairs)
    with pytest.raises(InputError, match="width"):
        M.membrane_width([np.zeros((8, 8), np.float32)])


def test_several_sets_scale_polarity_and_finetune():
    torch.set_num_threads(1)
    a_img, a_lab = sample(0)
    b_img, b_mask = _zoomed_inverted(1, 2.0)
    tm = M.train_membrane(sets=[([a_img], [a_lab], 1), ([b_img], [b_mask], 255)], **dict(TINY, epochs=1))
    sets = tm.metadata["sets"]
    assert tm.metadata["train"]["n_sets"] == 2 and [s["membrane_value"] for s in sets] == [1, 255]
    assert sets[0]["polarity"] < 0 < sets[1]["polarity"]  # the second set's membranes are bright
    assert 1.6 < sets[1]["width"] / sets[0]["width"] < 2.4
    W = tm.metadata["train_width"]
    assert min(s["width"] for s in sets) <= W <= max(s["width"] for s in sets)
    assert "input_scale" not in tm.metadata  # several sets: no single native scale
    # references from the zoomed, bright-walled kind set the target's scale and polarity
    c_img, c_mask = _zoomed_inverted(2, 2.0)
    pr = M.MembranePredictor(tm, device=DEVICE)
    pr.set_references([c_img], [c_mask], membrane_value=255, choose_scale=False)
    assert pr.invert and abs(pr.scale - W / pr.ref_width) < 1e-6 and pr.scale < 1
    assert pr.scale_scores == {}
    p = pr.probability(b_img)
    assert p.shape == b_img.shape and np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1
    # an explicit scale wins over the references'
    pr2 = M.MembranePredictor(tm, device=DEVICE, scale=1.0)
    pr2.set_references([c_img], [c_mask], membrane_value=255)
    assert pr2.scale == 1.0 and pr2.invert
    with pytest.raises(InputError, match="scale"):
        M.MembranePredictor(tm, device=DEVICE, scale=0)
    # no references: the plain head, which differs from the attention-fused prediction
    plain = M.predict_membrane(tm, a_img, device=DEVICE, use_references=False)["probability"]
    fused = M.predict_membrane(tm, a_img, device=DEVICE)["probability"]
    assert plain.shape == a_img.shape and not np.allclose(plain, fused)
    # fine-tuning on a couple of slices of the bright-walled kind: a new model that reads that kind
    before = {k: v.clone() for k, v in tm.model.state_dict().items()}
    ft = M.finetune_membrane(tm, [c_img], [c_mask], membrane_value=255, seconds=1.0, device=DEVICE,
                             crop=64, batch_size=2, choose_scale=False)
    assert ft.metadata["train"]["fine_tuned"] and ft.metadata["train"]["steps_done"] >= 1
    assert ft.metadata["input_invert"] is True and ft.metadata["input_scale"] < 1
    # by default the fine-tune reads the slices at the scale chosen as for references
    chooser = M.MembranePredictor(tm, device=DEVICE).set_references([c_img], [c_mask], membrane_value=255)
    assert len(chooser.scale_scores) == 3
    ft_c = M.finetune_membrane(tm, [c_img], [c_mask], membrane_value=255, seconds=0.5, device=DEVICE,
                               crop=64, batch_size=2)
    assert abs(ft_c.metadata["input_scale"] - chooser.scale) < 1e-6
    assert ft.metadata["train_width"] == W
    for k, v in tm.model.state_dict().items():  # the starting model is not modified
        torch.testing.assert_close(v, before[k])
    assert any(not torch.equal(v, before[k]) for k, v in ft.model.state_dict().items())
    fp = M.MembranePredictor(ft, device=DEVICE, use_references=False)
    assert fp.invert and fp.scale == ft.metadata["input_scale"]
    with pytest.raises(InputError, match="positive"):
        M.finetune_membrane(tm, [c_img], [c_mask], membrane_value=255, seconds=0)
    with pytest.raises(InputError, match="values found: 0, 255"):
        M.finetune_membrane(tm, [c_img], [c_mask], membrane_value=1, seconds=1)
