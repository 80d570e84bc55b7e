"""``leakseg segment``: scribble-guided or unsupervised segmentation of one image (or stack)."""

from __future__ import annotations

from . import common


def register(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image by differentiable feature clustering (optionally guided by scribbles)",
        description=(
            "Train a small network on IMAGE and write its segmentation. With --scribbles, "
            "scribbled classes keep their ids and other clusters get higher ids "
            "(or none with --classes-only). Without scribbles the image is segmented unsupervised."
        ),
    )
    p.add_argument("image", help="input image (.tif, .png, .jpg, .npy or .zarr): 2D gray, RGB(A) or a stack")
    p.add_argument("--scribbles", help="scribble label image of the same size (0 = unlabeled, 1..255 = classes)")
    p.add_argument("--unlabeled-value", type=int, choices=(0, 255), default=0,
                   help="value meaning 'unlabeled' in the scribble file (default 0). With 255, every other "
                        "value (0 included) is a class, and the output keeps the file's class values")
    p.add_argument("--segments", type=int, default=None, metavar="K",
                   help="at most K clusters in the output (default: as many as the network finds)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help="training iterations at most (default: 150 fast / 1000 paper; stops earlier when converged)")
    g.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop training after S seconds")
    p.add_argument("--classes-only", action="store_true",
                   help="give every pixel one of the scribbled classes (needs --scribbles)")
    p.add_argument("--config", choices=("auto", "filters", "fast", "paper"), default="auto",
                   help="'auto' (default): 'filters' with scribbles, 'fast' without; 'filters': a per-pixel "
                        "network on a multiscale filter bank; 'fast': a small CNN on the image itself; "
                        "'paper': the reference configuration (slow)")
    p.add_argument("--merge", type=float, default=None, metavar="DE",
                   help="without scribbles: merge adjacent regions whose mean colour differs by less than DE "
                        "(CIELAB ΔE; 100 × intensity for grey; default 12 with the fast config, 0 = off)")
    p.add_argument("--edge-smoothing", type=int, default=None, metavar="PX",
                   help="with scribbles (filters config): smooth the class map within PX pixels along the "
                        "image's own edges (guided filter; default 8, 0 = off)")
    p.add_argument("--sharpen", type=int, default=None, metavar="N",
                   help="with scribbles (filters config): N more iterations of self-training at the end, with "
                        "each class's share of the image held fixed (default 10, 0 = off)")
    p.add_argument("--colour", default=None, metavar="lab|rgb",
                   help="with scribbles (filters config), RGB images: compute the filter bank on CIELAB "
                        "(default lab) or on the RGB channels")
    p.add_argument("--stack", action="store_true",
                   help="treat a 3D input as a Z/T stack of 2D images (one shared model); default guesses")
    p.add_argument("--save-model", metavar="M", help="also save the trained model (.pt) for `leakseg apply` "
                                                     "or warm starts")
    p.add_argument("--warm-start", metavar="M", help="continue from a model saved with --save-model")
    common.add_seed_arg(p)
    common.add_device_arg(p)
    common.add_out_arg(p)
    common.add_quiet_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..core import io, store
    from ..core.errors import InputError
    from ..scribble import iter_segment

    inputs = [args.image, args.scribbles, args.warm_start]
    io.check_output_path(args.out, args.overwrite, inputs)
    if args.save_model:
        common.check_model_out(args.save_model, args.overwrite, inputs + [args.out])
    image = np.asarray(common.read(args.image, lazy=False))
    scr = None
    if args.scribbles:
        raw = np.asarray(common.read(args.scribbles, lazy=False))
        if raw.ndim == 3 and raw.shape[-1] in (3, 4) and raw.shape[:2] == image.shape[:2]:
            raise InputError(f"scribbles {args.scribbles} is a colour image (shape {raw.shape}); "
                             "it must be a single-channel label image")
        if raw.dtype.kind not in "iub":
            raise InputError(f"scribbles {args.scribbles} has dtype {raw.dtype}; it must hold integer ids")
        if args.unlabeled_value == 255:
            if raw.max(initial=0) > 255:
                raise InputError(f"scribbles {args.scribbles} has values above 255; with "
                                 "--unlabeled-value 255 ids must be 0..254")
            scr = np.where(raw == 255, 0, raw.astype(np.int64) + 1)
        else:
            scr = raw
    warm = None
    if args.warm_start:
        sd, meta = store.load(args.warm_start, capability="scribble")
        warm = {"state_dict": sd, "metadata": meta}
    gen = iter_segment(image, scr, n_segments=args.segments, max_iter=args.max_iter,
                       time_budget=args.time_budget, seed=args.seed, device=args.device,
                       warm_start=warm, classes_only=args.classes_only, config=args.config,
                       stack=True if args.stack else None, merge=args.merge,
                       guide_r=args.edge_smoothing, sharpen_iter=args.sharpen, colour=args.colour)
    res = common.run_with_progress(gen, quiet=args.quiet)
    labels = res.labels
    if scr is not None and args.unlabeled_value == 255:
        labels = (labels.astype(np.int64) - 1).clip(0)  # back to the file's class values
        from ..core.labels import smallest_uint

        labels = smallest_uint(labels)
    common.write(args.out, labels, overwrite=args.overwrite, kind="labels")
    if args.save_model:
        store.save(res.state["state_dict"], args.save_model, res.state["metadata"], overwrite=args.overwrite)
    if not args.quiet:
        import sys

        print(f"leakseg segment: {res.n_labels} labels after {res.n_iter} iterations "
              f"({res.stopped}, {res.seconds:.1f} s) -> {args.out}", file=sys.stderr)
    return 0
