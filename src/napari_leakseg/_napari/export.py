"""Export napari layers (Labels/Image) to OME-Zarr through ``napari_leakseg.zarr_io``.

Used by the npe2 writer (``File > Save Selected Layers...`` with the
napari-leakseg plugin) and by every widget's "Export to zarr" button.
Layer ``scale``, ``translate``, axes (``metadata["axes"]`` when the layer came
from a zarr store) and name are kept; Labels ``features`` become NGFF
image-label ``properties`` and the layer colours become image-label ``colors``.
Provenance: the widget's dict (capability, params...), the source layer names,
package version and date (added by ``zarr_io``), plus any provenance the layer
already carried (``metadata["napari_leakseg"]``, e.g. from an opened store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..core.errors import InputError
from ..core.zarr_io import PROVENANCE_KEY, default_axes, write_ome_zarr

_MAX_COLORS = 4096


def _layer_kind(layer) -> str:
    kind = getattr(layer, "_type_string", None) or type(layer).__name__.lower()
    if kind not in ("labels", "image"):
        raise InputError(f"layer {getattr(layer, 'name', layer)!r} is a {kind} layer; "
                         "only Labels and Image layers can be exported to OME-Zarr")
    return kind


def _features_to_properties(features) -> Optional[list[dict]]:
    """napari Labels features/properties (row i ↔ label i, or an ``index`` column) → NGFF list."""
    if features is None:
        return None
    try:
        cols = {str(k): list(features[k]) for k in features.keys()}
    except Exception:
        return None
    if not cols:
        return None
    n = len(next(iter(cols.values())))
    ids = cols.pop("index", list(range(n)))
    out = []
    for i in range(n):
        d = {"label-value": int(ids[i])}
        for k, v in cols.items():
            val = v[i]
            if isinstance(val, np.generic):
                val = val.item()
            if isinstance(val, float) and not np.isfinite(val):
                val = None
            d[k] = val if isinstance(val, (str, int, float, bool, type(None))) else str(val)
        out.append(d)
    return out


def _colors(colormap, data) -> Optional[list[dict]]:
    """The layer's label colours for the label values present (subsampled), or None."""
    if colormap is None:
        return None
    from ..core.normalize import _subsample

    try:
        ids = np.unique(_subsample(data, 2_000_000))
        ids = ids[ids > 0][:_MAX_COLORS]
        if ids.size == 0:
            return []
        rgba = np.asarray(colormap.map(ids.astype(np.int64)), np.float64).reshape(len(ids), -1)[:, :4]
    except Exception:
        return None
    return [{"label-value": int(i), "rgba": [int(round(float(c) * 255)) for c in col]}
            for i, col in zip(ids, rgba)]


def _axes_for(meta_axes, ndim: int, rgb: bool = False) -> list[str]:
    if meta_axes and len(meta_axes) == ndim and all(isinstance(a, str) for a in meta_axes):
        return list(meta_axes)
    return ["c", "y", "x"] if rgb and ndim == 3 else list(default_axes(ndim))


def layer_store_args(data, meta: Mapping[str, Any], kind: str) -> dict:
    """Keyword arguments for :func:`write_ome_zarr` from a layer's data and state dict."""
    import dask.array as da

    if isinstance(data, (list, tuple)):  # multiscale: export full resolution
        data = data[0]
    md = dict(meta.get("metadata") or {})
    rgb = bool(meta.get("rgb", False)) and kind == "image"
    ndim = np.ndim(data) if not hasattr(data, "ndim") else data.ndim
    scale = [float(s) for s in (meta.get("scale") if meta.get("scale") is not None else [1.0] * ndim)]
    translate = [float(t) for t in (meta.get("translate") if meta.get("translate") is not None else [0.0] * ndim)]
    if rgb:  # (..., Y, X, C) → channel first; napari's scale has no entry for the colour axis
        data = np.moveaxis(data, -1, -3) if isinstance(data, np.ndarray) else \
            da.moveaxis(da.asarray(data), -1, -3)
        scale = scale[:-2] + [1.0] + scale[-2:]
        translate = translate[:-2] + [0.0] + translate[-2:]
        ndim = data.ndim
    axes = _axes_for(md.get("axes"), ndim, rgb)
    args = dict(data=data, kind=kind, name=str(meta.get("name") or kind), axes=axes,
                scale=scale[-ndim:], translate=translate[-ndim:])
    if kind == "labels":
        props = _features_to_properties(meta.get("features")) or _features_to_properties(meta.get("properties"))
        if props:
            args["properties"] = props
        cols = _colors(meta.get("colormap"), data)
        if cols is not None:
            args["colors"] = cols
    extra = {"rgb": True} if rgb else {}
    src = md.get(PROVENANCE_KEY)
    if isinstance(src, Mapping) and src:
        extra["source_provenance"] = dict(src)
    args["_extra_prov"] = extra
    return args


def _layer_state(layer) -> dict:
    meta = {"name": layer.name, "scale": list(layer.scale), "translate": list(layer.translate),
            "metadata": dict(layer.metadata)}
    if getattr(layer, "rgb", False):
        meta["rgb"] = True
    if _layer_kind(layer) == "labels":
        meta["features"] = getattr(layer, "features", None)
        meta["colormap"] = getattr(layer, "colormap", None)
    return meta


def layer_sources(layers) -> list[str]:
    """The files/stores the layers were opened from (napari's ``layer.source.path``; our
    reader's lazy zarr arrays also name their store). An export never writes over, into or
    around one of them."""
    out = []
    for l in layers:
        src = getattr(getattr(l, "source", None), "path", None)
        if src:
            out.append(str(src))
        where = getattr(getattr(l, "metadata", None) or {}, "get", lambda k: None)("source_path")
        if where:
            out.append(str(where))
    return out


def _as_layers(viewer_or_layers) -> list:
    if hasattr(viewer_or_layers, "layers") and hasattr(viewer_or_layers, "dims"):  # a Viewer
        ll = viewer_or_layers.layers
        sel = [l for l in ll.selection] if len(ll.selection) else list(ll)
        layers = [l for l in ll if l in sel and getattr(l, "_type_string", "") in ("labels", "image")]
    elif hasattr(viewer_or_layers, "data") and hasattr(viewer_or_layers, "name"):  # one layer
        layers = [viewer_or_layers]
    else:
        layers = list(viewer_or_layers)
    if not layers:
        raise InputError("no Labels or Image layer to export")
    return layers


def write_layer_data(path, data, meta: Mapping[str, Any], kind: str, *, overwrite: bool = False,
                     provenance: Optional[Mapping[str, Any]] = None, inputs=()) -> Path:
    """Write one layer given as (data, state dict) — what npe2 writers receive."""
    args = layer_store_args(data, meta, kind)
    extra = args.pop("_extra_prov")
    prov = {"source_layer": args["name"], **extra, **(dict(provenance) if provenance else {})}
    src = (meta.get("metadata") or {}).get("source_path")
    inputs = list(inputs) + ([src] if src else [])
    return write_ome_zarr(path, overwrite=overwrite, provenance=prov, inputs=inputs, **args)


def export_layers(viewer_or_layers, path, *, overwrite: bool = False,
                  provenance: Optional[Mapping[str, Any]] = None,
                  extra_labels: Optional[Mapping[str, Any]] = None, inputs=None) -> Path:
    """Write napari layers to one OME-Zarr store and return its path.

    ``viewer_or_layers``: a Viewer (its selected layers, else all Labels/Image
    layers), one layer, or a list of layers. At most one Image layer (stored as
    the store's image); every Labels layer goes under ``labels/<layer name>``.
    ``extra_labels`` adds arrays such as a propagation's per-frame status
    (see :func:`napari_leakseg.zarr_io.write_ome_zarr`). Refuses an existing
    ``path`` unless ``overwrite`` (the widgets ask for confirmation first);
    written atomically (temporary name + rename). ``inputs``: files/stores the output must
    not be, hold or lie inside (default: the sources of the exported layers, or of every
    layer of a Viewer); with ``overwrite`` only a store napari-leakseg wrote is replaced.
    """
    layers = _as_layers(viewer_or_layers)
    if inputs is None:
        every = list(viewer_or_layers.layers) if hasattr(viewer_or_layers, "dims") else layers
        inputs = layer_sources(every)
    kinds = [_layer_kind(l) for l in layers]
    images = [l for l, k in zip(layers, kinds) if k == "image"]
    labels = [l for l, k in zip(layers, kinds) if k == "labels"]
    if len(images) > 1:
        raise InputError(f"an OME-Zarr store holds one image; export the image layers "
                         f"{', '.join(repr(l.name) for l in images)} separately")
    names = [l.name for l in layers]
    if len(set(names)) != len(names):
        raise InputError(f"layer names must be unique to export them together: {names}")
    main = images[0] if images else labels[0]
    main_kind = "image" if images else "labels"
    args = layer_store_args(main.data, _layer_state(main), main_kind)
    extra_prov = args.pop("_extra_prov")
    extras = {}
    for l in labels:
        if l is main:
            continue
        a = layer_store_args(l.data, _layer_state(l), "labels")
        a.pop("_extra_prov")
        extras[a["name"]] = (a["data"], {k: a[k] for k in ("axes", "scale", "properties", "colors") if k in a})
    for k, v in (extra_labels or {}).items():
        extras[str(k)] = v
    prov = {"source_layer": names if len(names) > 1 else names[0], **extra_prov,
            **(dict(provenance) if provenance else {})}
    return write_ome_zarr(path, overwrite=overwrite, provenance=prov, extra_labels=extras or None,
                          inputs=inputs, **args)
