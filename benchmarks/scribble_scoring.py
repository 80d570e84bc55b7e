"""BSDS500 scoring and simulated scribbles for the scribble benchmark (plain numpy/scipy).

Score (as issue 3 specifies): relabel the prediction into 4-connected
components; match GT regions and predicted components one-to-one with the
Hungarian algorithm maximising IoU; sum the matched IoUs and divide by the
number of GT regions. Also the "best overlap" variant: each GT region's best
IoU with any component, averaged over GT regions. Both are averaged over
annotators, then over images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAKSEG_DATA", REPO / ".." / "shared" / "data"))


def relabel_components(pred: np.ndarray) -> np.ndarray:
    """4-connected components of a label map (every id, 0 included), numbered 1..P."""
    from skimage.measure import label

    return label(np.asarray(pred).astype(np.int64) + 1, connectivity=1, background=0)


def iou_matrix(gt: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """(G, P) IoU between GT regions and predicted components (ids made dense internally)."""
    _, g = np.unique(gt.ravel(), return_inverse=True)
    _, p = np.unique(comp.ravel(), return_inverse=True)
    G, P = int(g.max()) + 1, int(p.max()) + 1
    cont = np.bincount(g * P + p, minlength=G * P).reshape(G, P).astype(np.float64)
    ag, ap = cont.sum(1), cont.sum(0)
    return cont / (ag[:, None] + ap[None, :] - cont)


def score_one(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(Hungarian mIoU, best-overlap mIoU) of one prediction against one annotator."""
    from scipy.optimize import linear_sum_assignment

    comp = relabel_components(pred)
    iou = iou_matrix(gt, comp)
    r, c = linear_sum_assignment(-iou)
    hung = float(iou[r, c].sum() / iou.shape[0])
    best = float(iou.max(1).mean())
    return hung, best


def score(pred: np.ndarray, gts: list[np.ndarray]) -> tuple[float, float]:
    """Average over annotators."""
    s = np.array([score_one(pred, g) for g in gts])
    return float(s[:, 0].mean()), float(s[:, 1].mean())


def load_bsds(data: Path = DATA, limit: int | None = None):
    """[(name, rgb uint8, [gt uint16 ...])] for the BSDS500 subset."""
    import imageio.v3 as iio
    from scipy.io import loadmat

    root = Path(data) / "bsds500"
    out = []
    for p in sorted((root / "images").glob("*.jpg"))[:limit]:
        m = loadmat(root / "groundTruth" / f"{p.stem}.mat")["groundTruth"]
        gts = [m[0, k]["Segmentation"][0, 0] for k in range(m.shape[1])]
        out.append((p.stem, np.asarray(iio.imread(p)), gts))
    return out


def simulate_scribbles(gt: np.ndarray, n_regions: int = 4, length: int = 60, width: int = 3,
                       margin: int = 4) -> np.ndarray:
    """Skeleton strokes in the ``n_regions`` largest GT regions; class k = k-th largest region.

    For each region: erode by ``margin``, skeletonise, keep the skeleton pixels
    within ``length/2`` (chessboard distance along the image grid) of the
    skeleton point deepest inside the region, dilate to ``width`` pixels.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    ids, counts = np.unique(gt, return_counts=True)
    order = ids[np.argsort(-counts)][:n_regions]
    scr = np.zeros(gt.shape, np.uint8)
    for k, rid in enumerate(order, start=1):
        reg = gt == rid
        er = ndi.binary_erosion(reg, iterations=margin)
        if er.sum() < 10:
            er = reg
        sk = skeletonize(er)
        if not sk.any():
            continue
        dist = ndi.distance_transform_edt(er)
        ys, xs = np.nonzero(sk)
        i = int(np.argmax(dist[ys, xs]))
        cy, cx = ys[i], xs[i]
        near = (np.abs(ys - cy) <= length // 2) & (np.abs(xs - cx) <= length // 2)
        stroke = np.zeros_like(sk)
        stroke[ys[near], xs[near]] = True
        if width > 1:
            stroke = ndi.binary_dilation(stroke, iterations=(width - 1) // 2) & reg
        scr[stroke & (scr == 0)] = k
    return scr
