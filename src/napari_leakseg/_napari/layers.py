"""Layer helpers: read layers as arrays (current slice or stack), write named output layers.

Conventions:
* Images come back channels-last for RGB, like napari: (Y, X) or (Y, X, C) for a
  slice, (N, Y, X[, C]) for a stack.
* Labels: 0 = unlabeled/background, 1..K = classes.
* Output layers are marked with ``metadata["napari_leakseg_output"]``; only
  such layers are ever updated in place. User layers are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.errors import InputError
from ..core.memory import check_array
from ..core.normalize import check_image, normalize as _normalize

OUTPUT_FLAG = "napari_leakseg_output"


@dataclass
class LayerSlice:
    """An array read from a layer plus where it came from.

    data:   the array ((Y, X[, C]) for a slice; full data for a stack; may be lazy)
    index:  leading (non-spatial) indices of the slice in the layer, () for 2D
    rgb:    whether the last axis is colour
    spatial_shape: (Y, X)
    """

    data: Any
    index: tuple
    rgb: bool
    spatial_shape: tuple
    layer_name: str
    scale: tuple


def _base_data(layer):
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def current_index(layer, viewer) -> tuple:
    """The leading indices of the slice currently shown for ``layer`` in ``viewer``."""
    lead = layer.ndim - 2
    if lead <= 0 or viewer is None:
        return ()
    try:
        coords = layer.world_to_data(viewer.dims.point)
    except Exception:  # pragma: no cover - very old napari
        coords = viewer.dims.current_step[-layer.ndim:]
    shape = _base_data(layer).shape
    idx = []
    for i in range(lead):
        v = int(round(float(coords[i])))
        idx.append(int(np.clip(v, 0, shape[i] - 1)))
    return tuple(idx)


def read_image(layer, viewer=None, *, current_slice: bool = True, normalize: bool = True,
               lazy: bool = False) -> LayerSlice:
    """Read an Image layer.

    ``current_slice``: for Z/T stacks take only the slice shown in ``viewer.dims``
    (only that slice is loaded from dask/zarr). Otherwise the whole stack is
    returned (lazily if ``lazy`` and the data is lazy).
    ``normalize``: float32 with 1st/99.8th percentiles mapped to 0/1 (over the
    returned data; a subsample for big stacks).
    """
    if layer is None:
        raise InputError("no image layer selected")
    data = _base_data(layer)
    rgb = bool(getattr(layer, "rgb", False))
    idx = current_index(layer, viewer) if current_slice else ()
    arr = data[idx] if idx else data
    spatial = tuple(arr.shape[-3:-1] if rgb else arr.shape[-2:])
    if not (lazy and not current_slice):
        check_array(arr.shape, getattr(arr, "dtype", np.float32),
                    f"reading image layer {layer.name!r} (shape {tuple(arr.shape)})",
                    float_copies=1.0 if normalize else 0.0)
        arr = np.asarray(arr)
        check_image(arr, name=f"image layer {layer.name!r}")
        if normalize:
            arr = _normalize(arr)
    return LayerSlice(arr, idx, rgb, spatial, layer.name, tuple(layer.scale))


def read_labels(layer, viewer=None, *, index: tuple | None = None, current_slice: bool = True) -> LayerSlice:
    """Read a Labels layer (a copy; the layer itself is never modified)."""
    if layer is None:
        raise InputError("no labels layer selected")
    data = _base_data(layer)
    if index is None:
        index = current_index(layer, viewer) if current_slice else ()
    arr = np.array(data[index] if index else data, copy=True)
    return LayerSlice(arr, index, False, tuple(arr.shape[-2:]), layer.name, tuple(layer.scale))


def is_output_layer(layer) -> bool:
    return bool(layer.metadata.get(OUTPUT_FLAG, False))


def write_layer(viewer, name: str, data, kind: str = "labels", *, index: tuple = (),
                full_shape: Optional[tuple] = None, source=None, **layer_kwargs):
    """Create or update the named output layer and return it.

    * An existing layer of that name that *we* created (and of the same kind)
      is updated in place (only its data, and for images the contrast limits;
      its look, scale and translate stay as they are: adding a layer costs
      0.2-0.7 s in the GUI thread, updating one a few ms); a user's layer with
      that name is left alone and a new output layer gets a distinct name.
    * ``index``: write ``data`` into that leading slice of a stack output of
      ``full_shape`` (created zero-filled when needed; an existing stack of
      a dtype that cannot hold ``data`` is converted, keeping its other slices).
    * ``source``: the input layer; its scale/translate are copied (new layers only).
    * ``contrast_limits`` (images): used when creating and when updating;
      without it an updated image gets contrast limits from its new data.
    """
    if kind not in ("labels", "image"):
        raise ValueError("kind must be 'labels' or 'image'")
    layer = None
    if name in viewer.layers:
        cand = viewer.layers[name]
        if is_output_layer(cand) and cand._type_string == kind:
            layer = cand
        else:
            base, k = name, 2
            while f"{base} [{k}]" in viewer.layers and not (
                is_output_layer(viewer.layers[f"{base} [{k}]"])
                and viewer.layers[f"{base} [{k}]"]._type_string == kind
            ):
                k += 1
            name = f"{base} [{k}]"
            layer = viewer.layers[name] if name in viewer.layers else None
    data = np.asarray(data)
    clim = layer_kwargs.get("contrast_limits") if kind == "image" else None
    if index:
        if full_shape is None:
            raise ValueError("full_shape is needed to write a slice")
        if layer is not None and tuple(layer.data.shape) == tuple(full_shape):
            if np.can_cast(data.dtype, layer.data.dtype, "safe"):
                layer.data[index] = data
                layer.refresh()
            else:  # e.g. a pre-created empty stack: keep its other slices, in the new dtype
                full = np.asarray(layer.data).astype(np.result_type(layer.data.dtype, data.dtype))
                full[index] = data
                layer.data = full
            if clim is not None:
                layer.contrast_limits = tuple(clim)
            return layer
        full = np.zeros(full_shape, data.dtype)
        full[index] = data
        data = full
    if layer is not None:
        layer.data = data
        if kind == "image":
            if clim is not None:
                layer.contrast_limits = tuple(clim)
            else:
                layer.reset_contrast_limits()
        return layer
    kw = dict(layer_kwargs)
    if source is not None:
        kw.setdefault("scale", tuple(source.scale)[-data.ndim:] if len(source.scale) >= data.ndim else None)
        kw.setdefault("translate", tuple(source.translate)[-data.ndim:] if len(source.translate) >= data.ndim else None)
        kw = {k: v for k, v in kw.items() if v is not None}
    meta = dict(kw.pop("metadata", {}) or {})
    meta[OUTPUT_FLAG] = True
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=name, metadata=meta, **kw)


def find_layers(viewer, kind: str) -> list:
    return [ly for ly in viewer.layers if ly._type_string == kind]
