"""Corrections: which frames a resume recomputes, when it may stop, and which frame
the user should look at next.

A correction (a confirmed frame) becomes an anchor. The resume recomputes the frames
its walks reach — forward to the next anchor, backward to the middle of the gap in
*both* mode — and stops a walk as soon as it has produced ``converge`` frames equal
to the previous result (the correction no longer changes anything: what follows would
be recomputed to about the same labels by a noisier network); "equal" means agreeing
within half of the correction's own size (:func:`stop_tolerance`). A frame confirmed
as it was recomputes nothing. Frames out of its reach keep their labels, so a
correction cannot change, let alone worsen, frames it has no influence on.
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


#: a confirmed frame that differs less than this from its previous result changes nothing
MIN_CHANGE = 0.01


def change(new: np.ndarray, old: np.ndarray) -> float:
    """How much confirming ``new`` over the previous result ``old`` changed the frame:
    1 − min(foreground IoU, fraction of pixels with the same class)."""
    new, old = np.asarray(new), np.asarray(old)
    if new.shape != old.shape:
        return 1.0
    return float(1.0 - min(foreground_iou(new, old), float(np.mean(new == old))))


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
