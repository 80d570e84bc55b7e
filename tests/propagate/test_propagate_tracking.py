"""Tracked instances, link scores, corrections (suggestion, convergent resumes), the flow baseline."""

from __future__ import annotations

import numpy as np
import pytest

from napari_leakseg.propagate import (Propagator, foreground_iou, link_instances, link_scores, propagate_ids,
                                      track_instances)
from napari_leakseg.propagate.corrections import (change_map, drop_slivers, fuse_correction, same_result,
                                                  suggest_frames)
from napari_leakseg.propagate.flow import flow_propagate, warp_labels
from napari_leakseg.propagate.pseudo import follow_objects, frame_cues, fuse, one_hot

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


def test_fuse_correction_follows_the_change_near_it_and_in_its_direction():
    old = np.zeros((30, 40), np.uint8)
    old[12:16, 20:24] = 1  # an object the correction has nothing to do with
    new = old.copy()
    new[5:9, 5:9] = 1      # next to where the user painted class 1: taken
    new[20:25, 30:35] = 1  # far from it (re-trained network noise): ignored
    new[12:16, 20:24] = 0  # near it, but a change the other way (1 -> 0): ignored
    region = np.full(old.shape, -1, np.int16)
    region[10, 6] = 1      # the user painted class 1 here
    region[12, 18] = 1
    out, taken, left = fuse_correction(new, old, region, reach=6)
    assert out[5:9, 5:9].all() and out[20:25, 30:35].sum() == 0 and out[12:16, 20:24].all()
    assert taken.sum() == 16 and not taken[20, 30]
    assert np.array_equal(left >= 0, taken) and np.all(left[taken] == 1)
    # the new result agrees with the old one near the change: its influence has ended
    out, _, left = fuse_correction(old, old, region, reach=6)
    assert (left < 0).all() and np.array_equal(out, old)
    # a deletion (towards 0) removes only
    region[:] = -1
    region[14, 19] = 0
    out, taken, _ = fuse_correction(new, old, region, reach=6)
    assert not out[12:16, 20:24].any() and out[5:9, 5:9].sum() == 0 and taken.sum() == 16


def test_change_map_of_uint8_labels_marks_unchanged_pixels_minus_one():
    """Labels arrive as uint8: the change map must still say -1 (not 255) where nothing changed,
    or every pixel counts as changed and the correction's reach is never grown."""
    old = np.zeros((20, 20), np.uint8)
    new = old.copy()
    new[5:10, 5:10] = 1
    new[0, 0] = 2
    d = change_map(new, old)
    assert d.dtype == np.int16
    assert (d[5:10, 5:10] == 1).all() and d[0, 0] == 2
    assert (d >= 0).sum() == 26 and (d[12:, 12:] == -1).all()


def test_drop_slivers_keeps_painted_blobs_and_drops_retraced_boundaries():
    cls = np.full((60, 60), -1, np.int16)
    cls[5:20, 5:20] = 1                      # a missed cell painted in: kept
    cls[30:50, 30:32] = 0                    # a boundary moved in by 2 px: dropped
    cls[40:55, 5:17] = 0                     # a false positive erased: kept
    cls[25, 5:25] = 1                        # a 1-px line: dropped
    out = drop_slivers(cls, 7)
    # (an opening with a disk: a blob's sharp corners go, its body stays)
    assert (out[7:18, 7:18] == 1).all() and (out[5:20, 5:20] == 1).mean() > 0.9
    assert (out[42:53, 7:15] == 0).all() and (out[40:55, 5:17] == 0).mean() > 0.9
    assert (out[30:50, 30:32] == -1).all() and (out[25, 5:25] == -1).all()
    np.testing.assert_array_equal(drop_slivers(cls, 0), cls)
    # the same through change_map and fuse_correction
    old = np.zeros((60, 60), np.uint8)
    new = old.copy()
    new[5:20, 5:20] = 1
    new[25, 5:25] = 1
    d = change_map(new, old, sliver=7)
    assert (d[7:18, 7:18] == 1).all() and (d[25] == -1).all()
    region = np.full(old.shape, -1, np.int16)
    region[12, 12] = 1
    out, taken, _ = fuse_correction(new, old, region, reach=30, sliver=7)
    assert out[7:18, 7:18].all() and not out[25].any() and taken.sum() > 0.9 * 15 * 15
    out, taken, _ = fuse_correction(new, old, region, reach=30)
    assert out[25, 5:25].all()


def test_a_retraced_boundary_is_not_carried_to_other_frames():
    """A correction that only moves cell boundaries by a pixel (how two annotators differ) confirms
    its own frame and leaves every other frame as it was."""
    from scipy import ndimage as ndi

    from napari_leakseg.samples import timelapse

    stack, inst = timelapse(n_frames=7, shape=(80, 112), n_cells=4, seed=3)
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    sess = Propagator(stack, lab, device="cpu", instances=True, **{**FAST, "resume_steps": 10})
    assert sess.params.sliver == 7
    sess.run("forward")
    before = np.array(sess.labels, copy=True)
    fixed = ndi.binary_dilation(before[3] > 0).astype(np.uint8)  # every boundary one pixel out
    assert (fixed != before[3]).sum() > 50
    sess.resume(3, direction="forward", labels_t=fixed)
    np.testing.assert_array_equal(sess.labels[3], fixed)
    for t in (1, 2, 4, 5, 6):
        np.testing.assert_array_equal(sess.labels[t], before[t])


def test_a_correction_changes_other_frames_only_where_its_change_can_reach():
    """A resume after a real, local correction: each later frame may differ from its
    previous result only within ``reach`` pixels per frame of what the user changed;
    the rest of it (the re-trained network's noise) is kept as it was."""
    from scipy import ndimage as ndi

    from napari_leakseg.samples import timelapse

    stack, inst = timelapse(n_frames=9, shape=(80, 112), n_cells=4, seed=3)
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    reach = 5
    # (sliver=0: every change counts, however thin; slivers are tested below)
    sess = Propagator(stack, lab, device="cpu", instances=True, reach=reach, sliver=0,
                      **{**FAST, "resume_steps": 20})
    sess.run("forward")
    before = np.array(sess.labels, copy=True)
    fixed = (inst[3] > 0).astype(np.uint8)
    cell = inst[3] == np.unique(inst[3])[-1]
    fixed[cell] = 0  # the user deletes one cell (and the frame becomes its ground truth elsewhere)
    diff = fixed != before[3]
    assert diff.any()
    sess.resume(3, direction="forward", labels_t=fixed)
    done = sess.history[-1]["frames"]
    assert done and done[0] == 4
    dist = ndi.distance_transform_edt(~diff)
    assert any((sess.labels[t] != before[t]).any() for t in done)  # the correction did change something
    for t in range(4, 9):
        changed = sess.labels[t] != before[t]
        if t not in done:
            assert not changed.any()
            continue
        assert np.all(dist[changed] <= reach * (t - 3) + 1e-6), t
    for t in range(3):
        np.testing.assert_array_equal(sess.labels[t], before[t])
    # reach 0 keeps the old behaviour: the walk recomputes whole frames
    sess0 = Propagator(stack, lab, device="cpu", instances=True, reach=0, **{**FAST, "resume_steps": 20})
    sess0.run("forward")
    sess0.resume(3, direction="forward", labels_t=fixed)
    assert sess0.history[-1]["frames"][0] == 4


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


def test_follow_objects_keeps_the_lineage_of_the_annotated_objects():
    kept_prev = np.zeros((20, 30), bool)
    kept_prev[2:8, 2:8] = True  # a followed cell
    dropped_prev = np.zeros_like(kept_prev)
    dropped_prev[12:18, 20:26] = True  # an object left out before
    lab = np.zeros((20, 30), np.uint8)
    lab[3:9, 3:9] = 1  # the followed cell moved by one pixel
    lab[12:18, 21:27] = 1  # the left-out object moved
    lab[12:18, 8:14] = 2  # an object (of class 2) that appears from nowhere
    out, kept, dropped = follow_objects(lab, kept_prev, dropped_prev)
    assert out[5, 5] == 1 and kept[5, 5]
    assert out[15, 23] == 0 and dropped[15, 23]  # stays left out along its own line
    assert out[15, 10] == 0 and dropped[15, 10]  # new: left out
    assert not (kept & dropped).any() and ((kept | dropped) == (lab > 0)).all()
    # a followed cell that touches a left-out object: the one it overlaps more decides
    lab2 = np.zeros_like(lab)
    lab2[3:9, 3:20] = 1
    out2, _, _ = follow_objects(lab2, kept, dropped)
    assert out2[5, 15] == 1
    np.testing.assert_array_equal(follow_objects(np.zeros_like(lab), kept, dropped)[0], 0)


def entering_cell(T=8, shape=(48, 64), seed=0, hide_a=()):
    """Cell A (annotated in frame 0) drifts right; cell B, identical, enters from the right border at frame 3.
    In the frames ``hide_a`` cell A is not in the image (nor in the truth)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    stack = np.zeros((T,) + shape, np.float32)
    inst = np.zeros((T,) + shape, np.int32)
    for t in range(T):
        img = 0.3 + rng.normal(0, 0.03, shape)
        for i, (cy, cx) in enumerate([(14, 12 + t), (34, 80 - 4 * t)]):
            if i == 0 and t in hide_a:
                continue
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
            img[m] += 0.45
            inst[t][m] = i + 1
        stack[t] = img
    return stack, inst


def test_follow_leaves_an_entering_cell_out_until_the_user_labels_it():
    stack, inst = entering_cell()
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    assert (inst[2] == 2).sum() == 0 and (inst[3] == 2).sum() > 20  # B is in the field from frame 3
    free = Propagator(stack, lab, device="cpu", instances=True, follow=False, **FAST)
    free.run("forward")
    sess = Propagator(stack, lab, device="cpu", instances=True, **FAST)
    assert sess.follows and not Propagator(stack, lab > 0, device="cpu", **FAST).follows
    sess.run("forward")
    for t in range(4, 8):
        b = inst[t] == 2
        assert free.labels[t][b].mean() > 0.8  # the network finds B...
        assert sess.labels[t][b].mean() < 0.05  # ...but following the annotation leaves it out
        assert foreground_iou(sess.labels[t], inst[t] == 1) > 0.8  # A is followed
    # the user labels B in frame 4 and resumes: from there B is followed too
    before = np.array(sess.labels, copy=True)
    sess.resume(4, direction="forward", labels_t=inst[4])
    b_found = [sess.labels[t][inst[t] == 2].mean() for t in range(5, 8)]
    assert min(b_found) > 0.5 and np.mean(b_found) > 0.8  # (frame 5 of this tiny network is its worst)
    assert np.mean([foreground_iou(sess.labels[t], inst[t] > 0) for t in range(5, 8)]) > 0.8
    np.testing.assert_array_equal(sess.labels[:4], before[:4])  # frames before the correction are untouched
    ids = sess.instances(min_size=10)
    assert len(np.unique(ids[6])) == 3  # background + A + B, each with its own id


def test_a_deletion_fixes_its_frame_and_does_not_unfollow_the_cell_further_on():
    """A cell half out of the field may be deleted in one frame and wanted again later: a correction's
    walk keeps following what the correction deleted wherever the re-trained network still finds it."""
    stack, inst = entering_cell()
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    sess = Propagator(stack, lab, device="cpu", instances=True, **FAST)
    sess.run("forward")
    a_before = [sess.labels[t][inst[t] == 1].mean() for t in range(4, 8)]
    assert min(a_before) > 0.8
    sess.resume(3, direction="forward", labels_t=np.zeros_like(inst[3]))  # A deleted in frame 3
    assert not sess.labels[3].any()
    a_after = [sess.labels[t][inst[t] == 1].mean() for t in range(4, 8)]
    assert min(a_after) > 0.8, a_after


def test_a_followed_cell_missed_in_one_frame_is_picked_up_again():
    stack, inst = entering_cell(hide_a=(3,))  # A vanishes from frame 3 only (the network finds nothing there)
    lab = np.zeros(inst.shape, np.uint16)
    lab[0] = inst[0]
    sess = Propagator(stack, lab, device="cpu", instances=True, **FAST)
    sess.run("forward")
    assert sess.labels[3][inst[2] == 1].mean() < 0.05
    for t in range(4, 8):  # linked to frame 2 through the 3-frame memory
        assert sess.labels[t][inst[t] == 1].mean() > 0.8
