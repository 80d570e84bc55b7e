"""Corrections: which frames a resume recomputes, when it may stop, and which frame
the user should look at next.

A correction (a confirmed frame) becomes an anchor. The resume recomputes the frames
its walks reach — forward to the next anchor, backward to the middle of the gap in
*both* mode — and stops a walk as soon as it has produced ``converge`` frames equal
to the previous result (the correction no longer changes anything: what follows would
be recomputed to about the same labels by a noisier network); "equal" means agreeing
within half of the correction's own size (:func:`stop_tolerance`). A frame confirmed
as it was recomputes nothing. Frames out of its reach keep their labels, so a
correction cannot change, let alone worsen, frames it has no influence on. Within the
frames it recomputes, only the pixels its change can reach take the new result
(:func:`fuse_correction`); the rest of each frame keeps its previous result.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .common import ANCHOR, foreground_iou


def resume_frames(status: Sequence[str], t: int, direction: str = "both") -> list[int]:
    """Frames a resume from ``t`` recomputes: those between ``t`` and the next anchor
    in each direction (only forward/backward when asked)."""
    t = int(t)
    T = len(status)
    an = [a for a, s in enumerate(status) if s in ANCHOR and a != t]
    nxt = min([a for a in an if a > t], default=T)
    prv = max([a for a in an if a < t], default=-1)
    out = []
    if direction in ("forward", "both"):
        out += list(range(t + 1, nxt))
    if direction in ("backward", "both"):
        out += list(range(prv + 1, t))
    if status[t] not in ANCHOR:
        out.append(t)
    return sorted(out)


def edited_frames(status: Sequence[str], stored, current) -> list[int]:
    """Frames where ``current`` (e.g. the napari layer) differs from ``stored`` (the session's
    last result or anchor): the user painted there. A pending frame counts once anything is painted."""
    return [t for t in range(len(status))
            if not np.array_equal(np.asarray(current[t]), np.asarray(stored[t]))]


#: a confirmed frame that differs less than this from its previous result changes nothing
MIN_CHANGE = 0.01


def change(new: np.ndarray, old: np.ndarray) -> float:
    """How much confirming ``new`` over the previous result ``old`` changed the frame:
    1 − min(foreground IoU, fraction of pixels with the same class)."""
    new, old = np.asarray(new), np.asarray(old)
    if new.shape != old.shape:
        return 1.0
    return float(1.0 - min(foreground_iou(new, old), float(np.mean(new == old))))


def drop_slivers(cls: np.ndarray, sliver: int) -> np.ndarray:
    """``cls`` (an int map: -1 = no change, else the class a pixel changed to) without the
    changes thinner than ``sliver`` pixels: per class, a binary opening with a disk of that
    diameter. A boundary traced a pixel or two differently is such a sliver; a cell painted
    in or erased is not."""
    from scipy import ndimage as ndi

    cls = np.asarray(cls)
    sliver = int(sliver)
    changed = cls >= 0
    if sliver <= 1 or not changed.any():
        return cls
    r = sliver // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = yy ** 2 + xx ** 2 <= r * r + r
    keep = np.zeros_like(changed)
    for c in np.unique(cls[changed]):
        keep |= ndi.binary_opening(cls == c, structure=disk)
    return np.where(keep, cls, -1).astype(cls.dtype, copy=False)


def change_map(new: np.ndarray, old: np.ndarray, sliver: int = 0) -> np.ndarray:
    """What confirming ``new`` over ``old`` changed: for each changed pixel the class it was
    changed to, -1 elsewhere, without the changes thinner than ``sliver`` (:func:`drop_slivers`)."""
    new, old = np.asarray(new), np.asarray(old)
    return drop_slivers(np.where(new != old, new.astype(np.int16), np.int16(-1)), sliver)


def stop_tolerance(change_: float) -> float:
    """Agreement with the previous result at which a resume's walk stops: once the
    difference is below half of the correction itself (within [0.9, 0.99]) the
    correction's influence has faded into the walk's own noise."""
    return float(min(0.99, max(0.9, 1.0 - change_ / 2)))


def same_result(new: np.ndarray, old: np.ndarray, tol: float = 0.98) -> bool:
    """Whether a recomputed frame reproduces the previous result (foreground IoU ≥ tol
    and the same classes)."""
    new, old = np.asarray(new), np.asarray(old)
    if foreground_iou(new, old) < tol:
        return False
    return bool(np.mean(new == old) >= tol)


def suggest_frames(status: Sequence[str], uncertain: Sequence[float], disagreement: Sequence[float],
                   k: int = 1, spacing: int = 3) -> list[int]:
    """The ``k`` pseudo frames most worth correcting next: highest
    ``uncertain + disagreement`` (low confidence, or the network disagreeing with
    the previous frame's result), at least ``spacing`` frames from an anchor and from
    each other (a neighbour of an anchor is already well constrained)."""
    T = len(status)
    score = np.asarray(uncertain, float) + np.asarray(disagreement, float)
    anchors = [t for t, s in enumerate(status) if s in ANCHOR]
    picked: list[int] = []
    for t in np.argsort(-score, kind="stable"):
        t = int(t)
        if status[t] != "pseudo" or not np.isfinite(score[t]):
            continue
        if any(abs(t - a) < spacing for a in anchors + picked):
            continue
        picked.append(t)
        if len(picked) == k:
            break
    if len(picked) < k:  # short stacks: relax the spacing
        rest = [int(t) for t in np.argsort(-score, kind="stable")
                if status[int(t)] == "pseudo" and int(t) not in picked]
        picked += rest[: k - len(picked)]
    return picked[:k] if T else []


def grow(region: np.ndarray, reach: int) -> np.ndarray:
    """Where a change may have moved in one frame: ``region`` (an int map, -1 = no change,
    else the class the change is towards) spread by ``reach`` pixels (Euclidean), each
    pixel taking the class of the nearest changed pixel."""
    from scipy import ndimage as ndi

    region = np.asarray(region)
    none = region < 0
    if reach <= 0 or none.all():
        return region.copy()
    dist, (iy, ix) = ndi.distance_transform_edt(none, return_indices=True)
    return np.where(dist <= reach, region[iy, ix], -1)


def fuse_correction(new: np.ndarray, old: np.ndarray, region: np.ndarray, reach: int, sliver: int = 0):
    """Difference-aware fusion of a recomputed frame with its previous result (after
    Cheng et al., "Modular Interactive Video Object Segmentation", CVPR 2021).

    A correction is a local edit towards given classes: ``region`` holds, for each pixel
    it changed (in the corrected frame) or that its change still reaches (in the frames
    after it), the class it changed that pixel to (-1 elsewhere). The recomputed result
    ``new`` is taken only within ``region`` grown by ``reach`` pixels (how far a cell moves
    in one frame), and only where it makes the same kind of change: towards the class the
    user painted nearby (a deleted false positive can only shrink further on, a painted
    missing cell only grow). Everywhere else the previous result ``old`` is kept, so the
    re-trained network's noise cannot touch the rest of the frame. With ``sliver``, changes
    thinner than that (:func:`drop_slivers`) are not taken either: the re-trained network
    redrawing a boundary a pixel further in or out is as often wrong as right.

    Returns ``(labels, taken, region_next)``: the fused labels, where ``new`` was taken,
    and the region for the next frame (the pixels taken, with their class). An empty
    ``region_next`` (all -1) means the correction's influence has ended.
    """
    new, old = np.asarray(new), np.asarray(old)
    cls = grow(region, reach)
    taken = (cls >= 0) & (new == cls) & (new != old)
    if sliver > 1:
        taken = drop_slivers(np.where(taken, cls, -1), sliver) >= 0
    out = np.where(taken, new, old).astype(new.dtype, copy=False)
    return out, taken, np.where(taken, cls, -1)
