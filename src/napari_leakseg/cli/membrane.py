"""``leakseg membrane train|predict``: reference-assisted membrane segmentation.

Examples::

    leakseg membrane train --images imgs/ --labels labs/ --membrane-value 0 --epochs 6 --out em.pt
    leakseg membrane train --set isbi/image isbi/label 0 --set medulla/image medulla/membrane 255 --out em.pt
    leakseg membrane finetune --model em.pt --images new/0.png --labels new_lab/0.png --membrane-value 255 \
        --seconds 60 --out em_new.pt
    leakseg membrane predict --model em.pt --ref-images imgs/0.png --ref-labels labs/0.png \\
        --membrane-value 0 new.png --out new_membrane.tif --probability new_prob.tif --cells new_cells.tif
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError
from .common import (add_device_arg, add_out_arg, add_quiet_arg, add_seed_arg, check_model_out, read,
                     run_with_progress, write)


def _expand(items, what: str) -> list[Path]:
    """Files as given; a directory expands to its image files in natural (numeric) order."""
    import re

    from ..core.io import READ_EXT

    out: list[Path] = []
    for it in items or []:
        p = Path(it)
        if p.is_dir() and not str(p).lower().rstrip("/").endswith(".zarr"):
            files = [f for f in p.iterdir() if f.suffix.lower() in READ_EXT and not f.name.startswith(".")]
            key = lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)]  # noqa: E731
            files.sort(key=key)
            if not files:
                raise InputError(f"{what} folder {p} has no image files ({', '.join(READ_EXT)})")
            out += files
        else:
            if not p.exists():
                raise InputError(f"{what} {p} does not exist")
            out.append(p)
    return out


def _read_all(paths):
    import numpy as np

    return [np.asarray(read(p, lazy=False)) for p in paths]


def register(sub) -> None:
    p = sub.add_parser("membrane", help="reference-assisted membrane segmentation (train / predict)",
                       description="Membrane segmentation that uses annotated reference images at prediction time.")
    msub = p.add_subparsers(dest="membrane_command", metavar="ACTION")

    t = msub.add_parser("train", help="train a membrane model on annotated images")
    t.add_argument("--images", nargs="+", metavar="DIR|FILE",
                   help="training images (files, or folders of images)")
    t.add_argument("--labels", nargs="+", metavar="DIR|FILE",
                   help="label images paired with --images in order")
    t.add_argument("--set", nargs=3, action="append", metavar=("IMAGES", "LABELS", "VALUE"), default=[],
                   help="one more annotated set (a folder or stack of images, its labels, its membrane value); "
                        "repeat for several stacks. Each episode draws its target and reference crops from one set")
    t.add_argument("--width", type=float, default=None,
                   help="training membrane width in pixels (default: the median of the sets' widths, "
                        "measured from their labels); every set is rescaled to it")
    t.add_argument("--membrane-value", type=int, default=1,
                   help="label value that marks membrane (default 1; 0 for ISBI-style 0=membrane/255=cell). "
                        "If it is not 0, label 0 means unlabeled")
    t.add_argument("--epochs", type=int, default=6, help="epochs (default 6)")
    t.add_argument("--steps-per-epoch", type=int, default=60, help="batches per epoch (default 60)")
    t.add_argument("--crop", type=int, default=128, help="training crop size in pixels (default 128)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--no-references", action="store_true",
                   help="train the no-reference baseline (plain segmentation head)")
    t.add_argument("--no-feedback", dest="feedback", action="store_false",
                   help="no feedback refinement (default: the probability is fed back as a second input "
                        "channel; it improved the ISBI 2012 benchmark)")
    t.add_argument("--init", metavar="MODEL", help="fine-tune this membrane model instead of starting fresh")
    add_out_arg(t, help="model file to write (.pt); never overwritten unless --overwrite")
    add_device_arg(t)
    add_seed_arg(t)
    add_quiet_arg(t)
    t.set_defaults(func=run_train)

    q = msub.add_parser("predict", help="predict membranes (and cells) with a trained model and references")
    q.add_argument("--model", required=True, help="membrane model file (.pt)")
    q.add_argument("--ref-images", nargs="+", metavar="DIR|FILE",
                   help="annotated reference images (default: the references saved with the model)")
    q.add_argument("--ref-labels", nargs="+", metavar="DIR|FILE", help="labels of --ref-images, in order")
    q.add_argument("--membrane-value", type=int, default=None,
                   help="membrane value in --ref-labels (default: the model's)")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="2D images or stacks to segment")
    q.add_argument("--n-refs", type=int, default=4, help="reference crops retrieved and averaged (default 4)")
    q.add_argument("--threshold", type=float, default=0.5, help="membrane probability threshold (default 0.5)")
    q.add_argument("--min-size", type=int, default=30, help="smallest cell in pixels (default 30)")
    q.add_argument("--feedback-iters", type=int, default=None,
                   help="feedback passes (default: 1 for feedback models, else 0)")
    q.add_argument("--scale", type=float, default=None,
                   help="zoom the images by this factor before the network (default: the model's training "
                        "membrane width / the references' membrane width, or the model's own)")
    q.add_argument("--no-references", dest="use_references", action="store_false",
                   help="run the plain head, without attention over references")
    q.add_argument("--no-ref-head", dest="ref_head", action="store_false",
                   help="do not fit the per-pixel head to --ref-images/--ref-labels (attention only)")
    add_out_arg(q, help="binary membrane mask (.tif/.png/.npy/.zarr); with several IMAGEs an existing folder")
    q.add_argument("--probability", metavar="PATH", help="also write the probability map here (one IMAGE)")
    q.add_argument("--cells", metavar="PATH", help="also write the cell instances here (one IMAGE)")
    add_device_arg(q)
    add_quiet_arg(q)
    q.set_defaults(func=run_predict)

    f = msub.add_parser("finetune", help="fine-tune a membrane model on a few annotated slices for a fixed time")
    f.add_argument("--model", required=True, help="membrane model file (.pt) to start from (not modified)")
    f.add_argument("--images", nargs="+", required=True, metavar="DIR|FILE", help="annotated images or stacks")
    f.add_argument("--labels", nargs="+", required=True, metavar="DIR|FILE", help="their labels, in order")
    f.add_argument("--membrane-value", type=int, default=None, help="membrane value in --labels (default: the model's)")
    f.add_argument("--seconds", type=float, default=60.0, help="fine-tuning time in seconds (default 60)")
    f.add_argument("--lr", type=float, default=1e-3)
    add_out_arg(f, help="fine-tuned model file to write (.pt); never overwritten unless --overwrite")
    add_device_arg(f)
    add_seed_arg(f)
    add_quiet_arg(f)
    f.set_defaults(func=run_finetune)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_train(args) -> int:
    from .. import membrane as M

    inputs = [p for p in [args.init] + list(args.images or []) + list(args.labels or [])
              + [x for si, sl, _ in (args.set or []) for x in (si, sl)] if p]
    out = check_model_out(args.out, args.overwrite, inputs)
    if (args.images is None) != (args.labels is None):
        raise InputError("give both --images and --labels (or use --set IMAGES LABELS VALUE)")
    if args.images is None and not args.set:
        raise InputError("no training data: give --images and --labels, or --set IMAGES LABELS VALUE")
    sets = []
    if args.images is not None:
        sets.append(_read_set(args.images, args.labels, args.membrane_value, "image"))
    for i, (si, sl, sv) in enumerate(args.set):
        try:
            v = int(sv)
        except ValueError:
            raise InputError(f"--set {i + 1}: the membrane value must be an integer; got {sv!r}") from None
        sets.append(_read_set([si], [sl], v, f"set {i + 1} image"))
    init = M.load_model(args.init) if args.init else None
    tm = run_with_progress(
        M.iter_train_membrane(sets=sets, membrane_value=sets[0][2],
                              use_reference=not args.no_references, feedback=args.feedback,
                              epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, crop=args.crop,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                              init=init, width=args.width),
        quiet=args.quiet)
    tm.save(out, overwrite=args.overwrite)
    if not args.quiet:
        tr = tm.metadata["train"]
        print(f"saved {out} ({tr['steps_done']} steps, {tr['seconds']:.0f} s, "
              f"{'with' if tm.model.use_reference else 'no'} references)")
    return 0


def _read_set(images, labels, membrane_value, what):
    imgs = _expand(images, what)
    labs = _expand(labels, what.replace("image", "labels"))
    if len(imgs) != len(labs):
        raise InputError(f"{len(imgs)} {what}s but {len(labs)} label files; they must pair up")
    return _read_all(imgs), _read_all(labs), int(membrane_value)


def run_finetune(args) -> int:
    from .. import membrane as M

    out = check_model_out(args.out, args.overwrite, [args.model] + list(args.images) + list(args.labels))
    ims, labs, _ = _read_set(args.images, args.labels, 0, "image")
    tm = M.load_model(args.model)
    res = run_with_progress(
        M.iter_finetune_membrane(tm, ims, labs, membrane_value=args.membrane_value, seconds=args.seconds,
                                 lr=args.lr, seed=args.seed, device=args.device),
        quiet=args.quiet)
    res.save(out, overwrite=args.overwrite)
    if not args.quiet:
        tr = res.metadata["train"]
        print(f"saved {out} (fine-tuned {tr['steps_done']} steps in {tr['seconds']:.0f} s; reads new images "
              f"at scale {res.metadata.get('input_scale', 1.0):.2f})")
    return 0


def run_predict(args) -> int:
    import warnings

    import numpy as np

    from .. import membrane as M
    from ..core.io import check_output_path

    if (args.ref_images is None) != (args.ref_labels is None):
        raise InputError("give both --ref-images and --ref-labels (or neither to use the model's saved references)")
    imgs = _expand(args.images, "image")
    inputs = imgs + [args.model] + _expand(args.ref_images, "reference image") + \
        _expand(args.ref_labels, "reference labels")  # files (folders expanded), as for the images
    outs = []
    out = Path(args.out)
    if len(imgs) > 1:
        if not out.is_dir():
            raise InputError(f"with {len(imgs)} images, --out must be an existing folder; {out} is not")
        if args.probability or args.cells:
            raise InputError("--probability/--cells name one file; with several images they are written into the --out folder")
        for p in imgs:
            stem = p.name.split(".")[0]
            trip = tuple(out / f"{stem}_{k}.tif" for k in ("membrane", "probability", "cells"))
            for t in trip:
                check_output_path(t, args.overwrite, inputs)
            outs.append(trip)
    else:
        trip = (out, Path(args.probability) if args.probability else None, Path(args.cells) if args.cells else None)
        for t in trip:
            if t is not None:
                check_output_path(t, args.overwrite, inputs)
        outs.append(trip)
    tm = M.load_model(args.model)
    pred = M.MembranePredictor(tm, device=args.device, n_refs=args.n_refs, feedback_iters=args.feedback_iters,
                               scale=args.scale, use_references=args.use_references, ref_head=args.ref_head)
    refs = None
    if args.ref_images is not None:
        ri, rl = _expand(args.ref_images, "reference image"), _expand(args.ref_labels, "reference labels")
        if len(ri) != len(rl):
            raise InputError(f"{len(ri)} reference images but {len(rl)} reference label files; they must pair up")
        refs = (_read_all(ri), _read_all(rl))
    elif pred.use_references and tm.bank is None:
        raise InputError("fewer than 1 reference: the model has no saved references; give --ref-images/--ref-labels")
    first = True
    for path, (o_mem, o_prob, o_cells) in zip(imgs, outs):
        img = np.asarray(read(path, lazy=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run_with_progress(
                M.iter_predict_membrane(pred, img, *(refs if (refs and first) else (None, None)),
                                        membrane_value=args.membrane_value, threshold=args.threshold,
                                        min_size=args.min_size),
                quiet=args.quiet)
        for w in caught:
            print(f"leakseg membrane: warning: {w.message}", file=__import__("sys").stderr)
        first = False
        write(o_mem, res["membrane"], overwrite=args.overwrite, kind="labels")
        if o_prob is not None:
            write(o_prob, res["probability"], overwrite=args.overwrite, kind="image")
        if o_cells is not None:
            write(o_cells, res["cells"], overwrite=args.overwrite, kind="labels")
        if not args.quiet:
            print(f"{path.name}: membrane {float(res['membrane'].mean()):.1%} of pixels, "
                  f"{len(np.unique(res['cells'])) - (1 if (res['cells'] == 0).any() else 0)} cells -> {o_mem}")
    return 0
