"""The user's annotations, checked: which frames of a label stack are annotated, and one
frame's labels as the classes the network learns (cell vs background in instance mode).

Bad input raises :class:`~napari_leakseg.core.errors.InputError` naming the problem and
the frame, before a session stores anything.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.labels import check_labels, smallest_uint
from .common import MAX_CLASSES


def annotated_frames(labels, shape: tuple[int, int, int], annotated: Optional[Sequence[int]] = None) -> list[int]:
    """The annotated frames of a T×Y×X label stack matching the image stack's ``shape``:
    ``annotated`` checked and sorted, or (None) the frames with any nonzero label."""
    T, Y, X = shape
    lshape = tuple(getattr(labels, "shape", np.shape(labels)))
    if len(lshape) != 3:
        raise InputError(f"the label stack must be T×Y×X like the image {shape}; got shape {lshape}")
    if lshape[0] != T:
        raise InputError(f"the label stack has {lshape[0]} frames but the image stack has {T}; they must match")
    if lshape[1:] != (Y, X):
        raise InputError(
            f"label frames have shape {lshape[1]}×{lshape[2]} but image frames have shape {Y}×{X}; they must match"
        )
    if annotated is None:
        annotated = [t for t in range(T) if np.any(np.asarray(labels[t]))]
    else:
        annotated = sorted({int(t) for t in annotated})
        bad = [t for t in annotated if not (0 <= t < T)]
        if bad:
            raise InputError(f"annotated frame(s) {bad} are outside the stack (0..{T - 1})")
    if not annotated:
        raise InputError("no annotated frame: paint labels on at least one frame (or pass --frames)")
    return annotated


def frame_classes(lab, t: int, frame_shape: tuple[int, int], instances: bool,
                  need_two: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t``'s labels checked: (the classes to learn, as the smallest unsigned dtype; the
    labels as given). In instance mode every cell id becomes class 1. ``need_two``: the frame
    must hold background and at least one object class."""
    given = check_labels(lab, frame_shape, name=f"labels of frame {t}")
    lab = (given > 0).astype(np.uint8) if instances else given
    ids = np.unique(lab)
    if ids.size < 2 and need_two:
        raise InputError(
            f"frame {t} has only one class (label {int(ids[0])}); an annotated frame needs "
            "background (0) and at least one object class"
        )
    if ids.max() >= MAX_CLASSES:
        raise InputError(
            f"frame {t} has label values up to {int(ids.max())}; semantic mode supports at most "
            f"{MAX_CLASSES - 1} classes (for instance masks use instance mode / --instances)"
        )
    return smallest_uint(lab), np.asarray(given)
