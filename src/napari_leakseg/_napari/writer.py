"""npe2 writers: Labels and Image layers → OME-Zarr (``File > Save Selected Layers...``).

They keep the layer's name, scale, translate, axes and (labels) properties and
colours, write to a temporary name and rename when complete, and refuse an
existing path (napari's save dialog has already asked the user; we still never
delete a store silently — remove it first, or use ``leakseg export --overwrite``).
"""

from __future__ import annotations

from typing import Any, List

from ..core.errors import InputError
from .export import write_layer_data


def _check(path: str) -> str:
    p = str(path)
    if not p.rstrip("/\\").lower().endswith(".zarr"):
        raise InputError(f"{path}: the napari-leakseg writer saves OME-Zarr stores; use a .zarr name")
    return p


def write_labels(path: str, data: Any, meta: dict) -> List[str]:
    """Save one Labels layer as an OME-Zarr label image (``labels/<name>``)."""
    out = write_layer_data(_check(path), data, meta, "labels",
                           provenance={"operation": "napari save (labels)"})
    return [str(out)]


def write_image(path: str, data: Any, meta: dict) -> List[str]:
    """Save one Image layer as an OME-Zarr image."""
    out = write_layer_data(_check(path), data, meta, "image",
                           provenance={"operation": "napari save (image)"})
    return [str(out)]
