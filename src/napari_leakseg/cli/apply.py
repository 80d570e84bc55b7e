"""``leakseg apply``: run any saved model over a large array with dask (blockwise, overlapping)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "apply",
        help="run a saved model over a large (zarr) array with dask",
        description=(
            "Run any saved napari-leakseg model (scribble, membrane, restore, propagate) over a "
            "large input, block by block with overlapping halos (dask map_overlap), writing blocks "
            "straight into an OME-Zarr output. Output is bit-identical to single-process "
            "prediction. Leading axes (Z/T) are processed as independent 2D planes."),
    )
    p.add_argument("--model", required=True, help="saved model file (.pt)")
    p.add_argument("--input", required=True, help="input image: .zarr (read lazily), .tif, .npy or .png")
    p.add_argument("--output", "--out", dest="output", required=True,
                   help="output OME-Zarr store (.zarr); never overwritten unless --overwrite")
    p.add_argument("--scheduler", default=None,
                   help="'local' for a LocalCluster, or a dask scheduler address (tcp://host:8786); "
                        "default: run in this process with a thread pool")
    p.add_argument("--workers", type=int, default=None,
                   help="LocalCluster workers / threads (default: number of CPU cores)")
    p.add_argument("--block", type=int, default=None,
                   help="block edge in pixels per task (default 2048; smaller = less memory)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="seconds to wait for the scheduler address (default 5)")
    p.add_argument("--device", default="cpu", help="device for each worker: cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.errors import InputError
    from ..core.io import _ext
    from ..distributed import DEFAULT_BLOCK, DEFAULT_CONNECT_TIMEOUT, iter_apply
    from .common import run_with_progress

    if _ext(args.output) != ".zarr":
        raise InputError(f"--output {args.output} must be a .zarr store")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.block is not None and args.block < 16:
        raise InputError(f"--block must be at least 16 pixels, got {args.block}")
    out = run_with_progress(iter_apply(
        args.model, args.input, args.output, scheduler=args.scheduler, n_workers=args.workers,
        overwrite=args.overwrite, device=args.device, block=args.block or DEFAULT_BLOCK,
        connect_timeout=DEFAULT_CONNECT_TIMEOUT if args.connect_timeout is None else args.connect_timeout),
        quiet=args.quiet)
    if out is None:
        print("leakseg apply: cancelled; no output was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0
