"""``leakseg propagate``: propagate labels from annotated frames through a time-lapse."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from . import common


def register(sub) -> None:
    p = sub.add_parser(
        "propagate",
        help="propagate labels from a few annotated frames through a time-lapse (pseudo-labels)",
        description=(
            "Train a small U-Net on the annotated frames of a T×Y×X stack, then walk through time: "
            "predict each frame, keep confident pixels (≥ tau) as pseudo-labels, fine-tune, go on. "
            "Annotated frames are never modified. For .zarr outputs the per-frame status "
            "(annotated/confirmed/pseudo/pending) is stored in the store's provenance."
        ),
    )
    p.add_argument("stack", help="T×Y×X time-lapse (.tif, .npy or .zarr; .zarr is read frame by frame)")
    p.add_argument("--labels", required=True,
                   help="T×Y×X label stack; frames with any nonzero label are the annotations")
    p.add_argument("--frames", type=common.parse_int_list, default=None,
                   help="comma-separated annotated frames (default: every frame that has labels)")
    p.add_argument("--tau", type=float, default=0.9, help="confidence threshold for pseudo-labels (default 0.9)")
    p.add_argument("--steps", type=int, default=None, help="fine-tune steps per frame (default 6)")
    p.add_argument("--init-steps", type=int, default=None, help="training steps on the annotations (default 400)")
    p.add_argument("--window", type=int, default=None, help="recent pseudo frames kept for training (default 4)")
    p.add_argument("--downsample", type=int, default=None, help="process frames at 1/N resolution (default 2)")
    p.add_argument("--direction", choices=("forward", "backward", "both"), default="both",
                   help="propagation direction from each annotated frame (default both)")
    p.add_argument("--instances", action="store_true",
                   help="instance mode: binarise labels, split cells and link ids through time")
    p.add_argument("--split", choices=("track", "cc", "watershed"), default="track",
                   help="instances: 'track' grows each frame's cells from the previous frame's, ids from the "
                        "annotation (default); 'cc'/'watershed' split each frame on its own and link by overlap")
    p.add_argument("--min-size", type=int, default=30, help="smallest instance in pixels (default 30)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="instances: also label objects that no annotated cell leads to (cells entering the field, "
                        "debris). By default the walk follows the annotated cells only; a new cell is followed "
                        "from a frame where you label it")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each frame's prediction over its 4 flips (test-time augmentation; on by default: "
                        "slightly better, about 3%% slower); --no-tta predicts each frame once")
    p.add_argument("--ctc-dir", default=None,
                   help="also write Cell Tracking Challenge results (mask%%03d.tif + res_track.txt) here "
                        "(implies --instances)")
    p.add_argument("--confidence", default=None, help="also write the per-frame confidence (uint8, 255 = sure)")
    p.add_argument("--save-model", default=None, help="save the final model (.pt)")
    common.add_out_arg(p)
    common.add_device_arg(p)
    common.add_seed_arg(p)
    common.add_quiet_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..core import io
    from ..propagate import Propagator, check_ctc_folder, export_ctc, iter_link_instances

    instances = bool(args.instances or args.ctc_dir)
    inputs = [args.stack, args.labels]
    out = io.check_output_path(args.out, args.overwrite, inputs)
    if args.confidence:
        io.check_output_path(args.confidence, args.overwrite, inputs)
    if args.ctc_dir:
        check_ctc_folder(args.ctc_dir, args.overwrite, inputs)
    if args.save_model:
        common.check_model_out(args.save_model, args.overwrite, inputs)
    stack = common.read(args.stack)
    labels = common.read(args.labels)
    if getattr(labels, "ndim", 0) == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    params = {k: v for k, v in dict(tau=args.tau, steps=args.steps, init_steps=args.init_steps,
                                        window=args.window, downsample=args.downsample,
                                        seed=args.seed).items() if v is not None}
    if not args.follow:
        params["follow"] = False
    if args.tta is not None:
        params["tta"] = bool(args.tta)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as work:
        lazy = not isinstance(stack, np.ndarray)
        lab_out = conf_out = None
        if lazy:  # keep memory bounded: outputs live in zarr arrays on disk
            import zarr

            shape = tuple(stack.shape[:3])
            chunks = (1,) + shape[1:]
            lab_out = zarr.open_array(f"{work}/labels.zarr", mode="w", shape=shape, chunks=chunks, dtype="uint8")
            conf_out = zarr.open_array(f"{work}/conf.zarr", mode="w", shape=shape, chunks=chunks, dtype="uint8")
        sess = Propagator(stack, labels, annotated=args.frames, device=args.device, instances=instances,
                          out=lab_out, confidence_out=conf_out, **params)
        if not args.quiet:
            print(f"leakseg propagate: {stack.shape[0]} frames, annotated {sess.anchors}, "
                  f"direction {args.direction}", file=sys.stderr)
        common.run_with_progress(sess.iter_run(args.direction), quiet=args.quiet)
        result = sess.labels
        if instances:
            inst_out = None
            if lazy:
                import zarr

                inst_out = zarr.open_array(f"{work}/inst.zarr", mode="w", shape=tuple(result.shape),
                                           chunks=(1,) + tuple(result.shape[1:]), dtype="uint32")
            if args.split == "track":
                result = common.run_with_progress(sess.iter_instances(out=inst_out, min_size=args.min_size),
                                                  quiet=args.quiet)
            else:
                result, _ = common.run_with_progress(
                    iter_link_instances(result, out=inst_out, method=args.split, min_size=args.min_size),
                    quiet=args.quiet)
        if lazy:
            import dask.array as da

            result = da.from_zarr(result)
        status = sess.frame_status()
        prov = {"capability": "propagate", "source": str(args.stack), "labels": str(args.labels),
                "direction": args.direction, "instances": instances,
                "params": {k: v for k, v in sess.metadata()["train"].items()},
                "frame_status": status}
        if io._ext(out) == ".zarr":
            common.write(out, result, overwrite=args.overwrite, kind="labels", axes="tyx",
                         name="propagated", provenance=prov)
        else:
            common.write(out, np.asarray(result), overwrite=args.overwrite, kind="labels")
            side = out.with_name(out.name + ".json")
            side.write_text(json.dumps(prov, indent=1))
        if args.confidence:
            conf = sess.confidence if not lazy else da.from_zarr(sess.confidence)
            if io._ext(args.confidence) == ".zarr":
                common.write(args.confidence, conf, overwrite=args.overwrite, kind="image", axes="tyx",
                             name="confidence", provenance=prov)
            else:
                common.write(args.confidence, np.asarray(conf), overwrite=args.overwrite, kind="image")
        if args.ctc_dir:
            export_ctc(result, args.ctc_dir, overwrite=args.overwrite)
        if args.save_model:
            sess.save_model(args.save_model, overwrite=args.overwrite)
    if not args.quiet:
        counts = {s: status.count(s) for s in ("annotated", "confirmed", "pseudo", "pending") if status.count(s)}
        print(f"leakseg propagate: wrote {out} ({', '.join(f'{v} {k}' for k, v in counts.items())})",
              file=sys.stderr)
    return 0
