"""``leakseg restore``: train an SEM restoration model and apply it.

    leakseg restore train --low L1.tif L2.tif --high H1.tif H2.tif --out model.pt
    leakseg restore train --high H1.tif --degrade noise=0.08,blur=0.8 --out model.pt
    leakseg restore train --high H1.tif --estimate-from L1.tif --out model.pt
    leakseg restore train --low L1.tif L2.tif --self-supervised [--method lines-ssim|lines|nb2nb|n2v] --out model.pt
    leakseg restore train --low L1.tif --self-supervised --high SIMILAR.tif --out model.pt
    leakseg restore train --low A1.tif --low2 B1.tif --noise2noise --out model.pt
    leakseg restore train --low L1.tif --high H1.tif --loss pix2pix --out gan.pt   (GAN: can fabricate)
    leakseg restore apply --model model.pt IMAGE.tif --out restored.tif [--risk-map]
                          [--output-scale input|float|normalized]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (add_device_arg, add_out_arg, add_quiet_arg, add_seed_arg, check_model_out, read,
                     run_with_progress, write)


def _bar(s: str):
    s = s.strip().lower()
    if s == "auto":
        return "auto"
    if s in ("none", "0", "no"):
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bar must be auto, none or a number of rows; got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("--bar rows must be ≥ 0")
    return v


def register(sub) -> None:
    p = sub.add_parser("restore", help="SEM restoration: train an SSIM U-Net, apply it, check fabrication",
                       description="Restore low-quality SEM images with a U-Net trained from paired images, "
                                   "from high-quality images plus a degradation model, or self-supervised.")
    s2 = p.add_subparsers(dest="restore_command", metavar="ACTION")

    t = s2.add_parser("train", help="train a restoration model")
    t.add_argument("--low", nargs="+", metavar="IMAGE", help="low-quality image(s)")
    t.add_argument("--high", nargs="+", metavar="IMAGE", help="high-quality image(s) (same fields as --low "
                   "for paired training, or alone with --degrade / --estimate-from)")
    t.add_argument("--degrade", metavar="K=V,..", help="train from --high only with this degradation: "
                   "noise (Gaussian sd), poisson, blur (PSF sigma px), jitter (px), downsample, scan_corr; "
                   "values are in units of the clean image scaled to [0, 1]")
    t.add_argument("--estimate-from", metavar="IMAGE", help="estimate the degradation from this low-quality "
                   "example (train from --high only; --degrade values override the estimate)")
    t.add_argument("--self-supervised", action="store_true", help="train from --low only (no clean image); "
                   "with --high (a clean image of a similar sample, not the same field) the degradation is "
                   "estimated from the --low images and applied to --high instead")
    t.add_argument("--method", choices=("lines-ssim", "lines", "nb2nb", "n2v"), default="lines-ssim",
                   help="self-supervised method for SEM noise correlated along the scan lines: lines-ssim "
                        "(default: even scan lines predict odd ones with a noise-corrected SSIM loss; restores "
                        "with the four flips along/across the lines averaged, 4x the apply time), lines (the "
                        "same with an MSE loss, no flips), nb2nb (Neighbor2Neighbor with neighbours on "
                        "different lines) or n2v (structN2V blind spot along the scan line)")
    t.add_argument("--noise2noise", action="store_true", help="Noise2Noise: --low and --low2 are two fast "
                   "scans of the same fields (in the same order); they are registered to each other")
    t.add_argument("--low2", nargs="+", metavar="IMAGE", help="second scans of the --low fields (--noise2noise)")
    t.add_argument("--loss", choices=("ssim", "mse", "l1", "pix2pix"), default="ssim",
                   help="ssim = 0.84·(1−SSIM) + 0.16·L1 (default), mse, l1, or pix2pix (a GAN, for "
                        "comparison: it can invent particles; its models always write a risk map)")
    t.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    t.add_argument("--crop", type=int, default=128, help="training crop size (default 128)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--bar", type=_bar, default="auto", help="instrument data bar at the bottom: auto "
                   "(detect, default), none, or a number of rows to crop")
    add_out_arg(t, help="model file to write (.pt); never overwritten unless --overwrite")
    add_device_arg(t)
    add_seed_arg(t)
    add_quiet_arg(t)
    t.set_defaults(func=run_train)

    a = s2.add_parser("apply", help="restore images with a trained model")
    a.add_argument("--model", required=True, help="model file from 'leakseg restore train'")
    a.add_argument("images", nargs="+", metavar="IMAGE", help="image(s) to restore (.tif .png .npy .zarr)")
    add_out_arg(a, help="output file for one image, or an existing folder for several "
                        "(<name>_restored.tif); never overwritten unless --overwrite")
    a.add_argument("--risk-map", action="store_true", help="also write the fabrication-risk map "
                   "(<out>_risk.<ext>): z-score of structure the input does not support")
    a.add_argument("--output-scale", choices=("input", "float", "normalized"), default="input",
                   help="input (default): the input's dtype and intensity range (uint8 in, uint8 out); "
                        "float: the input's intensity scale as float32; normalized: float32 ≈ 0-1")
    a.add_argument("--tile", type=int, default=512, help="tile size for large images (default 512)")
    add_device_arg(a)
    add_quiet_arg(a)
    a.set_defaults(func=run_apply)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _load_all(paths):
    return [read(x, lazy=False) for x in paths]


def run_train(args) -> int:
    from ..core.errors import InputError
    from .. import restore as R

    out = check_model_out(args.out, args.overwrite,
                          list(args.low or []) + list(args.low2 or []) + list(args.high or [])
                          + [args.estimate_from])
    est = None
    if args.low2 and not args.noise2noise:
        raise InputError("--low2 is for --noise2noise (two scans of the same fields)")
    if args.noise2noise:
        if not args.low or not args.low2 or args.high or args.self_supervised:
            raise InputError("--noise2noise trains from --low and --low2 (two scans of each field) only")
        mode = "noise2noise"
    elif args.self_supervised:
        if not args.low:
            raise InputError("--self-supervised needs --low images")
        if args.degrade:
            raise InputError("--degrade goes with --high alone; with --self-supervised --high the "
                             "degradation is estimated from the --low images")
        mode = "degrade" if args.high else "self-supervised"
        if args.high:  # a clean image of a similar sample: the degradation is estimated from the lows
            est = _load_all(args.low)
    elif args.degrade or args.estimate_from:
        if not args.high or args.low:
            raise InputError("--degrade/--estimate-from train from --high images only (drop --low)")
        mode = "degrade"
    elif args.low and args.high:
        mode = "paired"
    else:
        raise InputError("give --low and --high (paired), --high with --degrade or --estimate-from, "
                         "or --low with --self-supervised")
    if args.loss == "pix2pix":
        print("warning: pix2pix (GAN) training can invent particles that are not in the sample; use it for "
              "comparison, and check its output with the fabrication-risk map (written by 'apply')",
              file=sys.stderr)
    low = _load_all(args.low) if args.low and mode != "degrade" else None
    low2 = _load_all(args.low2) if args.low2 else None
    high = _load_all(args.high) if args.high else None
    if args.estimate_from:
        est = read(args.estimate_from, lazy=False)
    gen = R.train_restore(low=low, high=high, low2=low2, mode=mode, loss=args.loss, degradation=args.degrade,
                          estimate_from=est, steps=args.steps, crop=args.crop, batch_size=args.batch_size,
                          ss_method=args.method, bar=args.bar, seed=args.seed, device=args.device,
                          preview=False)
    model = run_with_progress(gen, args.quiet)
    if model is None:
        return 130
    model.save(out, overwrite=args.overwrite)
    tr = model.metadata["train"]
    if not args.quiet:
        vs = tr.get("val_ssim")
        print(f"wrote {out} ({mode}" + (f", {tr['ss_method']}" if tr.get("ss_method") else "")
              + f", loss {tr['loss']}"
              + (f", validation SSIM {vs:.3f}" if vs is not None else "") + ")")
    return 0


def run_apply(args) -> int:
    import numpy as np

    from ..core.errors import InputError
    from ..core.io import check_output_path
    from .. import restore as R

    model = R.RestoreModel.load(args.model, device=args.device)
    if model.metadata.get("gan") and not args.risk_map:
        print("warning: this is a pix2pix (GAN) model, which can invent particles; writing the "
              "fabrication-risk map too", file=sys.stderr)
        args.risk_map = True
    outp = Path(args.out)
    if len(args.images) > 1:
        if not outp.is_dir():
            raise InputError(f"with several images, --out must be an existing folder; {outp} is not")
        outs = [outp / f"{Path(x).name.split('.')[0]}_restored.tif" for x in args.images]
        if len(set(outs)) < len(outs):
            raise InputError("several inputs have the same name (before the extension); "
                             "restore them one at a time with their own --out")
    else:
        outs = [outp]

    def risk_path(o: Path) -> Path:
        name = o.name
        for ext in (".ome.zarr", ".zarr", ".tiff", ".tif", ".png", ".npy"):
            if name.lower().endswith(ext):
                return o.with_name(name[: -len(ext)] + "_risk" + ext)
        return o.with_name(name + "_risk")

    inputs = list(args.images) + [args.model]
    for o in outs:  # fail before any work
        check_output_path(o, args.overwrite, inputs)
        if args.risk_map:
            check_output_path(risk_path(o), args.overwrite, inputs)
    for src, o in zip(args.images, outs):
        img = read(src, lazy=True)
        shape = tuple(img.shape)
        big = len(shape) == 2 and shape[0] * shape[1] > 4096 * 4096
        if not big:
            img = np.asarray(img)
        tmpdir = None
        if big:  # bounded memory: tiles go to a temporary zarr, then out by extension
            y, tmpdir = _restore_big(R, model, img, o, args)
        elif np.ndim(img) == 2 or (np.ndim(img) == 3 and img.shape[-1] in (3, 4)):
            y = run_with_progress(R.iter_restore(model, img, tile=args.tile, device=args.device,
                                                 output=args.output_scale), args.quiet)
        else:
            y = R.restore_image(model, img, tile=args.tile, device=args.device, output=args.output_scale)
        try:
            write(o, y, overwrite=args.overwrite, kind="image")
        finally:
            if tmpdir is not None:
                import shutil

                shutil.rmtree(tmpdir, ignore_errors=True)
        msg = f"wrote {o}"
        if args.risk_map:
            if big:
                raise InputError("--risk-map is computed in memory; it is not available for images "
                                 "larger than 4096×4096")
            if y.ndim == 3:
                risk = np.stack([R.fabrication_risk_map(a, b) for a, b in zip(img, y)])
            else:
                risk = R.fabrication_risk_map(img, y)
            write(risk_path(o), risk, overwrite=args.overwrite, kind="image")
            msg += f" and {risk_path(o)} (risk > 4 at {100 * float((risk > 4).mean()):.2f}% of pixels)"
        if not args.quiet:
            print(msg)
    return 0


def _restore_big(R, model, img, o, args):
    import tempfile

    import dask.array as da
    import zarr

    tmpdir = tempfile.mkdtemp(prefix=".leakseg-restore-", dir=str(o.parent if str(o.parent) else "."))
    z = zarr.open_array(str(Path(tmpdir) / "tmp.zarr"), mode="w", shape=(1,) + tuple(img.shape),
                        chunks=(1, 1024, 1024), dtype="float32")
    run_with_progress(R.iter_restore(model, img, tile=args.tile, device=args.device, out=z,
                                     output=args.output_scale), args.quiet)
    return da.from_zarr(z)[0].astype(R.output_dtype(img, args.output_scale)), tmpdir
