"""npe2 reader: open OME-Zarr stores (ours and other tools' label stores) lazily.

Every array comes back as a dask array read chunk by chunk on demand, so stores
larger than memory open instantly; pyramids open as napari multiscale layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

from ..core.zarr_io import PROVENANCE_KEY, is_zarr_store, open_ome_zarr


def _is_ours_or_ngff(path) -> bool:
    p = Path(str(path))
    return is_zarr_store(p)


def get_reader(path) -> Optional[Callable[[Any], List[tuple]]]:
    """Return a reader for ``.zarr`` stores (or a list of them), else None."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(isinstance(p, (str, Path)) for p in paths):
        return None
    if not all(str(p).rstrip("/\\").lower().endswith(".zarr") and _is_ours_or_ngff(p) for p in paths):
        return None
    return read_zarr_layers


def _to_layer_data(arr, meta: dict, kind: str) -> tuple:
    import dask.array as da

    meta = dict(meta)
    prov = meta.get("metadata", {}).get(PROVENANCE_KEY) or {}
    axes = meta.get("metadata", {}).get("axes") or []
    if kind == "image" and prov.get("rgb") and axes[-3:] == ["c", "y", "x"]:
        # written from an RGB layer: back to channels-last
        move = (lambda a: da.moveaxis(a, -3, -1))
        arr = [move(a) for a in arr] if isinstance(arr, list) else move(arr)
        meta["rgb"] = True
        for key in ("scale", "translate"):
            if meta.get(key) is not None:
                meta[key] = list(meta[key][:-3]) + list(meta[key][-2:])
    meta.pop("multiscale", None)
    if isinstance(arr, list):
        meta["multiscale"] = True
    return arr, meta, kind


def read_zarr_layers(path) -> List[tuple]:
    """napari LayerData tuples for every image and label array in the store(s)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    out = []
    for p in paths:
        for arr, meta, kind in open_ome_zarr(p, multiscale=True):
            out.append(_to_layer_data(arr, meta, kind))
    return out
