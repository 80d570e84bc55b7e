"""Label-map conventions: 0 = unlabeled/background, 1..K = classes."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def check_labels(lab, image_shape: tuple | None = None, name: str = "labels",
                 max_id: int | None = None) -> np.ndarray:
    """Validate a label/scribble array and return it as a non-negative integer array.

    Rejects float labels with fractional values, negative ids, ids above
    ``max_id`` and shapes that differ from ``image_shape`` (spatial part).
    """
    a = np.asarray(lab)
    if a.size == 0:
        raise InputError(f"{name} is empty (shape {a.shape})")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError(f"{name} contains NaN or Inf; labels must be integers")
        if not np.all(a == np.round(a)):
            raise InputError(f"{name} has non-integer (float) values; labels must be integer ids")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise InputError(f"{name} has unsupported dtype {a.dtype}; labels must be integers")
    if image_shape is not None and tuple(a.shape) != tuple(image_shape):
        raise InputError(
            f"{name} shape {tuple(a.shape)} does not match the image shape {tuple(image_shape)}"
        )
    if a.dtype.kind == "i" and a.min() < 0:
        raise InputError(f"{name} has negative ids (min {int(a.min())}); ids must be ≥ 0")
    if max_id is not None and a.max() > max_id:
        raise InputError(f"{name} has ids up to {int(a.max())}; at most {max_id} are supported")
    return a


def compact(lab: np.ndarray, keep: int = 0) -> np.ndarray:
    """Relabel ids to be consecutive, preserving ids 1..keep and 0.

    Ids ``1..keep`` (e.g. scribble classes) stay as they are; every other nonzero
    id is renumbered to ``keep+1, keep+2, ...`` in increasing order.
    """
    lab = np.asarray(lab)
    ids = np.unique(lab)
    lut_ids = ids[ids > keep]
    out = lab.astype(np.int64, copy=True)
    if lut_ids.size:
        new = np.arange(keep + 1, keep + 1 + lut_ids.size)
        idx = np.searchsorted(lut_ids, lab[lab > keep])
        out[lab > keep] = new[idx]
    return smallest_uint(out)


def smallest_uint(a: np.ndarray) -> np.ndarray:
    m = int(a.max()) if a.size else 0
    for dt in (np.uint8, np.uint16, np.uint32):
        if m <= np.iinfo(dt).max:
            return a.astype(dt, copy=False)
    return a.astype(np.uint64, copy=False)
