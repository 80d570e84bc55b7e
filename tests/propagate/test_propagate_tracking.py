"""Tracked instances, link scores, corrections (suggestion, convergent resumes), the flow baseline."""

from __future__ import annotations

import numpy as np
import pytest

from napari_leakseg.propagate import (Propagator, foreground_iou, link_instances, link_scores, propagate_ids,
                                      track_instances)
from napari_leakseg.propagate.corrections import same_result, suggest_frames
from napari_leakseg.propagate.flow import flow_propagate, warp_labels
from napari_leakseg.propagate.pseudo import frame_cues, fuse, one_hot

FAST = dict(downsample=1, base=8, depth=2, init_steps=60, steps=2, resume_steps=10,
            patch=32, batch=2, lr=3e-3, window=2, seed=0)


def touching_cells(T=6, shape=(40, 60)):
    """Two disks that touch from frame 2 on (one moves towards the other): instance GT."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros((T,) + shape, np.int32)
    for t in range(T):
        for i, (cy, cx) in enumerate([(20, 18 + 2 * t), (20, 42)]):
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < 100
            inst[t][m & (inst[t] == 0)] = i + 1
    return inst


def test_tracking_keeps_touching_cells_apart_with_the_annotation_ids():
    gt = touching_cells()
    ann = np.where(gt[0] == 1, 7, np.where(gt[0] == 2, 3, 0))  # the user's ids: 7 and 3
    tracked = track_instances(gt > 0, {0: ann}, min_size=10)
    merged = link_instances(gt > 0, min_size=10)  # per-frame connected components
    assert len(np.unique(merged[-1])) == 2  # the two cells became one component...
    for t in range(len(gt)):  # ...but the tracker keeps both, each with its annotated id
        assert set(np.unique(tracked[t])) == {0, 3, 7}
        assert np.bincount(tracked[t][gt[t] == 1]).argmax() == 7
        assert np.bincount(tracked[t][gt[t] == 2]).argmax() == 3
    assert link_scores(gt, tracked)["links_correct"] == 1.0
    assert link_scores(gt, merged)["links_correct"] < 0.7


def test_new_cells_get_new_ids_and_scores_count_swaps():
    prev = np.zeros((20, 20), np.int32)
    prev[2:8, 2:8] = 4
    fg = np.zeros((20, 20), bool)
    fg[3:9, 3:9] = True
    fg[12:18, 12:18] = True  # a cell entering
    out, nxt = propagate_ids(prev, fg, next_id=5, min_size=5)
    assert out[5, 5] == 4 and out[15, 15] == 5 and nxt == 6
    gt = np.stack([prev, prev])
    swapped = np.stack([prev, np.where(prev > 0, 9, 0)])
    assert link_scores(gt, gt)["links_correct"] == 1.0
    assert link_scores(gt, swapped) == {"links_correct": 0.0, "links": 1}


def test_fuse_cues_and_suggestions():
    net = np.stack([np.full((4, 4), 0.4), np.full((4, 4), 0.6)])
    prior = one_hot(np.zeros((4, 4), int), 2)
    fused = fuse(net, prior, 0.5)
    np.testing.assert_allclose(fused[0], 0.7)  # the confident previous result wins where the net hesitates
    np.testing.assert_array_equal(fuse(net, None, 0.5), net)
    cues = frame_cues(net, prior, tau=0.9)
    assert cues["disagreement"] == 1.0 and cues["uncertain"] == 1.0
    status = ["annotated"] + ["pseudo"] * 9
    unc = np.zeros(10)
    unc[[1, 5, 6]] = [0.9, 0.5, 0.4]  # frame 1 is next to the anchor; 6 next to 5
    assert suggest_frames(status, unc, np.zeros(10), k=2) == [5, 8]
    assert suggest_frames(status, unc, np.zeros(10), k=1, spacing=1) == [1]
    a = np.zeros((8, 8), np.uint8)
    assert same_result(a, a) and not same_result(a + 1, a)


def test_correction_that_changes_nothing_stops_early_and_touches_nothing_else():
    from napari_leakseg.samples import timelapse

    stack, inst = timelapse(n_frames=10, shape=(48, 48), n_cells=2, seed=0)
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    sess = Propagator(stack, lab, device="cpu", instances=True, converge=2, prior=0.3,
                      **{**FAST, "resume_steps": 0})
    sess.run("forward")
    before = np.array(sess.labels, copy=True)
    picks = sess.suggest(2)
    assert len(picks) == 2 and all(sess.status[t] == "pseudo" for t in picks)
    # the user confirms frame 3 as it is: nothing to recompute, nothing changes
    sess.resume(3, direction="forward", labels_t=before[3])
    assert sess.history[-1]["frames"] == [] and sess.change[3] == 0.0
    np.testing.assert_array_equal(sess.labels, before)
    # a small correction: its walk stops once it agrees with the old result again
    fixed = before[3].copy()
    ys, xs = np.nonzero(fixed)
    fixed[ys[:20], xs[:20]] = 0  # trim a cell's top
    sess.resume(3, direction="forward", labels_t=fixed)
    assert 0 < sess.change[3] < 0.2
    done = sess.history[-1]["frames"]
    assert done[0] == 4 and done == list(range(4, 4 + len(done)))
    for t in (0, 1, 2):
        np.testing.assert_array_equal(sess.labels[t], before[t])
    # a real correction: frames after it are recomputed from it, the annotation's ids are kept
    sess.resume(6, direction="forward", labels_t=inst[6])
    ids = sess.instances(min_size=5)
    assert set(np.unique(ids[0])) == set(np.unique(inst[0]))
    assert foreground_iou(sess.labels[7], inst[7]) > 0.7


def test_flow_baseline_follows_a_moving_cell():
    pytest.importorskip("skimage")
    yy, xx = np.mgrid[:48, :48]
    stack = np.zeros((4, 48, 48), np.float32)
    gt = np.zeros((4, 48, 48), np.int32)
    for t in range(4):
        m = (yy - 24) ** 2 + (xx - 14 - 3 * t) ** 2 < 64
        stack[t] = np.where(m, 1.0, 0.1) + 0.02 * np.sin(xx / 3.0 + yy / 5.0)
        gt[t][m] = 1
    out = flow_propagate(stack, {0: gt[0]}, direction="forward", downsample=1)
    assert foreground_iou(out[3], gt[3]) > foreground_iou(gt[0], gt[3]) + 0.2
    shift = np.zeros((2, 48, 48), np.float32)
    shift[1] = -3  # target[y, x] = source[y, x - 3]
    np.testing.assert_array_equal(warp_labels(gt[0], shift)[:, 3:], gt[0][:, :-3])
