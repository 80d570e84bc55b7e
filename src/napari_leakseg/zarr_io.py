"""OME-Zarr (NGFF 0.4) export and lazy reading, via ome-zarr-py.

Layout written by :func:`write_ome_zarr`::

    out.zarr/                 root group: our provenance under "napari_leakseg"
      0, 1, ...               (kind="image") the image multiscales
      labels/                 (kind="labels") group with {"labels": [name]}
        <name>/0, 1, ...      the label multiscales + "image-label" metadata

Writes go to a temporary sibling directory that is renamed to the final name
only when complete, so an interrupted export never leaves a store that looks
finished. Existing stores are never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import __version__
from .core.errors import InputError, OutputExistsError

_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def default_axes(ndim: int, rgb: bool = False) -> str:
    """Axis names for an array: (y,x), (z|t,y,x), (t,z,y,x), (c...) ."""
    if rgb:
        raise InputError("write RGB images channel-first as (c, y, x)")
    return {2: "yx", 3: "zyx", 4: "tzyx", 5: "tczyx"}.get(ndim) or _bad_ndim(ndim)


def _bad_ndim(ndim):
    raise InputError(f"OME-Zarr export supports 2 to 5 dims; got {ndim}")


def _label_colors(data) -> list[dict]:
    from .core.normalize import _subsample

    ids = np.unique(_subsample(data, 2_000_000))
    rng = np.random.default_rng(0)
    out = []
    for i in ids[ids > 0][:4096]:
        rgba = [int(v) for v in rng.integers(40, 256, 3)] + [255]
        out.append({"label-value": int(i), "rgba": rgba})
    return out


def write_ome_zarr(
    path,
    data,
    *,
    kind: str = "labels",
    name: str | None = None,
    axes: str | Sequence[str] | None = None,
    scale: Sequence[float] | None = None,
    provenance: Mapping[str, Any] | None = None,
    properties: Sequence[Mapping[str, Any]] | None = None,
    colors: Sequence[Mapping[str, Any]] | None = None,
    chunks: Sequence[int] | None = None,
    n_levels: int = 1,
    extra_labels: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write labels (or an image) as an OME-Zarr store; returns the final path.

    ``data`` may be numpy or dask (written chunk by chunk). ``scale`` is the
    per-axis pixel size (napari layer ``scale``). ``provenance`` (capability,
    parameters, source layer...) is stored with the package version and date.
    ``extra_labels`` adds more label arrays under ``labels/`` (e.g. a
    propagation's per-frame status map).
    """
    import dask.array as da
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_labels

    path = Path(path)
    if kind not in ("labels", "image"):
        raise ValueError("kind must be 'labels' or 'image'")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} exists; choose another name or pass --overwrite")
    if not path.parent.exists():
        raise OutputExistsError(f"output folder {path.parent} does not exist")
    arr = data if isinstance(data, da.Array) else np.asarray(data)
    if kind == "labels":
        if arr.dtype.kind == "f" or arr.dtype == bool:
            arr = arr.astype(np.uint32 if arr.dtype.kind == "f" else np.uint8)
        if arr.dtype.kind not in "iu":
            raise InputError(f"labels must be integers, got {arr.dtype}")
    ax = list(axes) if axes is not None else list(default_axes(arr.ndim))
    if len(ax) != arr.ndim:
        raise InputError(f"axes {''.join(ax)!r} do not match data with {arr.ndim} dims")
    axes_meta = [{"name": a, "type": _AXIS_TYPES.get(a, "space")} for a in ax]
    sc = [float(s) for s in scale] if scale is not None else [1.0] * arr.ndim
    if len(sc) != arr.ndim:
        raise InputError(f"scale has {len(sc)} entries for data with {arr.ndim} dims")
    if chunks is None:
        chunks = tuple(min(s, 1 if i < arr.ndim - 2 else 512) for i, s in enumerate(arr.shape))
    fmt = FormatV04()
    factors = [2 ** i for i in range(1, n_levels)]
    scale_d = {a: s for a, s in zip(ax, sc)}
    storage = {"chunks": tuple(chunks)}
    prov = {
        "package": "napari-leakseg",
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        **(dict(provenance) if provenance else {}),
    }
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        if kind == "image":
            write_image(arr, root, scale_factors=factors, fmt=fmt, axes=axes_meta,
                        scale=scale_d, storage_options=storage,
                        name=name or "image")
        else:
            lname = name or "labels"
            meta = {"colors": list(colors) if colors is not None else _label_colors(arr)}
            if properties:
                meta["properties"] = list(properties)
            write_labels(arr, root, name=lname, scale_factors=factors, fmt=fmt, axes=axes_meta,
                         scale=scale_d, storage_options=storage,
                         label_metadata=meta)
            for xname, xdata in (extra_labels or {}).items():
                xarr = np.asarray(xdata)
                write_labels(xarr, root, name=xname, scale_factors=[], fmt=fmt,
                             axes=[{"name": a, "type": _AXIS_TYPES.get(a, "space")} for a in default_axes(xarr.ndim)],
                             storage_options={"chunks": xarr.shape},
                             label_metadata={"colors": _label_colors(xarr)})
        root.attrs["napari_leakseg"] = prov
        if path.exists() and overwrite:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _open_multiscale(group) -> tuple[Any, dict]:
    import dask.array as da

    ms = group.attrs.get("multiscales")
    if not ms:
        raise InputError("no OME-Zarr multiscales found")
    ds = ms[0]["datasets"]
    arr = da.from_zarr(group[ds[0]["path"]])
    axes = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
    scale = None
    for t in ds[0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = t["scale"]
    return arr, {"axes": axes, "scale": scale, "name": ms[0].get("name")}


def open_ome_zarr(path) -> list[tuple[Any, dict, str]]:
    """Open every image and label array of a store lazily.

    Returns napari-style layer tuples ``(dask_array, meta, "image"|"labels")``
    with ``scale``, ``name`` and ``metadata`` (axes, provenance) in ``meta``.
    Also opens a plain zarr array (no OME metadata) as one image.
    """
    import dask.array as da
    import zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"zarr store {path} does not exist")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        raise InputError(f"{path} is not a readable zarr store: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if isinstance(node, zarr.Array):
        return [(da.from_zarr(node), {"name": path.stem, "metadata": {}}, "image")]
    prov = node.attrs.get("napari_leakseg", {})
    out = []
    try:
        if "multiscales" in node.attrs:
            arr, m = _open_multiscale(node)
            out.append((arr, {"name": m["name"] or path.stem, "scale": m["scale"],
                              "metadata": {"axes": m["axes"], "napari_leakseg": prov}}, "image"))
        if "labels" in node and "labels" in node["labels"].attrs:
            for lname in node["labels"].attrs["labels"]:
                arr, m = _open_multiscale(node["labels"][lname])
                out.append((arr, {"name": lname, "scale": m["scale"],
                                  "metadata": {"axes": m["axes"], "napari_leakseg": prov,
                                               "image-label": node["labels"][lname].attrs.get("image-label", {})}},
                            "labels"))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path} is a corrupt OME-Zarr store: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if not out:
        # a plain group: take its first array
        for key in node.array_keys():
            return [(da.from_zarr(node[key]), {"name": key, "metadata": {}}, "image")]
        raise InputError(f"{path} holds no image or label arrays")
    return out


def read_zarr(path, prefer: str = "labels"):
    """The main array of a store as a lazy dask array (labels first if ``prefer``)."""
    items = open_ome_zarr(path)
    for arr, _, kind in items:
        if kind == prefer:
            return arr
    return items[0][0]


def is_zarr_store(path) -> bool:
    p = Path(path)
    return p.is_dir() and (
        (p / ".zgroup").exists() or (p / ".zarray").exists() or (p / "zarr.json").exists()
    )
