"""One tiling helper: overlapping tiles with smooth blending, in bounded memory.

``iter_tiled(fn, image, ...)`` is a job generator (see ``core.jobs``): it yields a
``Progress`` per tile and returns the blended output. ``predict_tiled`` runs it.

* ``image`` is any (C, Y, X) array-like that supports slicing: numpy, zarr or
  dask. Only one tile is read at a time.
* ``fn(tile)`` maps a float32 (C, h, w) numpy tile to a (C_out, h, w) numpy
  array (an image, or logits/probabilities).
* Tiles overlap by ``overlap`` pixels and are blended with a raised-cosine ramp
  that is only applied on sides that touch another tile, so an image that fits
  in one tile gives exactly ``fn(image)``.
* Output rows are flushed to ``out`` (numpy, zarr, anything sliceable) as soon
  as no later tile touches them, so memory is O(C_out · tile · X), not O(image).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .jobs import Progress, run_job


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``n`` with at least ``overlap``."""
    if n <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def _ramp(length: int, ramp: int, left: bool, right: bool) -> np.ndarray:
    w = np.ones(length, np.float32)
    r = min(ramp, length // 2)
    if r > 0:
        edge = np.sin(0.5 * np.pi * (np.arange(r, dtype=np.float32) + 0.5) / r) ** 2
        if left:
            w[:r] = edge
        if right:
            w[length - r:] = edge[::-1]
    return w


def check_tile(tile, overlap: int = 0, minimum: int = 1) -> tuple[int, int]:
    """``tile`` (an int or (h, w)) as whole numbers of at least ``minimum`` pixels, and a
    non-negative ``overlap``; raises ``InputError`` naming the bad value."""
    from .errors import InputError

    th, tw = (tile, tile) if np.isscalar(tile) else tuple(tile)
    for v in (th, tw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
            raise InputError(f"tile size must be a whole number of at least {minimum} pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or int(overlap) < 0:
        raise InputError(f"tile overlap must be a whole number of pixels ≥ 0, got {overlap!r}")
    return int(th), int(tw)


def iter_tiled(
    fn: Callable[[np.ndarray], np.ndarray],
    image,
    tile: int | tuple[int, int] = 256,
    overlap: int = 32,
    out=None,
    out_channels: Optional[int] = None,
    out_dtype=np.float32,
    preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
):
    """Tiled, blended application of ``fn``; a job generator returning the output array.

    ``out``: optional pre-allocated (C_out, Y, X) array-like to write into (e.g. a
    zarr array); otherwise a numpy array is created. ``preprocess`` is applied to
    each raw tile (e.g. normalisation with global percentiles).
    """
    if getattr(image, "ndim", None) != 3:
        raise ValueError(f"iter_tiled expects (C, Y, X); got shape {getattr(image, 'shape', None)}")
    _, Y, X = image.shape
    th, tw = check_tile(tile, overlap)
    th, tw = min(th, Y), min(tw, X)
    ys, xs = tile_starts(Y, th, overlap), tile_starts(X, tw, overlap)
    total = len(ys) * len(xs)
    acc = wacc = None  # accumulators for rows [row0, row0 + acc.shape[1])
    row0 = 0
    k = 0
    for iy, y in enumerate(ys):
        wy = _ramp(th, overlap, iy > 0, iy < len(ys) - 1)
        for ix, x in enumerate(xs):
            raw = np.asarray(image[:, y:y + th, x:x + tw])
            inp = preprocess(raw) if preprocess is not None else raw.astype(np.float32, copy=False)
            res = np.asarray(fn(inp), dtype=np.float32)
            if res.ndim == 2:
                res = res[None]
            if res.shape[1:] != (th, tw):
                raise ValueError(f"fn returned shape {res.shape} for a tile of {(th, tw)}")
            if out is None and out_channels is None:
                out_channels = res.shape[0]
            if out is None:
                out = np.zeros((out_channels, Y, X), dtype=out_dtype)
            if acc is None:
                acc = np.zeros((res.shape[0], th, X), np.float32)
                wacc = np.zeros((th, X), np.float32)
            need = y + th - row0
            if acc.shape[1] < need:  # grow the band
                pad = need - acc.shape[1]
                acc = np.concatenate([acc, np.zeros((acc.shape[0], pad, X), np.float32)], 1)
                wacc = np.concatenate([wacc, np.zeros((pad, X), np.float32)], 0)
            w = wy[:, None] * _ramp(tw, overlap, ix > 0, ix < len(xs) - 1)[None, :]
            acc[:, y - row0:y - row0 + th, x:x + tw] += res * w
            wacc[y - row0:y - row0 + th, x:x + tw] += w
            k += 1
            yield Progress(k, total, f"tile {k}/{total}")
        # rows before the next tile row's start are final
        done = (ys[iy + 1] if iy + 1 < len(ys) else Y) - row0
        blended = acc[:, :done] / np.maximum(wacc[:done], 1e-12)
        out[:, row0:row0 + done, :] = blended.astype(out_dtype, copy=False)
        acc, wacc = acc[:, done:].copy(), wacc[done:].copy()
        row0 += done
    return out


def predict_tiled(fn, image, tile=256, overlap=32, **kw):
    """Run :func:`iter_tiled` to completion and return the output."""
    return run_job(iter_tiled(fn, image, tile=tile, overlap=overlap, **kw)).value


def pad_to_multiple(x: np.ndarray, multiple: int, mode: str = "reflect") -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes of ``x`` up to a multiple; returns the padded array and (Y, X)."""
    Y, X = x.shape[-2:]
    py, px = (-Y) % multiple, (-X) % multiple
    if py == 0 and px == 0:
        return x, (Y, X)
    if mode == "reflect" and (py >= Y or px >= X):
        mode = "edge"
    pad = [(0, 0)] * (x.ndim - 2) + [(0, py), (0, px)]
    return np.pad(x, pad, mode=mode), (Y, X)
