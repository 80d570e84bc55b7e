"""``leakseg export``: convert a label or image file to OME-Zarr (NGFF 0.4)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert a label/image file (.tif .npy .png .zarr) to OME-Zarr",
        description=(
            "Write a label (default) or image file as an OME-Zarr store: chunked, compressed, "
            "with axes, scale and provenance; labels go under labels/<name> with image-label "
            "metadata. Written to a temporary name and renamed when complete."),
    )
    p.add_argument("input", help="input file: .tif/.tiff, .npy, .png or .zarr (zarr and .npy are read lazily)")
    p.add_argument("--out", required=True, help="output store (.zarr); never overwritten unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output")
    p.add_argument("--kind", choices=("labels", "image"), default="labels",
                   help="write as a label image (integers; default) or an intensity image")
    p.add_argument("--scale", default=None,
                   help="pixel size per axis, comma-separated (e.g. 0.5,0.1,0.1); default: kept from a "
                        "zarr input, else 1")
    p.add_argument("--axes", default=None, help="axis names, e.g. zyx or tyx (default: yx, zyx, tzyx)")
    p.add_argument("--name", default=None, help="name of the label/image in the store (default: input name)")
    p.add_argument("--chunks", default=None, help="zarr chunk shape, comma-separated (default: 1,...,512,512)")
    p.add_argument("--levels", type=int, default=1, help="resolution levels (2x downsampled pyramid; default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary output")
    p.set_defaults(func=run)


def _floats(s, what):
    from ..core.errors import InputError

    try:
        vals = [float(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"--{what} expects comma-separated numbers, got {s!r}") from None
    return vals


def run(args) -> int:
    import time
    from pathlib import Path

    import dask.array as da
    import numpy as np

    from ..core.errors import InputError
    from ..core.io import _ext, check_output_path, imread
    from ..zarr_io import read_zarr_with_meta, write_ome_zarr

    t0 = time.perf_counter()
    inp = Path(args.input)
    if _ext(args.out) != ".zarr":
        raise InputError(f"--out {args.out} must be a .zarr store")
    check_output_path(args.out, args.overwrite, [inp])
    if not inp.exists():
        raise InputError(f"input {inp} does not exist")
    meta = {}
    if _ext(inp) == ".zarr":
        data, meta, _ = read_zarr_with_meta(inp, prefer=args.kind)
        src_axes = meta.get("metadata", {}).get("axes")
    else:
        data = imread(inp, lazy=True, mmap=True)
        if isinstance(data, np.memmap) or (isinstance(data, np.ndarray) and data.nbytes > 2**28):
            data = da.from_array(data, chunks=tuple(min(s, 1 if i < data.ndim - 2 else 1024)
                                                     for i, s in enumerate(data.shape)))
        src_axes = None
    if args.kind == "image" and data.ndim == 3 and data.shape[-1] in (3, 4) and not args.axes and src_axes is None:
        data = da.moveaxis(da.asarray(data), -1, 0)  # RGB(A) → channel-first "cyx"
        src_axes = ["c", "y", "x"]
    axes = list(args.axes) if args.axes else src_axes
    scale = _floats(args.scale, "scale") if args.scale else meta.get("scale")
    chunks = _floats(args.chunks, "chunks") if args.chunks else None  # whole numbers: checked by write_ome_zarr
    if chunks is not None and (len(chunks) != data.ndim or min(chunks) < 1):
        raise InputError(f"--chunks needs {data.ndim} positive values, got {args.chunks!r}")
    if args.levels < 1:
        raise InputError("--levels must be at least 1")
    name = args.name or meta.get("name") or inp.name.split(".")[0]
    prov = {"operation": "leakseg export", "source": str(inp.resolve()), "source_layer": name,
            "params": {"kind": args.kind, "scale": scale, "axes": axes, "chunks": chunks}}
    src_prov = meta.get("metadata", {}).get("napari_leakseg")
    if src_prov:
        prov["source_provenance"] = src_prov
    out = write_ome_zarr(args.out, data, kind=args.kind, name=name, axes=axes, scale=scale,
                         translate=meta.get("translate"), provenance=prov, chunks=chunks,
                         n_levels=args.levels, overwrite=args.overwrite, inputs=[inp])
    if not args.quiet:
        print(f"wrote {out} ({args.kind}, shape {tuple(data.shape)}, {np.dtype(data.dtype)}, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
