"""Pseudo-labels: the network's prediction fused with the previous frame's result,
kept where confident, and a few frame-level cues of where the walk is unsure."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .common import Sample


def one_hot(lab: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, y, x) float32 one-hot of a label map (values ≥ K count as background)."""
    lab = np.asarray(lab)
    out = np.zeros((n_classes,) + lab.shape, np.float32)
    for k in range(n_classes):
        out[k] = lab == k
    return out


def fuse(prob: np.ndarray, prior: Optional[np.ndarray], weight: float) -> np.ndarray:
    """``(1 - weight)·prob + weight·prior``: the previous frame's result as a prior.

    Cells move little between frames, so the previous result is a strong guess
    where the network hesitates; where the network is sure it wins.
    """
    if prior is None or weight <= 0 or prior.shape != prob.shape:
        return prob
    return (1.0 - weight) * prob + weight * prior


def pseudo_sample(t: int, img_ds: np.ndarray, prob: np.ndarray, tau: float,
                  target: Optional[np.ndarray] = None, conf: Optional[np.ndarray] = None) -> Sample:
    """A training sample from a propagated frame: the argmax (or ``target``) where the
    confidence (``prob``'s maximum, or ``conf``) is ≥ ``tau``, ignored (-1) elsewhere,
    weighted by the confidence."""
    conf = prob.max(0) if conf is None else np.asarray(conf)
    tgt = np.argmax(prob, 0).astype(np.int64) if target is None else np.asarray(target).astype(np.int64)
    tgt = np.where(conf >= tau, tgt, -1)
    return Sample(int(t), img_ds, tgt, conf.astype(np.float32), False)


def frame_cues(prob_net: np.ndarray, prior: Optional[np.ndarray], tau: float) -> dict:
    """Per-frame cues for suggesting corrections.

    ``uncertain``: the fraction of the (predicted or previous) foreground where the
    network's confidence is below ``tau``; ``disagreement``: 1 − foreground IoU of
    the network's own prediction and the previous frame's result.
    """
    fg = np.argmax(prob_net, 0) > 0
    low = prob_net.max(0) < tau
    out = {"uncertain": 0.0, "disagreement": 0.0}
    if prior is not None and prior.shape == prob_net.shape:
        pf = np.argmax(prior, 0) > 0
        union = (fg | pf).sum()
        out["disagreement"] = float(1.0 - (fg & pf).sum() / union) if union else 0.0
        fg = fg | pf
    area = max(int(fg.sum()), 1)
    out["uncertain"] = float((low & (fg | low)).sum() / area)
    return out


def follow_objects(lab: np.ndarray, kept_prev: np.ndarray, dropped_prev: np.ndarray):
    """Keep the objects the walk follows: those linked to the previous frame's kept objects.

    An object (a connected component of ``lab > 0``) is kept when it overlaps the
    previous frame's kept foreground at least as much as the foreground dropped there;
    one that overlaps neither (a cell entering the field, debris, a structure the
    annotation left out) is dropped and stays dropped along its own line, until a
    frame where the user labels it. Cells move a few pixels per frame, so a followed
    cell always overlaps itself in the previous frame; a dividing cell's daughters
    both overlap their mother.

    Returns ``(labels, kept, dropped)``: the labels with dropped objects set to
    background, and the kept and dropped foreground masks (for the next frame).
    """
    from scipy import ndimage as ndi

    fg = np.asarray(lab) > 0
    cc, n = ndi.label(fg)
    if n == 0:
        return lab, fg, np.zeros_like(fg)
    idx = np.arange(1, n + 1)
    on_kept = np.asarray(ndi.sum(kept_prev, cc, idx))
    on_dropped = np.asarray(ndi.sum(dropped_prev, cc, idx))
    keep = np.concatenate([[False], (on_kept > 0) & (on_kept >= on_dropped)])[cc]
    return np.where(keep, lab, 0).astype(lab.dtype), keep, fg & ~keep


#: a followed object is linked to the kept objects of this many previous frames (a cell the network
#: misses in one or two frames is picked up again)
FOLLOW_MEMORY = 3


class Follow:
    """The objects one walk follows, frame after frame (:func:`follow_objects` with a memory).

    ``follow(lab)`` drops the objects of a frame that are not linked to the objects kept in the
    last :data:`FOLLOW_MEMORY` frames (what the walk dropped stays dropped); ``advance(final)``
    records the frame's final labels and returns the dropped foreground that stayed background
    in them.
    """

    def __init__(self, kept: np.ndarray, memory: int = FOLLOW_MEMORY):
        kept = np.asarray(kept, bool)
        self.recent, self.memory = [kept], int(memory)
        self.dropped = np.zeros_like(kept)
        self._pending = self.dropped

    def __call__(self, lab: np.ndarray) -> np.ndarray:
        out, _, self._pending = follow_objects(lab, np.logical_or.reduce(self.recent), self.dropped)
        return out

    def advance(self, final: np.ndarray) -> np.ndarray:
        final = np.asarray(final)
        self.dropped = self._pending & (final == 0)
        self.recent = (self.recent + [final > 0])[-self.memory:]
        return self.dropped
