"""Instances with identities through time, Cell Tracking Challenge export and scores.

* :func:`iter_track_instances` follows each cell: the instances of an anchor frame
  (the user's ids) seed the next frame, whose foreground is split by a marker
  watershed grown from the previous frame's instances (so touching cells stay
  apart and keep their ids); foreground not reached by any marker becomes new cells.
* :func:`iter_link_instances` is the older per-frame split (connected components or
  watershed) + overlap linking, kept for masks without anchor instances.
* :func:`ctc_seg` and :func:`link_scores` score a result against CTC ground truth.

Plain numpy/scipy/scikit-image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..core.errors import InputError, LeaksegError
from ..core.jobs import Progress, run_job

def split_instances(mask: np.ndarray, method: str = "cc", min_size: int = 30) -> np.ndarray:
    """Split a foreground mask into instances (connected components or watershed)."""
    from scipy import ndimage as ndi

    fg = np.asarray(mask) > 0
    if method == "watershed":
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        dist = ndi.distance_transform_edt(fg)
        cc, _ = ndi.label(fg)
        peaks = peak_local_max(dist, min_distance=7, labels=cc, exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        lab = watershed(-dist, markers, mask=fg)
    elif method == "cc":
        lab, _ = ndi.label(fg)
    else:
        raise InputError(f"instance split must be 'cc' or 'watershed', not {method!r}")
    if min_size > 0 and lab.max() > 0:
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        lab[small[lab]] = 0
    return lab.astype(np.int32)


def _overlap_link(prev: np.ndarray, cur: np.ndarray, next_id: int, min_iou: float = 0.1):
    """Give each instance of ``cur`` the id of the best-overlapping ``prev`` instance."""
    out = np.zeros(cur.shape, np.int32)
    cur_ids = [i for i in np.unique(cur) if i]
    pairs = []
    if prev is not None and prev.any():
        m = (cur > 0) & (prev > 0)
        if m.any():
            a, b = cur[m].astype(np.int64), prev[m].astype(np.int64)
            key = a * (int(prev.max()) + 1) + b
            uk, inter = np.unique(key, return_counts=True)
            ca = np.bincount(cur.ravel())
            pb = np.bincount(prev.ravel())
            for k, n in zip(uk, inter):
                i, j = divmod(int(k), int(prev.max()) + 1)
                iou = n / (ca[i] + pb[j] - n)
                if iou >= min_iou:
                    pairs.append((iou, i, j))
    pairs.sort(reverse=True)
    used_c, used_p = set(), set()
    for iou, i, j in pairs:
        if i in used_c or j in used_p:
            continue
        out[cur == i] = j
        used_c.add(i)
        used_p.add(j)
    for i in cur_ids:
        if i not in used_c:
            out[cur == i] = next_id
            next_id += 1
    return out, next_id


def iter_link_instances(labels, out=None, method: str = "cc", min_size: int = 30,
                        min_iou: float = 0.1, first=None):
    """Job generator: split every frame into instances and link ids through time.

    Walks frames in time order; each instance takes the id of the instance of
    the previous frame it overlaps most (greedy by IoU ≥ ``min_iou``), so a cell
    keeps its id; new cells get new ids. ``first`` (instance map of frame 0)
    fixes the initial ids, e.g. the user's annotation. Returns (T, Y, X) uint16/32
    and a tracks table ``{id: [begin, end]}`` (CTC-style, parent 0).
    """
    T = labels.shape[0]
    res = out if out is not None else np.zeros(labels.shape, np.uint32)
    prev = None
    next_id = 1
    tracks: dict[int, list[int]] = {}
    for t in range(T):
        cur = split_instances(np.asarray(labels[t]), method, min_size)
        if t == 0 and first is not None:
            cur = np.asarray(first).astype(np.int32)
            lab, next_id = cur, int(cur.max()) + 1
        else:
            lab, next_id = _overlap_link(prev, cur, next_id, min_iou)
        res[t] = lab
        for i in np.unique(lab):
            if not i:
                continue
            i = int(i)
            if i in tracks and tracks[i][1] == t - 1:
                tracks[i][1] = t
            elif i not in tracks:
                tracks[i] = [t, t]
        prev = lab
        yield Progress(t + 1, T, f"instances: frame {t}")
    return res, tracks


def link_instances(labels, out=None, **kw) -> np.ndarray:
    """Run :func:`iter_link_instances`; returns the linked instance stack."""
    return run_job(iter_link_instances(labels, out=out, **kw)).value[0]


def tracks_of(instances) -> dict[int, list[int]]:
    """``{id: [first_frame, last_frame]}`` of an instance stack (ids continuous in time)."""
    tracks: dict[int, list[int]] = {}
    for t in range(instances.shape[0]):
        for i in np.unique(np.asarray(instances[t])):
            if i:
                tracks.setdefault(int(i), [t, t])[1] = t
    return tracks


def ctc_folder_taken(folder) -> bool:
    """Whether a CTC results folder already holds files (writing there would replace them)."""
    folder = Path(folder)
    return folder.exists() and any(folder.iterdir())


def check_ctc_folder(folder, overwrite: bool = False, inputs=()) -> Path:
    """A CTC results folder to write: refused when it holds files (unless ``overwrite``), when it
    is, holds or lies inside one of ``inputs``, or when its parent folder is missing, not a
    folder or not writable (``core.paths.check_target``)."""
    from ..core.paths import check_target

    folder = Path(folder)
    if not overwrite and ctc_folder_taken(folder):
        raise LeaksegError(f"CTC folder {folder} exists and is not empty; choose another or pass --overwrite")
    # files are written into the folder (an empty existing one may be reused), never the folder replaced
    return check_target(folder, overwrite=True, inputs=inputs, into_folder=True)


def export_ctc(instances, folder, overwrite: bool = False) -> Path:
    """Write Cell Tracking Challenge results: ``mask%03d.tif`` + ``res_track.txt``.

    ``res_track.txt`` has one line ``L B E P`` per track (label, begin frame,
    end frame, parent = 0). A label that disappears and comes back is split into
    two tracks (the second gets a new id and the first as parent), as CTC requires.
    """
    import tifffile

    folder = check_ctc_folder(folder, overwrite)
    folder.mkdir(exist_ok=True)
    T = instances.shape[0]
    digits = max(3, len(str(T - 1)))
    last_seen: dict[int, int] = {}
    alias: dict[int, int] = {}  # original id -> current CTC id
    tracks: dict[int, list[int]] = {}  # ctc id -> [B, E, P]
    next_id = int(max((int(np.asarray(instances[t]).max()) for t in range(T)), default=0)) + 1
    for t in range(T):
        lab = np.asarray(instances[t]).astype(np.uint32)
        ids = [int(i) for i in np.unique(lab) if i]
        outl = np.zeros(lab.shape, np.uint16 if next_id + len(ids) < 65535 else np.uint32)
        for i in ids:
            if i in last_seen and last_seen[i] < t - 1:  # gap: start a new track
                new = next_id
                next_id += 1
                tracks[new] = [t, t, alias[i]]
                alias[i] = new
            elif i not in alias:
                alias[i] = i
                tracks[i] = [t, t, 0]
            tracks[alias[i]][1] = t
            last_seen[i] = t
            outl[lab == i] = alias[i]
        tifffile.imwrite(folder / f"mask{t:0{digits}d}.tif", outl, compression="zlib")
    with open(folder / "res_track.txt", "w") as f:
        for i in sorted(tracks):
            b, e, par = tracks[i]
            f.write(f"{i} {b} {e} {par}\n")
    return folder


def ctc_seg(gt, pred) -> tuple[float, int]:
    """Cell Tracking Challenge SEG of one frame: mean Jaccard over GT objects.

    A GT object is matched to the predicted object covering > 50 % of it
    (at most one can); unmatched GT objects score 0. Returns (sum, n_objects)
    so scores can be pooled over frames.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    total, n = 0.0, 0
    pb = np.bincount(pred.ravel().astype(np.int64)) if pred.any() else np.zeros(1)
    for g in np.unique(gt):
        if not g:
            continue
        n += 1
        m = gt == g
        ov = pred[m]
        ov = ov[ov > 0]
        if ov.size == 0:
            continue
        ids, cnt = np.unique(ov, return_counts=True)
        k = np.argmax(cnt)
        if cnt[k] > 0.5 * m.sum():
            inter = cnt[k]
            total += inter / (m.sum() + pb[ids[k]] - inter)
    return float(total), n




# --------------------------------------------------------------------------- #
# tracking by propagating the previous frame's instances
# --------------------------------------------------------------------------- #
def _markers(prev: np.ndarray, fg: np.ndarray, erode: int) -> np.ndarray:
    """The previous instances inside the current foreground, shrunk away from
    each other (touching cells get separate markers) and from the background."""
    from scipy import ndimage as ndi

    prev = np.asarray(prev)
    edge = np.zeros(prev.shape, bool)  # pixels next to another id (or background)
    edge[1:] |= prev[1:] != prev[:-1]
    edge[:-1] |= prev[1:] != prev[:-1]
    edge[:, 1:] |= prev[:, 1:] != prev[:, :-1]
    edge[:, :-1] |= prev[:, 1:] != prev[:, :-1]
    core = (prev > 0) & ~edge & fg
    if erode > 0:
        core = ndi.binary_erosion(core, iterations=erode)
    m = np.where(core, prev, 0)
    # an instance whose core vanished keeps its overlap with the foreground as a marker
    lost = np.setdiff1d(np.unique(prev[(prev > 0) & fg]), np.unique(m))
    for i in lost:
        m[(prev == i) & fg & (m == 0)] = i
    return m


def propagate_ids(prev: np.ndarray, fg: np.ndarray, next_id: int, min_size: int = 30,
                  erode: int = 2) -> tuple[np.ndarray, int]:
    """Instances of foreground ``fg`` carrying the ids of ``prev`` (the previous frame's
    instances): marker watershed on the distance transform from the previous cells'
    cores; foreground no marker reaches becomes new cells (≥ ``min_size`` pixels)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    fg = np.asarray(fg) > 0
    out = np.zeros(fg.shape, np.int32)
    if not fg.any():
        return out, next_id
    markers = _markers(prev, fg, erode) if prev is not None else np.zeros(fg.shape, np.int32)
    if markers.any():
        dist = ndi.distance_transform_edt(fg)
        out = watershed(-dist, markers.astype(np.int32), mask=fg).astype(np.int32)
    rest, n = ndi.label(fg & (out == 0))
    if n:
        sizes = np.bincount(rest.ravel())
        for k in np.flatnonzero(sizes >= max(min_size, 1)):
            if k:
                out[rest == k] = next_id
                next_id += 1
    if min_size > 0 and out.any():  # fragments of a cell smaller than min_size are dropped
        sizes = np.bincount(out.ravel())
        small = sizes < min_size
        small[0] = False
        out[small[out]] = 0
    return out, next_id


def iter_track_instances(fg, anchors: Mapping[int, np.ndarray], out=None, min_size: int = 30,
                         erode: int = 2):
    """Job generator: instance ids that follow each cell through ``fg`` (T×Y×X, > 0 = cell).

    ``anchors`` maps frame → instance map (the user's ids; a binary map is split into
    connected components). Time is walked forward from the first anchor and backward
    before it; each frame's cells grow from the previous frame's (:func:`propagate_ids`);
    at a later anchor its cells are renamed to the ids they overlap most (new ids
    otherwise), so an id is one cell for the whole stack. Returns (T, Y, X) uint32.
    """
    T = fg.shape[0]
    if not anchors:
        raise InputError("instance tracking needs at least one anchor frame")
    res = out if out is not None else np.zeros(fg.shape, np.uint32)
    inst = {}
    for a, lab in anchors.items():
        lab = np.asarray(lab)
        inst[int(a)] = (split_instances(lab, "cc", 0) if lab.max() <= 1 else lab.astype(np.int32))
    first = min(inst)
    next_id = max(int(v.max()) for v in inst.values()) + 1
    done = 0
    for order in (range(first, T), range(first - 1, -1, -1)):
        prev = inst[first]  # the backward walk also starts from the first anchor
        for t in order:
            if t == first:
                cur = inst[first]
            elif t in inst:
                cur, next_id = _overlap_link(prev, inst[t], next_id, min_iou=0.1)
            else:
                cur, next_id = propagate_ids(prev, np.asarray(fg[t]) > 0, next_id, min_size, erode)
            res[t] = cur
            prev = cur
            done += 1
            yield Progress(done, T, f"instances: frame {t}")
    return res


def track_instances(fg, anchors, out=None, **kw) -> np.ndarray:
    """Run :func:`iter_track_instances`; returns the tracked instance stack."""
    return run_job(iter_track_instances(fg, anchors, out=out, **kw)).value


def _majority(gt: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    """GT id → the predicted id covering more than half of it (CTC matching)."""
    out = {}
    m = gt > 0
    if not m.any():
        return out
    g, p = gt[m].astype(np.int64), pred[m].astype(np.int64)
    key = g * (int(p.max()) + 1) + p
    uk, cnt = np.unique(key, return_counts=True)
    size = np.bincount(g)
    for k, n in zip(uk, cnt):
        gi, pi = divmod(int(k), int(p.max()) + 1)
        if pi and n > 0.5 * size[gi]:
            out[gi] = pi
    return out


def link_scores(gt, pred) -> dict:
    """Association of ``pred`` (T×Y×X instance ids) with ground truth ``gt`` (T×Y×X, ids
    constant along each track, e.g. CTC ``TRA`` markers).

    A GT link is a cell present in frames t and t+1; it is correct when the same
    predicted id covers more than half of the cell in both frames and that id covers
    no other GT cell there. Returns ``{"links_correct": fraction, "links": n}``.
    """
    T = gt.shape[0]
    maps = []
    for t in range(T):
        m = _majority(np.asarray(gt[t]), np.asarray(pred[t]))
        vals, cnt = np.unique(list(m.values()), return_counts=True) if m else ([], [])
        shared = {int(v) for v, c in zip(vals, cnt) if c > 1}
        maps.append({g: p for g, p in m.items() if p not in shared})
    ok = n = 0
    for t in range(T - 1):
        a, b = np.asarray(gt[t]), np.asarray(gt[t + 1])
        both = np.intersect1d(np.unique(a[a > 0]), np.unique(b[b > 0]))
        for g in both:
            n += 1
            pa, pb = maps[t].get(int(g)), maps[t + 1].get(int(g))
            ok += int(pa is not None and pa == pb)
    return {"links_correct": ok / n if n else 1.0, "links": int(n)}
