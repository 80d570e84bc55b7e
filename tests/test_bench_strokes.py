"""The benchmark's simulated strokes keep their spec (30-60 px skeleton pieces) on thin membranes."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
scribble_domains = pytest.importorskip("scribble_domains")


def _membrane_grid(size=200, step=50, width=4, blob=6):
    """4 px wide membrane lines on a grid, with thick (2·blob px) spots where they cross: erosion by 2 px
    leaves only the spots, as on FIB-SEM membranes."""
    mem = np.zeros((size, size), bool)
    for c in range(step // 2, size, step):
        mem[:, c - width // 2:c + width // 2] = True
        mem[c - width // 2:c + width // 2, :] = True
    yy, xx = np.mgrid[:size, :size]
    for cy in range(step // 2, size, step):
        for cx in range(step // 2, size, step):
            mem |= (yy - cy) ** 2 + (xx - cx) ** 2 <= blob ** 2
    return mem


def test_strokes_follow_thin_membranes():
    from skimage.morphology import skeletonize

    mem = _membrane_grid()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        taken = np.zeros_like(mem)
        for _ in range(4):
            s = scribble_domains._stroke(mem, rng, taken)
            assert s.any() and not (s & ~mem).any()  # on the membrane only
            # a piece along the membrane, not a tick on a thick spot: 30-60 px walked, of which the
            # skeleton of the 3 px wide stroke keeps at least 25 (it loses a pixel or two at the ends)
            length = int(skeletonize(s).sum())
            assert length >= 25, length
            taken |= s


def test_strokes_in_large_regions_keep_off_the_boundary():
    from scipy import ndimage as ndi

    region = np.zeros((120, 120), bool)
    region[20:100, 20:100] = True
    rng = np.random.default_rng(0)
    s = scribble_domains._stroke(region, rng, np.zeros_like(region))
    assert s.any() and not (s & ~ndi.binary_erosion(region, iterations=1)).any()
