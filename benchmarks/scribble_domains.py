"""Domains, simulated strokes, the random-forest baseline and scoring for issue 14.

Every domain yields cases ``(domain, name, image, gt_classes)`` where ``gt_classes``
is a class map (1..K; 0 = pixels that belong to no class and are not scored). The
strokes are drawn by :func:`draw_strokes` from fixed seeds, identically for every
method. Plain numpy/scipy/skimage/sklearn; reads ``../shared/data``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from scribble_scoring import DATA, load_bsds

EM_STACKS = ("isbi2012", "fibsem_medulla", "fibsem_gala_test", "ovule_confocal")  # membrane vs interior
DOMAINS = ("bsds500", "u373") + EM_STACKS
U373_FRAMES = (10, 22, 41, 59, 85)  # gold-truth frames of PhC-C2DH-U373 seq 02
EM_SLICES = (3, 10, 17, 24)         # slices of each EM stack (all exist in every stack; 10 and 24 since stop 29)


# --------------------------------------------------------------------------- data
def _bsds_cases(limit=None):
    for stem, img, gts in load_bsds(DATA, limit):
        gt = gts[0]
        ids, counts = np.unique(gt, return_counts=True)
        top = ids[np.argsort(-counts)][:4]
        cls = np.zeros(gt.shape, np.uint8)
        for k, rid in enumerate(top, start=1):
            cls[gt == rid] = k
        # the 4 largest regions are the classes; each region is its own stroke target
        yield "bsds500", stem, img, cls, [(k, cls == k, 1) for k in range(1, 5)]


def _u373_cases(limit=None):
    import tifffile

    root = DATA / "timelapse" / "PhC-C2DH-U373"
    for t in U373_FRAMES[:limit]:
        img = tifffile.imread(root / "02" / f"t{t:03d}.tif")
        seg = tifffile.imread(root / "02_GT" / "SEG" / f"man_seg{t:03d}.tif")
        cls = np.where(seg > 0, 2, 1).astype(np.uint8)  # 1 = background, 2 = cell
        ids, counts = np.unique(seg[seg > 0], return_counts=True)
        cells = [(2, seg == i, 1) for i in ids[np.argsort(-counts)][:3]]
        yield "u373", f"t{t:03d}", img, cls, [(1, seg == 0, 3)] + cells


def _em_membrane(stack: str, z: int):
    import imageio.v3 as iio

    root = DATA / "em" / stack
    if stack == "isbi2012":
        img = iio.imread(root / "image" / f"{z}.png")
        mem = iio.imread(root / "label" / f"{z}.png") < 128  # 0 = membrane
    else:
        img = iio.imread(root / "image" / f"z{z:03d}.png")
        mem = iio.imread(root / "membrane" / f"z{z:03d}.png") > 127
    if img.ndim == 3:
        img = img[..., 0]
    return img, mem


def em_slices(stack: str) -> list[int]:
    """Every slice index of an EM stack that has both an image and its membrane truth."""
    root = DATA / "em" / stack
    if stack == "isbi2012":
        return sorted(int(p.stem) for p in (root / "image").glob("*.png") if (root / "label" / p.name).exists())
    return sorted(int(p.stem[1:]) for p in (root / "image").glob("z*.png") if (root / "membrane" / p.name).exists())


def _em_cases(stack, limit=None, slices=None):
    from scipy import ndimage as ndi

    for z in (EM_SLICES if slices is None else slices)[:limit]:
        img, mem = _em_membrane(stack, z)
        cls = np.where(mem, 1, 2).astype(np.uint8)  # 1 = membrane, 2 = interior
        cells, n = ndi.label(~mem)
        sizes = np.bincount(cells.ravel())
        sizes[0] = 0
        big = np.argsort(-sizes)[:4]
        yield stack, f"z{z:03d}", img, cls, [(1, mem, 4)] + [(2, cells == i, 1) for i in big if sizes[i]]


def cases(domain: str, limit=None):
    if domain == "bsds500":
        return list(_bsds_cases(limit))
    if domain == "u373":
        return list(_u373_cases(limit))
    return list(_em_cases(domain, limit))


def available(domain: str) -> bool:
    paths = {"bsds500": DATA / "bsds500", "u373": DATA / "timelapse" / "PhC-C2DH-U373" / "02_GT"}
    return Path(paths.get(domain, DATA / "em" / domain)).exists()


# --------------------------------------------------------------------------- strokes
def _stroke(region: np.ndarray, rng: np.random.Generator, taken: np.ndarray, width: int = 3):
    """One skeleton piece of ``region``, 30-60 px long, ``width`` px wide, avoiding ``taken``.

    The skeleton is that of the region eroded by 2 px (strokes keep off the boundary), unless the piece
    drawn on it is shorter than 30 px: a thin region (a 3-5 px membrane) erodes to a few blobs, whose
    skeleton fragments gave 3-17 px ticks on the thick spots instead of strokes along the membrane. Then
    the piece is drawn again on the skeleton of the region itself (its parts of at least 30 px)."""
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    inner = ndi.binary_erosion(region, iterations=2)
    if inner.sum() < 30:
        inner = region
    sk = skeletonize(inner) & ~taken
    if not sk.any():
        return np.zeros_like(region)
    length = int(rng.integers(30, 61))
    seen, count = _walk(sk, int(rng.integers(int(sk.sum()))), length)
    if count < 30 and inner is not region:  # a tick on a thick spot: redraw on the region's own skeleton
        sk = _long_parts(skeletonize(region) & ~taken)
        if not sk.any():
            return np.zeros_like(region)
        seen, count = _walk(sk, int(rng.integers(int(sk.sum()))), length)
    if width > 1:
        seen = ndi.binary_dilation(seen, iterations=(width - 1) // 2) & region
    return seen


def _long_parts(sk: np.ndarray, min_px: int = 30) -> np.ndarray:
    """The 8-connected parts of skeleton ``sk`` with at least ``min_px`` pixels (all of it if none has)."""
    from scipy import ndimage as ndi

    lab, _ = ndi.label(sk, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return sizes[lab] >= min_px if (sizes >= min_px).any() else sk


def _walk(sk: np.ndarray, i: int, length: int):
    """Breadth-first walk of the 8-connected skeleton from its ``i``-th pixel (row-major), up to ``length``
    px: (mask, px)."""
    from scipy import ndimage as ndi

    ys, xs = np.nonzero(sk)
    lab, _ = ndi.label(sk, structure=np.ones((3, 3)))
    comp = lab == lab[ys[i], xs[i]]
    seen = np.zeros_like(sk)
    frontier = [(ys[i], xs[i])]
    seen[ys[i], xs[i]] = True
    count = 1
    H, W = sk.shape
    while frontier and count < length:
        nxt = []
        for y, x in frontier:
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and comp[yy, xx] and not seen[yy, xx] and count < length:
                        seen[yy, xx] = True
                        nxt.append((yy, xx))
                        count += 1
        frontier = nxt
    return seen, count


def draw_strokes(shape, targets, seed: int) -> np.ndarray:
    """Scribbles (0 = unlabeled, class ids) from ``targets`` = [(class, region mask, n strokes)]."""
    rng = np.random.default_rng(seed)
    scr = np.zeros(shape, np.uint8)
    for k, region, n in targets:
        for _ in range(n):
            s = _stroke(region, rng, scr > 0)
            scr[s & (scr == 0)] = k
    return scr


# --------------------------------------------------------------------------- scoring
def mean_iou(pred: np.ndarray, cls: np.ndarray) -> float:
    """Mean over the classes 1..K of IoU(pred == k, cls == k), on the scored pixels (cls > 0)."""
    m = cls > 0
    ious = []
    for k in np.unique(cls[m]):
        a, b = (pred == k) & m, cls == k
        ious.append((a & b).sum() / max(1, (a | b).sum()))
    return float(np.mean(ious))


# --------------------------------------------------------------------------- the user's alternative
def forest(img: np.ndarray, scr: np.ndarray, seed: int = 0):
    """ilastik-style random forest: skimage multiscale_basic_features (sigma 1-16) + 50 trees, depth 10."""
    from functools import partial

    from sklearn.ensemble import RandomForestClassifier
    from skimage.feature import multiscale_basic_features
    from skimage.future import fit_segmenter, predict_segmenter

    t0 = time.perf_counter()
    fn = partial(multiscale_basic_features, intensity=True, edges=True, texture=True, sigma_min=1,
                 sigma_max=16, channel_axis=-1 if img.ndim == 3 else None)
    feats = fn(img)
    clf = RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10, random_state=seed)
    clf = fit_segmenter(scr, feats, clf)
    pred = predict_segmenter(feats, clf)
    return pred, time.perf_counter() - t0
