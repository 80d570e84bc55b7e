"""Region post-processing (core.regions) and the unsupervised default's colour merge (issue 14)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_leakseg.core.regions import merge_similar_regions, region_colour
from napari_leakseg.scribble import segment

DEVICE = os.environ.get("LEAKSEG_TEST_DEVICE", "cpu")


def _pieces(lab):
    from skimage.measure import label

    return label(lab.astype(np.int64) + 1, connectivity=1, background=0)


def test_merge_similar_regions_merges_close_colours_and_keeps_ids():
    # three vertical bands: ids 5 | 7 | 9, colours 0.50 | 0.53 | 0.90 (grey); plus a 9-speck inside band 5
    lab = np.zeros((20, 30), np.int32)
    lab[:, :10], lab[:, 10:18], lab[:, 18:] = 5, 7, 9
    lab[3, 3] = 9
    img = np.where(lab == 5, 0.50, np.where(lab == 7, 0.53, 0.90))[None]
    img[0, 3, 3] = 0.51  # the speck has band 5's colour
    before = lab.copy()
    out = merge_similar_regions(lab, region_colour(img), threshold=5.0)  # 0.03 → 3 units, 0.37 → 37
    np.testing.assert_array_equal(lab, before)  # input untouched
    assert out.dtype == lab.dtype
    assert set(np.unique(out)) <= set(np.unique(lab))
    # bands 5 and 7 (3 units apart) are one region with the larger piece's id; the speck joined it
    assert (out[:, :18] == 5).all()
    assert (out[:, 18:] == 9).all()
    # a threshold below every distance changes nothing; 0 switches merging off
    np.testing.assert_array_equal(merge_similar_regions(lab, region_colour(img), 0.5), lab)
    np.testing.assert_array_equal(merge_similar_regions(lab, region_colour(img), 0), lab)


def test_merge_similar_regions_follows_the_closest_pair_first():
    # 10 | 20 | 30 intensity steps of 0.10 and 0.12: threshold 11 merges only the first pair
    lab = np.repeat(np.array([[1] * 6 + [2] * 5 + [3] * 4]), 4, 0)
    img = np.select([lab == 1, lab == 2], [0.10, 0.20], 0.32)[None]
    out = merge_similar_regions(lab, region_colour(img), threshold=11.0)
    np.testing.assert_array_equal(out[0], [1] * 11 + [3] * 4)
    # after that merge the pair's mean is 0.145, 17.5 units from 0.32: still apart at 17, one region at 18
    assert len(np.unique(merge_similar_regions(lab, region_colour(img), 17.0))) == 2
    assert len(np.unique(merge_similar_regions(lab, region_colour(img), 18.0))) == 1


def test_region_colour_is_lab_for_rgb():
    rgb = np.zeros((3, 2, 2))
    rgb[0] = 1.0  # pure red
    col = region_colour(rgb)
    assert col.shape == (2, 2, 3)
    np.testing.assert_allclose(col[0, 0], [53.24, 80.09, 67.20], atol=0.05)


def test_unsupervised_merge_on_a_real_photo(shared_data):
    """BSDS photo: the colour merge only joins whole regions of the unmerged result, keeping its ids."""
    import imageio.v3 as iio

    path = sorted((shared_data / "bsds500" / "images").glob("*.jpg"))
    if not path:
        pytest.skip("bsds500 images are absent")
    img = np.asarray(iio.imread(path[0]))[:160, :240]
    merged = segment(img, device=DEVICE, seed=0).labels
    plain = segment(img, device=DEVICE, seed=0, merge=0.0).labels
    assert merged.shape == plain.shape == img.shape[:2]
    p_plain, p_merged = _pieces(plain), _pieces(merged)
    assert p_merged.max() < p_plain.max()  # fewer regions
    # every region of the unmerged result lies inside one merged region (merging never splits)
    for r in np.unique(p_plain):
        assert len(np.unique(p_merged[p_plain == r])) == 1
    # each region kept the id of one of its pieces, and the result's final compaction renumbers the
    # ids left consecutively, in order (an id merged away everywhere leaves a gap that closes): so
    # there is an increasing map g from merged ids to unmerged ones with g(id) among a region's pieces
    cand: dict[int, set] = {}
    for r in np.unique(p_merged):
        m = p_merged == r
        assert np.unique(merged[m]).size == 1
        k, pieces = int(merged[m][0]), set(np.unique(plain[m]).tolist())
        cand[k] = cand[k] & pieces if k in cand else pieces
    prev = 0
    for k in sorted(cand):
        above = [v for v in sorted(cand[k]) if v > prev]
        assert above, (k, cand[k], prev)
        prev = above[0]
