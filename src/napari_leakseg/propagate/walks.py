"""Which frames each walk covers: the walks from the anchors (annotated and confirmed
frames) that reach a set of frames, and which anchor's walk owns a frame.

Forward, a walk goes from an anchor up to the next one; backward, down to the previous
one. In *both* mode the gap between two anchors is split at its middle: the first half
belongs to the walk forward from the earlier anchor, the second half to the walk
backward from the later one (the extra frame of an odd gap goes forward).
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..core.errors import InputError
from .common import Chain

DIRECTIONS = ("forward", "backward", "both")


def plan_walks(anchors: Sequence[int], n_frames: int, frames: set[int], direction: str,
               starts: Optional[set] = None) -> list[Chain]:
    """The walks from ``anchors`` (sorted) that cover ``frames`` (non-anchor frames), each
    cut after the last frame it must compute; with ``starts``, only the walks from those anchors."""
    if not anchors:
        raise InputError("no annotated or confirmed frame to propagate from")
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be forward, backward or both, not {direction!r}")
    chains: list[Chain] = []
    bounds = [-1, *anchors, n_frames]
    for i in range(1, len(bounds) - 1):
        a = bounds[i]
        if starts is not None and a not in starts:
            continue
        prev_a, next_a = bounds[i - 1], bounds[i + 1]
        fwd = list(range(a + 1, next_a))
        bwd = list(range(a - 1, prev_a, -1))
        if direction == "both":
            if next_a < n_frames:  # gap shared with the next anchor: split at the middle
                fwd = fwd[: (len(fwd) + 1) // 2]
            if prev_a >= 0:
                bwd = bwd[: len(bwd) // 2]
        elif direction == "forward":
            bwd = []
        else:
            fwd = []
        for seq, d in ((fwd, 1), (bwd, -1)):
            # the chain walks from the anchor up to the last frame it must recompute
            need = [k for k, t in enumerate(seq) if t in frames]
            if need:
                chains.append(Chain(a, seq[: need[-1] + 1], d))
    return chains


def owner(anchors: Sequence[int], n_frames: int, f: int, direction: str) -> Optional[int]:
    """The anchor whose walk computes frame ``f`` (a non-anchor frame): the walk
    :func:`plan_walks` sends through it; None when no walk reaches it."""
    chains = plan_walks(anchors, n_frames, {int(f)}, direction)
    return chains[0].anchor if chains else None
