"""The propagation benchmark's error breakdown: every wrong pixel is counted once, in the right part."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_propagate")


def test_error_parts_split_every_wrong_pixel_once():
    silver = np.zeros((2, 100, 120), np.int32)
    silver[:, 20:60, 20:60] = 1                     # one cell, 40×40
    fg = np.zeros(silver.shape, np.uint8)
    fg[:, 22:62, 20:60] = 1                         # the same cell, 2 px lower: boundary errors only
    fg[1, 40:70, 100:120] = 1                       # frame 1: a cell at the right border that silver lacks
    fg[1, 80:90, 40:50] = 1                         # ... and an inner one
    fg[1, 20:60, 60:70] = 1                         # ... and a 10 px wide bulge on the cell: its first 3
                                                    #     columns are boundary, the other 7 other false positives
    silver[1, 70:80, 70:80] = 2                     # ... and a cell it misses altogether
    e = bench.error_parts(fg, silver, scored=[0, 1], near=3, lacks=0.05)

    wrong = int((((fg > 0) != (silver > 0))).sum())
    assert e["boundary"] + e["objects_gt_lacks"] + e["other_fp"] + e["other_fn"] == wrong
    assert e["objects_gt_lacks"] == 30 * 20 + 10 * 10
    assert e["objects_gt_lacks_at_border"] == 30 * 20
    assert e["other_fp"] == 40 * 7
    # the missed 10×10 cell: its pixels more than 3 px inside count as other misses, the rest as boundary
    assert e["other_fn"] == (10 - 2 * 3) ** 2
    # with the objects silver lacks removed, frame 1 scores as if they were never predicted
    p1 = (fg[1] > 0).copy()
    p1[40:70, 100:120] = p1[80:90, 40:50] = False
    want = np.mean([bench.foreground_iou(fg[0], silver[0]), bench.foreground_iou(p1, silver[1])])
    assert e["fg_iou_without_objects_gt_lacks"] == pytest.approx(want, abs=1e-4)


def test_silver_vs_gold_names_the_frames_where_a_cell_is_only_in_one():
    silver = np.zeros((3, 40, 40), np.int32)
    silver[:, 5:15, 5:15] = 1
    silver[:, 20:30, 20:30] = 2
    gold = {0: silver[0].copy(), 1: silver[1].copy(), 2: silver[2].copy()}
    gold[1][20:30, 20:30] = 0           # frame 1: gold lacks silver's second cell
    gold[2][5:15, 5:16] = 1             # frame 2: gold traces the first cell 1 px wider
    a = bench.silver_vs_gold(silver, gold)
    assert a["frames_a_cell_only_one_has"] == [1]
    assert a["n_frames"] == 3
    assert a["fg_iou"] == pytest.approx((1 + 100 / 200 + 200 / 210) / 3, abs=1e-4)
    assert a["fg_iou_same_cells"] == pytest.approx((1 + 200 / 210) / 2, abs=1e-4)
