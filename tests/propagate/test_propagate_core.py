"""Propagation core: propagate, confirm, resume, instances, CTC export, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from napari_leakseg.core.errors import InputError, LeaksegError
from napari_leakseg.core.jobs import run_job
from napari_leakseg.propagate import (
    PropagateParams,
    Propagator,
    ctc_seg,
    export_ctc,
    foreground_iou,
    link_instances,
    predictor_from_model,
    propagate,
    tracks_of,
)

# LEAKSEG_TEST_DEVICE=cuda runs these tests on a GPU (the device check); CI has none
DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")

#: tiny and fast settings for CI
FAST = dict(downsample=1, base=8, depth=2, init_steps=60, steps=2, resume_steps=10,
            patch=32, batch=2, lr=3e-3, window=2, seed=0)


def timelapse(T=8, shape=(48, 48), seed=0):
    """Small synthetic time-lapse: the package's moving-cells sample (two cells)."""
    from napari_leakseg.samples import timelapse as sample

    return sample(n_frames=T, shape=shape, n_cells=2, seed=seed)


@pytest.fixture(scope="module")
def data():
    stack, inst = timelapse()
    return stack, inst


def first_only(inst):
    lab = np.zeros(inst.shape, np.uint8)
    lab[0] = inst[0] > 0
    return lab


def test_module_does_not_import_napari():
    code = ("import sys, napari_leakseg.propagate, napari_leakseg.cli.propagate; "
            "assert 'napari' not in sys.modules and 'qtpy' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('napari.', 'qtpy'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_propagates_and_keeps_annotation(data):
    stack, inst = data
    lab = first_only(inst)
    events = []
    sess = propagate(stack, lab, direction="forward", device=DEVICE, callback=events.append, **FAST)
    assert sess.status[0] == "annotated"
    assert all(s == "pseudo" for s in sess.status[1:])
    np.testing.assert_array_equal(sess.labels[0], lab[0])
    ious = [foreground_iou(sess.labels[t], inst[t]) for t in range(1, len(stack))]
    assert np.mean(ious) > 0.75, ious
    frame_events = [e for e in events if e.preview is not None]
    assert [e.preview[0] for e in frame_events] == list(range(1, len(stack)))
    t, lab_t, conf_t = frame_events[0].preview
    assert lab_t.shape == stack.shape[1:] and conf_t.dtype == np.uint8
    assert sess.confidence.dtype == np.uint8 and sess.confidence[0].min() == 255
    # the caller's arrays were not modified
    assert lab[1:].max() == 0


def test_deterministic(data):
    stack, inst = data
    a = propagate(stack[:4], first_only(inst[:4]), device=DEVICE, **FAST)
    b = propagate(stack[:4], first_only(inst[:4]), device=DEVICE, **FAST)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_confirmed_frames_are_never_modified(data):
    stack, inst = data
    lab = first_only(inst)
    sess = Propagator(stack, lab, device=DEVICE, **FAST)
    odd = np.zeros(stack.shape[1:], np.uint8)
    odd[:10, :10] = 1  # deliberately unlike the prediction
    sess.confirm(4, odd)
    sess.run("both")
    np.testing.assert_array_equal(sess.labels[4], odd)
    np.testing.assert_array_equal(sess.labels[0], lab[0])
    assert sess.status[4] == "confirmed" and sess.status[0] == "annotated"
    sess.resume(2)
    np.testing.assert_array_equal(sess.labels[4], odd)


def test_resume_recomputes_only_between_anchors(data):
    stack, inst = data  # T = 8
    lab = np.zeros(inst.shape, np.uint8)
    lab[0] = inst[0] > 0
    lab[6] = inst[6] > 0
    sess = Propagator(stack, lab, device=DEVICE, **FAST)
    assert sess.anchors == [0, 6]
    sess.run("both")
    assert sess.status == ["annotated"] + ["pseudo"] * 5 + ["annotated", "pseudo"]
    before = np.array(sess.labels, copy=True)
    conf_before = np.array(sess.confidence, copy=True)
    # the user corrects frame 3 and confirms it; resume from there
    fix = (inst[3] > 0).astype(np.uint8)
    assert sess.resume_frames(3) == [1, 2, 3, 4, 5]  # not confirmed yet: its whole gap
    sess.confirm(3, fix)
    assert sess.resume_frames(3) == [1, 2, 4, 5]
    seen = []
    sess.resume(3, callback=lambda e: seen.append(e.preview[0]) if e.preview else None)
    # the walks from the correction own the frames nearer to it than to anchors 0 and 6
    assert sorted(seen) == [2, 4]
    assert sess.history[-1]["kind"] == "resume" and sess.history[-1]["frames"] == [2, 4]
    np.testing.assert_array_equal(sess.labels[3], fix)
    assert sess.status[3] == "confirmed"
    for t in (0, 1, 5, 6, 7):  # anchors, frames nearer to another anchor, beyond: untouched
        np.testing.assert_array_equal(sess.labels[t], before[t])
        np.testing.assert_array_equal(sess.confidence[t], conf_before[t])
    # forward-only resume touches only the frames after t
    assert sess.resume_frames(3, "forward") == [4, 5]
    assert sess.resume_frames(3, "backward") == [1, 2]


def test_cancel_keeps_frames_done(data):
    stack, inst = data
    sess = Propagator(stack, first_only(inst), device=DEVICE, **FAST)
    n = {"frames": 0}

    def cb(ev):
        if ev.preview is not None:
            n["frames"] += 1
            if n["frames"] == 3:
                return False
        return None

    res = run_job(sess.iter_run("forward"), cb)
    assert res.cancelled and res.value is sess
    assert sess.status[1:4] == ["pseudo"] * 3
    assert "pending" in sess.status[4:]
    # resume from the current frame continues the gap
    sess.resume(3, direction="forward")
    assert sess.status.count("pending") == 0


def test_edited_frames_detects_user_paint(data):
    stack, inst = data
    sess = propagate(stack[:4], first_only(inst[:4]), device=DEVICE, **FAST)
    layer = np.array(sess.labels, copy=True)
    assert sess.edited_frames(layer) == []
    layer[2, 0, 0] = 1 - layer[2, 0, 0]
    assert sess.edited_frames(layer) == [2]


class CountingStack:
    """A lazy stack that records which frames were read (and never all at once)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.reads = []

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            self.reads.append(int(idx))
            return self.arr[idx]
        # only tiny strided samples for statistics are allowed
        out = self.arr[idx]
        assert out.size <= 4_000_000
        return out


def test_lazy_frames_and_zarr_outputs(data, tmp_path):
    zarr = pytest.importorskip("zarr")
    stack, inst = data
    lazy = CountingStack(stack)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=stack.shape,
                          chunks=(1,) + stack.shape[1:], dtype="uint8")
    conf = zarr.open_array(str(tmp_path / "conf.zarr"), mode="w", shape=stack.shape,
                           chunks=(1,) + stack.shape[1:], dtype="uint8")
    sess = propagate(lazy, first_only(inst), device=DEVICE, out=out, confidence_out=conf,
                     direction="forward", **FAST)
    assert set(lazy.reads) == set(range(len(stack)))
    assert np.asarray(out[5]).any() and np.asarray(conf[5]).max() > 200
    assert sess.labels is out


def test_instances_keep_ids_and_ctc_export(data, tmp_path):
    _, inst = data
    linked = link_instances(inst > 0, min_size=5)
    # every GT cell keeps a single id through time
    for g in np.unique(inst[inst > 0]):
        ids = {int(np.bincount(linked[t][inst[t] == g]).argmax()) for t in range(len(inst))
               if (inst[t] == g).any()}
        assert len(ids) == 1
    s, n = ctc_seg(inst[3], inst[3])
    assert n == len(np.unique(inst[3])) - 1 and s == n
    assert ctc_seg(inst[3], np.zeros_like(inst[3]))[0] == 0.0
    s, n = ctc_seg(inst[3], linked[3])  # touching cells may merge: still ≥ half matched
    assert s / n >= 0.45
    folder = export_ctc(linked, tmp_path / "RES")
    import tifffile

    assert (folder / "mask000.tif").exists() and (folder / "mask007.tif").exists()
    np.testing.assert_array_equal(tifffile.imread(folder / "mask003.tif") > 0, inst[3] > 0)
    rows = [list(map(int, r.split())) for r in (folder / "res_track.txt").read_text().splitlines()]
    assert {r[0] for r in rows} == set(tracks_of(linked))
    assert all(r[1] == 0 and r[2] == len(inst) - 1 and r[3] == 0 for r in rows)
    with pytest.raises(LeaksegError, match="not empty"):
        export_ctc(linked, folder)


def test_ctc_gap_starts_new_track(tmp_path):
    inst = np.zeros((4, 8, 8), np.uint16)
    inst[0, :2, :2] = 1
    inst[3, :2, :2] = 1
    export_ctc(inst, tmp_path / "r")
    rows = (tmp_path / "r" / "res_track.txt").read_text().split("\n")
    assert rows[0] == "1 0 0 0" and rows[1] == "2 3 3 1"


def test_instance_mode_session(data):
    stack, inst = data
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]  # instance ids are binarised for training
    sess = propagate(stack, lab, device=DEVICE, instances=True, direction="forward", **FAST)
    assert sess.n_classes == 2
    linked = sess.instances(min_size=5)
    assert linked.shape == stack.shape and linked[1:].max() >= 1


def test_saved_model_predictor(data, tmp_path):
    from napari_leakseg.core import store
    from napari_leakseg.core.normalize import normalize
    from napari_leakseg.core.tiling import predict_tiled

    stack, inst = data
    sess = propagate(stack[:3], first_only(inst[:3]), device=DEVICE, **FAST)
    path = sess.save_model(tmp_path / "m.pt")
    sd, meta = store.load(path, capability="propagate")
    assert meta["frame_status"] == sess.status and meta["capability"] == "propagate"
    pred = predictor_from_model(sd, meta, device=DEVICE)
    x = normalize(stack[1].astype(np.float32))[None]
    lab = pred.finalize(predict_tiled(pred.fn, x, tile=pred.tile, overlap=pred.halo))
    assert lab.shape == stack.shape[1:]
    assert foreground_iou(lab, inst[1]) > 0.6


def test_predictions_average_the_four_flips_and_saved_models_predict_the_same(data, tmp_path):
    """Test-time augmentation (``tta=True``): the session's probabilities are the mean of the network's
    probabilities on the frame's 4 flips (not the plain prediction), and a saved model's
    predictor (CLI apply, dask) gives the same ones."""
    import torch

    from napari_leakseg.core import store
    from napari_leakseg.propagate.training import softmax_tta

    stack, inst = data
    assert PropagateParams().tta is True  # on by default: 4 passes cost ~0.02 s per frame channels-last
    sess = propagate(stack[:3], first_only(inst[:3]), device=DEVICE, **FAST)
    if sess.device.type == "cpu":  # the session's network runs channels-last there (core.device.fast_layout)
        # (a 3×3 conv with 8 in and out channels: a 1×1 or 1-channel weight would pass either way)
        assert sess.model.down[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    img = sess._norm_frame(1)
    p = sess.trainer.predict_ds(img)
    x = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    model = sess.model.eval()
    with torch.no_grad():
        plain = [torch.softmax(model(x.flip(f) if f else x), 1) for f in ((), (-1,), (-2,), (-2, -1))]
        mean = (plain[0] + plain[1].flip(-1) + plain[2].flip(-2) + plain[3].flip((-2, -1))) / 4
        assert torch.allclose(softmax_tta(model, x, True), mean)
    np.testing.assert_allclose(p, mean[0].numpy(), atol=1e-5)
    assert np.abs(p - plain[0][0].numpy()).max() > 1e-3  # the flips do change the result
    sd, meta = store.load(sess.save_model(tmp_path / "m.pt"), capability="propagate")
    assert meta["train"]["tta"] is True
    pred = predictor_from_model(sd, meta, device=DEVICE)
    np.testing.assert_allclose(pred.fn(img[None]), p, atol=1e-5)
    # a model saved before the option predicted without flips, and still does
    meta["train"].pop("tta")
    old = predictor_from_model(sd, meta, device=DEVICE)
    np.testing.assert_allclose(old.fn(img[None]), plain[0][0].numpy(), atol=1e-5)
    # tta=False: one plain prediction
    sess.params.tta = False
    np.testing.assert_allclose(sess.trainer.predict_ds(img), plain[0][0].numpy(), atol=1e-5)


@pytest.mark.parametrize("case, msg", [
    ("t_mismatch", "frames but the image stack has"),
    ("yx_mismatch", "must match"),
    ("no_annotation", "no annotated frame"),
    ("one_class", "only one class"),
    ("single_frame", "single-frame|single frame"),
    ("rgb", "RGB"),
    ("frame_out", "outside the stack"),
    ("bad_tau", "tau"),
])
def test_bad_input(case, msg):
    stack = np.zeros((3, 16, 16), np.uint8)
    stack[:, 4:8, 4:8] = 200
    lab = np.zeros((3, 16, 16), np.uint8)
    lab[0, 4:8, 4:8] = 1
    kw = {}
    if case == "t_mismatch":
        lab = lab[:2]
    elif case == "yx_mismatch":
        lab = lab[:, :8]
    elif case == "no_annotation":
        lab = np.zeros_like(lab)
    elif case == "one_class":
        lab[0] = 1
    elif case == "single_frame":
        stack, lab = stack[0], lab[0]
    elif case == "rgb":
        stack = np.zeros((3, 16, 16, 3), np.uint8)
    elif case == "frame_out":
        kw["annotated"] = [5]
    elif case == "bad_tau":
        kw["tau"] = 1.5
    with pytest.raises(InputError, match=msg):
        Propagator(stack, lab, device=DEVICE, **kw)


def test_odd_sizes_downsampled_and_cleanup():
    from napari_leakseg.propagate import clean_labels

    stack, inst = timelapse(T=3, shape=(41, 37))
    lab = first_only(inst)
    sess = propagate(stack, lab, device=DEVICE, **{**FAST, "downsample": 2, "init_steps": 5,
                                                  "min_size": 20})
    assert sess.labels.shape == stack.shape and sess.status == ["annotated", "pseudo", "pseudo"]
    a = np.zeros((30, 30), np.uint8)
    a[5:25, 5:25] = 1
    a[10:12, 10:12] = 0  # a small hole
    a[28:30, 0:2] = 1    # a speck
    b = clean_labels(a, 10)
    assert b[10, 10] == 1 and b[29, 0] == 0 and a[10, 10] == 0  # input not modified


@pytest.mark.parametrize("direction", ["forward", "backward", "both"])
def test_walks_cover_each_frame_once_from_the_anchor_that_owns_it(direction):
    from napari_leakseg.propagate.walks import owner, plan_walks

    rng = np.random.default_rng(0)
    for _ in range(50):
        T = int(rng.integers(2, 30))
        anchors = sorted(rng.choice(T, size=int(rng.integers(1, min(T, 5) + 1)), replace=False).tolist())
        frames = {t for t in range(T) if t not in anchors}
        chains = plan_walks(anchors, T, frames, direction)
        walked = [t for c in chains for t in c.frames]
        assert len(walked) == len(set(walked))  # no frame is computed by two walks
        for c in chains:
            assert c.anchor in anchors and not set(c.frames) & set(anchors)
            # a walk goes frame by frame away from its anchor
            assert c.frames == [c.anchor + c.direction * (k + 1) for k in range(len(c.frames))]
        for t in frames:
            before = [a for a in anchors if a < t]
            after = [a for a in anchors if a > t]
            if direction == "forward" or not after:
                nearest = before[-1] if before and direction != "backward" else None
            elif direction == "backward" or not before:
                nearest = after[0]
            else:  # both: the nearer anchor, the earlier one on a tie
                nearest = before[-1] if t - before[-1] <= after[0] - t else after[0]
            want = owner(anchors, T, t, direction)
            assert want == nearest, (anchors, t, direction)
            got = [c.anchor for c in chains if t in c.frames]
            assert got == ([] if want is None else [want]), (anchors, t, direction)
        if direction == "both":
            assert set(walked) == frames  # every frame is reached
            for c in chains:  # ... from its nearest anchor (ties go forward)
                for t in c.frames:
                    assert abs(t - c.anchor) == min(abs(t - a) for a in anchors)
        # only the walks from `starts`, each cut after the last frame it must compute
        start = anchors[-1]
        some = {t for t in frames if owner(anchors, T, t, direction) == start}
        part = plan_walks(anchors, T, some, direction, starts={start})
        assert {t for c in part for t in c.frames} >= some and all(c.anchor == start for c in part)
        assert all(c.frames[-1] in some for c in part)


def test_walks_name_a_bad_direction_and_a_missing_anchor():
    from napari_leakseg.propagate.walks import plan_walks

    with pytest.raises(InputError, match="direction must be"):
        plan_walks([0], 5, {1, 2}, "sideways")
    with pytest.raises(InputError, match="no annotated or confirmed frame"):
        plan_walks([], 5, {1, 2}, "forward")


def test_a_rejected_confirmation_changes_nothing(data):
    """Labels a session cannot take raise and leave the frame, its status and the anchors' cell ids
    as they were: a frame wiped to background before the first run, a class the network has no output for."""
    stack, inst = data
    lab = np.zeros_like(inst)
    lab[0] = inst[0]
    sess = Propagator(stack, lab, annotated=[0], device=DEVICE, instances=True, **FAST)
    ids = sess._anchor_inst[0].copy()
    assert len(np.unique(ids)) == 3  # two cells
    with pytest.raises(InputError, match="only one class"):
        sess.confirm(0, np.zeros(stack.shape[1:], np.uint8))
    np.testing.assert_array_equal(sess._anchor_inst[0], ids)
    np.testing.assert_array_equal(sess.labels[0], inst[0] > 0)
    assert sess.status[0] == "annotated"

    sem = Propagator(stack, (lab > 0).astype(np.uint8), annotated=[0], device=DEVICE, **FAST)
    sem.run("forward")
    before = np.array(sem.labels[3])
    with pytest.raises(InputError, match="introduces class 2"):
        sem.confirm(3, np.where(inst[3] > 0, 2, 0).astype(np.uint8))
    assert sem.status[3] == "pseudo"
    np.testing.assert_array_equal(sem.labels[3], before)
