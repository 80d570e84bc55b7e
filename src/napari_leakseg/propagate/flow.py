"""The optical-flow baseline: warp the previous frame's labels to the next frame
(``skimage.registration.optical_flow_tvl1``), starting from the nearest anchor.

This is what a user without a learned model would do; the benchmark runs it beside
``ours``. The flow is computed on normalised frames at 1/``downsample`` resolution
(cells are large and move a few pixels per frame) and upsampled.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..core.jobs import Progress, run_job
from ..core.normalize import normalize, percentile_range
from .common import down_image, frame


def _norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return normalize(x, lohi=percentile_range(x, 1.0, 99.8))


def tvl1_flow(target: np.ndarray, source: np.ndarray, downsample: int = 4, **kw) -> np.ndarray:
    """Flow (2, Y, X) such that ``source[y + v, x + u] ≈ target[y, x]`` (full-resolution pixels)."""
    from skimage.registration import optical_flow_tvl1

    a, b = down_image(_norm(target), downsample), down_image(_norm(source), downsample)
    v, u = optical_flow_tvl1(a, b, **kw)
    fl = torch.from_numpy(np.stack([v, u]).astype(np.float32))[None] * downsample
    Y, X = target.shape
    return F.interpolate(fl, size=(Y, X), mode="bilinear", align_corners=False)[0].numpy()


def warp_labels(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Nearest-neighbour warp of a label map by a flow from :func:`tvl1_flow`."""
    Y, X = labels.shape
    yy, xx = np.mgrid[:Y, :X]
    sy = np.clip(np.rint(yy + flow[0]), 0, Y - 1).astype(np.intp)
    sx = np.clip(np.rint(xx + flow[1]), 0, X - 1).astype(np.intp)
    return np.asarray(labels)[sy, sx]


def iter_flow_propagate(stack, anchors: Mapping[int, np.ndarray], direction: str = "both",
                        downsample: int = 4, cache: Optional[dict] = None, **kw):
    """Job generator: every frame gets the labels of the nearest anchor (in ``direction``),
    warped frame by frame along the TV-L1 flow. ``cache`` (a dict) keeps flows between
    calls, keyed ``(target, source)``. Returns the T×Y×X label stack."""
    T = stack.shape[0]
    an = sorted(int(a) for a in anchors)
    out = np.zeros(stack.shape, np.asarray(next(iter(anchors.values()))).dtype)
    cache = {} if cache is None else cache
    owner = {}
    for t in range(T):
        if t in anchors:
            continue
        before = [a for a in an if a < t]
        after = [a for a in an if a > t]
        cand = []
        if direction in ("forward", "both") and before:
            cand.append((t - before[-1], before[-1]))
        if direction in ("backward", "both") and after:
            cand.append((after[0] - t, after[0]))
        if cand:
            owner[t] = min(cand)[1]
    for a in an:
        out[a] = anchors[a]
    done = 0
    for a in an:
        for d in (1, -1):
            prev, t = np.asarray(anchors[a]), a + d
            while 0 <= t < T and owner.get(t) == a:
                key = (t, t - d)
                if key not in cache:
                    cache[key] = tvl1_flow(frame(stack, t), frame(stack, t - d), downsample, **kw)
                prev = warp_labels(prev, cache[key])
                out[t] = prev
                done += 1
                yield Progress(done, len(owner), f"flow: frame {t}")
                t += d
    return out


def flow_propagate(stack, anchors, **kw) -> np.ndarray:
    return run_job(iter_flow_propagate(stack, anchors, **kw)).value
