"""Benchmark: reference-assisted membrane segmentation on ISBI 2012.

Train on slices 0-19 (full: all 20; few-shot: 2 of them), test on 20-29.
Methods (same U-Net, same crops/batches/steps for the three networks):

* baseline   - encoder + plain seg head, no references
* ours       - + reference attention fused into the logits; references = the
               training slices (retrieved crops, averaged over ``n_refs``)
* ours+fb    - ours trained and run with feedback refinement (probability fed
               back as a second input channel, one extra pass)
* baseline+fb - the baseline network with the same feedback (the fair
               comparison for ours+fb: feedback without references)
* random forest - ilastik-style pixel classifier (sklearn) on multiscale
               Gaussian / gradient / Hessian features

Metrics on the 10 test slices: membrane pixel F1 and IoU (pooled over all
pixels, threshold 0.5), adapted Rand error and variation of information
(split + merge) of the watershed cell instances against the connected
components of the ground-truth cell interiors (membrane pixels ignored), mean
over slices; training time and median inference time per 512x512 slice.

Run (timed, under the shared lock):

    flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_membrane.py

``--timing`` only measures training speed and prediction time per 512×512 slice for
each network (quick: short training, since the cost per step and per slice does
not depend on how long a model was trained).

``--steps`` sets the training budget (default 600 steps of 4 crops of 128 px).
Writes benchmarks/results/membrane.json, docs/benchmarks/membrane.md and
docs/images/membrane_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_leakseg import membrane as M  # noqa: E402


def data_dir() -> Path:
    env = os.environ.get("LEAKSEG_DATA")
    base = Path(env) if env else ROOT / ".." / "shared" / "data"
    return base / "em" / "isbi2012"


def load(d: Path, ids):
    import imageio.v3 as iio

    ims = [np.asarray(iio.imread(d / "image" / f"{i}.png")) for i in ids]
    lbs = [np.asarray(iio.imread(d / "label" / f"{i}.png")) for i in ids]
    return ims, lbs


def gt_instances(lab):
    from scipy import ndimage as ndi

    return ndi.label(lab > 0)[0]


def scores(probs, labels, min_size=30):
    from skimage.metrics import adapted_rand_error, variation_of_information

    tp = fp = fn = 0
    ares, vois = [], []
    for p, lab in zip(probs, labels):
        pred = p >= 0.5
        true = lab == 0
        tp += int((pred & true).sum())
        fp += int((pred & ~true).sum())
        fn += int((~pred & true).sum())
        cells = M.cells_from_probability(p, 0.5, min_size)
        gt = gt_instances(lab)
        are = adapted_rand_error(gt, cells, ignore_labels=(0,))[0]
        # VOI on cell pixels only (membrane pixels are not part of any GT instance)
        m = gt > 0
        sp, me = variation_of_information(gt[m], cells[m])
        ares.append(float(are))
        vois.append(float(sp + me))
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    iou = tp / max(1, tp + fp + fn)
    return dict(f1=f1, iou=iou, adapted_rand_error=float(np.mean(ares)), voi=float(np.mean(vois)))


# ----------------------------------------------------------------- random forest (ilastik-style)


def rf_features(img):
    from skimage.feature import multiscale_basic_features

    x = M.normalize(img)
    return multiscale_basic_features(x, intensity=True, edges=True, texture=True,
                                     sigma_min=0.7, sigma_max=10, num_sigma=6)


def train_rf(ims, lbs, seed=0, per_image=10000):
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    X, y = [], []
    for im, lb in zip(ims, lbs):
        f = rf_features(im)
        idx = rng.choice(lb.size, min(per_image, lb.size), replace=False)
        X.append(f.reshape(-1, f.shape[-1])[idx])
        y.append((lb.reshape(-1)[idx] == 0).astype(np.uint8))
    rf = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=2, random_state=seed)
    rf.fit(np.concatenate(X), np.concatenate(y))
    return rf


def predict_rf(rf, img):
    f = rf_features(img)
    return rf.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(img.shape).astype(np.float32)


# ----------------------------------------------------------------- main


def predictor_with_references(tm, ims, lbs, n_refs):
    """A CPU predictor for ``tm`` and the seconds it took to encode ``ims``/``lbs`` as its
    references (None for a network without references)."""
    # ref_head=False: this in-domain benchmark measures the attention over the training slices, as
    # published; the reference head (stop 30) is measured in bench_membrane_cross.py
    pred = M.MembranePredictor(tm, device="cpu", n_refs=n_refs, ref_head=False)
    if not tm.model.use_reference:
        return pred, None
    t0 = time.perf_counter()
    pred.set_references(ims, lbs, membrane_value=0)
    return pred, time.perf_counter() - t0


def run_setting(name, train_ids, test_ims, test_lbs, d, args, log, with_rf=True):
    ims, lbs = load(d, train_ids)
    rows = []
    preds = {}
    common = dict(membrane_value=0, epochs=args.epochs, steps_per_epoch=args.steps // args.epochs,
                  batch_size=4, crop=128, seed=args.seed, device="cpu")
    nets = [("baseline", "baseline (no references)", dict(use_reference=False, feedback=False)),
            ("ours", "ours (references)", dict(use_reference=True, feedback=False))]
    if not args.no_feedback:
        nets.append(("fb", "ours + feedback", dict(use_reference=True, feedback=True)))
        # the fair comparison for "ours + feedback": the same network and feedback, no references
        nets.append(("bfb", "baseline + feedback (no references)", dict(use_reference=False, feedback=True)))
    wanted = args.methods.split(",")
    for key, label, kw in nets:
        if key not in wanted:
            continue
        t0 = time.perf_counter()
        tm = M.train_membrane(ims, lbs, **common, **kw)
        t_train = time.perf_counter() - t0
        # references = the training slices (re-encoded here so the time is measured)
        pred, t_ref = predictor_with_references(tm, ims, lbs, args.n_refs)
        variants = [(label, pred)]
        if tm.model.use_reference and not kw.get("feedback"):
            one = M.MembranePredictor(tm, device="cpu", n_refs=1)
            one.bank = pred.bank
            variants.append(("ours, 1 reference crop", one))
        if tm.model.use_reference and not kw.get("feedback") and len(train_ids) < 20:
            # the paper's use case: more annotated slices than were trained on, given only at test time
            more = M.MembranePredictor(tm, device="cpu", n_refs=args.n_refs, ref_head=False)
            more.set_references(*load(d, range(20)), membrane_value=0)
            variants.append(("ours, all 20 slices as references at test time", more))
        if kw.get("feedback") and tm.model.use_reference:  # same feedback-trained model without the feedback pass
            nofb = M.MembranePredictor(tm, device="cpu", n_refs=args.n_refs, feedback_iters=0)
            nofb.bank = pred.bank
            variants.append(("ours + feedback model, feedback pass off", nofb))
        for vlabel, vp in variants:
            probs, times = [], []
            for im in test_ims:
                t0 = time.perf_counter()
                probs.append(vp.probability(im))
                times.append(time.perf_counter() - t0)
            sc = scores(probs, test_lbs, args.min_size)
            row = dict(setting=name, method=vlabel, seed=args.seed, n_train=len(train_ids), train_s=round(t_train, 1),
                       infer_s=round(float(np.median(times)), 3),
                       ref_encode_s=None if t_ref is None else round(t_ref, 2),
                       steps=tm.metadata["train"]["steps_done"], **{k: round(v, 4) for k, v in sc.items()})
            rows.append(row)
            preds[vlabel] = probs
            log(row)
    if "rf" not in wanted or not with_rf:
        return rows, preds
    t0 = time.perf_counter()
    rf = train_rf(ims, lbs, seed=args.seed)
    t_train = time.perf_counter() - t0
    probs, times = [], []
    for im in test_ims:
        t0 = time.perf_counter()
        probs.append(predict_rf(rf, im))
        times.append(time.perf_counter() - t0)
    sc = scores(probs, test_lbs, args.min_size)
    row = dict(setting=name, method="random forest (ilastik-style)", seed=args.seed, n_train=len(train_ids),
               train_s=round(t_train, 1), infer_s=round(float(np.median(times)), 3), ref_encode_s=None,
               steps=None, **{k: round(v, 4) for k, v in sc.items()})
    rows.append(row)
    preds[row["method"]] = probs
    log(row)
    return rows, preds


METRICS = ("f1", "iou", "adapted_rand_error", "voi")


def by_method(rows):
    """Result rows grouped by (setting, method), in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    return groups


def summarize(rows):
    """Mean, sd and n over seeds for each (setting, method); times are medians over seeds."""
    out = []
    for (setting, method), rs in by_method(rows).items():
        srt = dict(setting=setting, method=method, n_train=rs[0]["n_train"], n_seeds=len(rs),
                   seeds=[r.get("seed", 0) for r in rs])
        for k in METRICS:
            v = np.array([r[k] for r in rs], float)
            srt[k] = float(v.mean())
            srt[k + "_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        for k in ("train_s", "infer_s", "ref_encode_s"):
            v = [r[k] for r in rs if r.get(k) is not None]
            srt[k] = round(float(np.median(v)), 3) if v else None
        out.append(srt)
    return out


def _pm(r, k, fmt):
    return f"{r[k]:{fmt}} ± {r[k + '_sd']:{fmt}}" if r.get("n_seeds", 1) > 1 else f"{r[k]:{fmt}}"


def table(rows):
    head = ("| setting | method | train slices | seeds | F1 ↑ | IoU ↑ | adapted Rand err ↓ | VOI ↓ | "
            "train s | infer s/slice | ref encode s |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        out.append(f"| {r['setting']} | {r['method']} | {r['n_train']} | {r.get('n_seeds', 1)} | {_pm(r, 'f1', '.3f')} | "
                   f"{_pm(r, 'iou', '.3f')} | {_pm(r, 'adapted_rand_error', '.3f')} | {_pm(r, 'voi', '.2f')} | "
                   f"{r['train_s']} | {r['infer_s']} | {'' if r['ref_encode_s'] is None else r['ref_encode_s']} |")
    return "\n".join(out)


def paired(rows, a, b):
    """Per-seed comparison of method ``a`` against ``b``: list of (setting, seed, dF1, dARE)."""
    idx = {(r["setting"], r.get("seed", 0), r["method"]): r for r in rows}
    out = []
    for (setting, seed, m), ra in sorted(idx.items()):
        rb = idx.get((setting, seed, b))
        if m == a and rb is not None:
            out.append((setting, seed, ra["f1"] - rb["f1"], ra["adapted_rand_error"] - rb["adapted_rand_error"]))
    return out


def paired_table(rows):
    pairs = [("ours (references)", "baseline (no references)"),
             ("ours + feedback", "baseline (no references)"),
             ("ours + feedback", "baseline + feedback (no references)")]
    out = ["| comparison | setting | seeds where F1 is higher | seeds where ARE is lower | mean ΔF1 | mean ΔARE |",
           "|---|---|---|---|---|---|"]
    for a, b in pairs:
        res = paired(rows, a, b)
        for setting in ("full", "few"):
            rs = [x for x in res if x[0] == setting]
            if not rs:
                continue
            out.append(f"| {a} vs {b} | {setting} | {sum(x[2] > 0 for x in rs)}/{len(rs)} | "
                       f"{sum(x[3] < 0 for x in rs)}/{len(rs)} | {np.mean([x[2] for x in rs]):+.3f} | "
                       f"{np.mean([x[3] for x in rs]):+.3f} |")
    return "\n".join(out)


def picture(test_im, test_lb, preds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(preds)
    fig, axes = plt.subplots(1, 2 + len(names), figsize=(3 * (2 + len(names)), 3.3))
    axes[0].imshow(test_im, cmap="gray")
    axes[0].set_title("slice 20")
    axes[1].imshow(test_lb == 0, cmap="gray_r")
    axes[1].set_title("ground truth")
    for ax, n in zip(axes[2:], names):
        ax.imshow(preds[n], cmap="magma", vmin=0, vmax=1)
        ax.set_title(n.replace(" (", "\n("), fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def timing(d, args, steps: int = 30, repeats: int = 5):
    """Seconds per training step (4 crops of 128 px) and median seconds per 512×512 test slice
    with 4 references (the 20 training slices encoded as the bank) for each network."""
    import torch

    ims, lbs = load(d, range(20))
    test = load(d, [20])[0][0]
    out = {"threads": torch.get_num_threads(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    for key, kw in (("baseline", dict(use_reference=False, feedback=False)),
                    ("ours", dict(use_reference=True, feedback=False)),
                    ("baseline+fb", dict(use_reference=False, feedback=True)),
                    ("ours+fb", dict(use_reference=True, feedback=True))):
        t0 = time.perf_counter()
        tm = M.train_membrane(ims, lbs, membrane_value=0, epochs=1, steps_per_epoch=steps, batch_size=4,
                              crop=128, seed=0, device="cpu", **kw)
        per_step = (time.perf_counter() - t0) / steps
        pred, t_ref = predictor_with_references(tm, ims, lbs, args.n_refs)
        pred.probability(test)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pred.probability(test)
            ts.append(time.perf_counter() - t0)
        out[key] = dict(train_s_per_step=round(per_step, 3),
                        train_s_est=round(per_step * args.steps, 1),
                        infer_s_median=round(float(np.median(ts)), 3),
                        ref_encode_s=None if t_ref is None else round(t_ref, 2))
        print(key, json.dumps(out[key]), flush=True)
    if not args.no_write and Path(args.out).exists():
        js = json.loads(Path(args.out).read_text())
        js["timing"] = out
        Path(args.out).write_text(json.dumps(js, indent=1))
    return 0


def big_image(d, args):
    """Tiled prediction of a large image (ISBI slices tiled), peak RSS measured by sampling."""
    import threading

    import psutil

    ims, lbs = load(d, [0, 1])
    tm = M.train_membrane(ims, lbs, membrane_value=0, epochs=1, steps_per_epoch=20, device="cpu")
    pred = M.MembranePredictor(tm, device="cpu")
    big = np.tile(load(d, [20])[0][0], (args.big // 512 + 1, args.big // 512 + 1))[: args.big, : args.big]
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    prob = pred.probability(big)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    res = dict(size=args.big, seconds=round(dt, 1), peak_rss_increase_mb=round((peak[0] - base) / 2**20, 1),
               output_mb=round(prob.nbytes / 2**20, 1), input_mb=round(big.nbytes / 2**20, 1), tile=pred.tile)
    print(json.dumps(res))
    if not args.no_write and Path(args.out).exists():
        js = json.loads(Path(args.out).read_text())
        js["big_image"] = res
        Path(args.out).write_text(json.dumps(js, indent=1))
    return 0


ORDER = ["baseline (no references)", "ours (references)", "ours, 1 reference crop",
         "ours, all 20 slices as references at test time", "baseline + feedback (no references)", "ours + feedback",
         "ours + feedback model, feedback pass off", "random forest (ilastik-style)"]


def write_outputs(rows, args, note=""):
    import torch

    def key(r):
        return ({"full": 0, "few": 1}.get(r["setting"], 2), ORDER.index(r["method"]) if r["method"] in ORDER else 99,
                r.get("seed", 0))

    rows = sorted(rows, key=key)
    summary = sorted(summarize(rows), key=key)
    env = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), platform=platform.platform())
    config = dict(steps=args.steps, epochs=args.epochs, batch_size=4, crop=128, base=16, depth=3,
                  n_refs=args.n_refs, min_size=args.min_size, seeds=sorted({r.get("seed", 0) for r in rows}),
                  few_shot_ids=[int(v) for v in args.few_ids.split(",")], test_ids=list(range(20, 30)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = dict(summary=summary, rows=rows, config=config, env=env, note=note)
    if Path(args.out).exists():  # keep what --timing / --big measured separately
        old = json.loads(Path(args.out).read_text())
        out.update({k: old[k] for k in ("timing", "big_image", "seed_check") if k in old})
    Path(args.out).write_text(json.dumps(out, indent=1))
    md = [
        "## Membrane segmentation (ISBI 2012, reference-assisted)",
        "",
        f"Train on slices 0–19 (full) or {config['few_shot_ids']} (few-shot); "
        "test on slices 20–29 (512×512). Every network: the same U-Net (base 16, depth 3), "
        f"{args.steps} steps of 4 random 128×128 crops with the same augmentation and the same target crops; "
        "'ours' additionally attends over reference crops (the training slices, retrieved by embedding "
        f"similarity, {args.n_refs} averaged). F1/IoU: membrane pixels, threshold 0.5. Adapted Rand error and VOI "
        "(split+merge): watershed cell instances vs. connected components of the ground-truth cell "
        "interiors, mean over the 10 slices. Inference = median per 512×512 slice with references already "
        "encoded ('ref encode s' is the one-off cost of encoding the reference slices). Networks: mean ± sd "
        f"over seeds {config['seeds']} (the random forest: one seed); times are medians over seeds.",
        "",
        table(summary),
        "",
        "Per seed, the same seed's networks see the same target crops:",
        "",
        paired_table(rows),
        "",
    ]
    tm = out.get("timing")
    if tm:
        md += [f"Speed alone (`--timing`: {tm['threads']} torch threads, load average at the start "
               f"{tm['loadavg_start'][0]}; median of 5 predictions of slice 20 with 4 references):", "",
               "| network | train s / step | train s for the benchmark budget | predict s / 512×512 | ref encode s |",
               "|---|---|---|---|---|"]
        for k in ("baseline", "ours", "baseline+fb", "ours+fb"):
            if k in tm:
                t = tm[k]
                md.append(f"| {k} | {t['train_s_per_step']} | {t['train_s_est']} | {t['infer_s_median']} | "
                          f"{'' if t['ref_encode_s'] is None else t['ref_encode_s']} |")
        md.append("")
    big = out.get("big_image")
    if big:
        md += [f"Tiled prediction of a {big['size']}×{big['size']} image (`--big {big['size']}`, tiles of "
               f"{big['tile']} px): {big['seconds']:.0f} s, peak memory +{big['peak_rss_increase_mb']:.0f} MB "
               f"(the float32 probability alone is {big['output_mb']:.0f} MB).", ""]
    if note:
        md += [note, ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(md))
    print(f"\nwrote {args.out} and {args.md}")


def assemble(args):
    rows = []
    for log in args.assemble:
        for line in Path(log).read_text().splitlines():
            if line.startswith("{") and '"setting"' in line:
                rows.append(json.loads(line))
    seen = {}
    for r in rows:  # the last row of each (setting, method, seed) wins
        seen[(r["setting"], r["method"], r.get("seed", 0))] = r
    rows = list(seen.values())
    print(table(summarize(rows)))
    note = ""
    if args.note and Path(args.note).exists():
        note = Path(args.note).read_text().strip()
    if not args.no_write:
        write_outputs(rows, args, note)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-refs", type=int, default=4)
    ap.add_argument("--min-size", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="seed of --timing / --big")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the main run (networks; the random forest uses the first)")
    ap.add_argument("--few-ids", default="0,10")
    ap.add_argument("--settings", default="full,few")
    ap.add_argument("--no-feedback", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "membrane.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks" / "membrane.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--methods", default="baseline,ours,fb,bfb,rf", help="subset of baseline,ours,fb,bfb,rf")
    ap.add_argument("--note", help="markdown file appended to the fragment (analysis)")
    ap.add_argument("--assemble", nargs="+", metavar="LOG",
                    help="write the json/markdown from result rows printed by earlier (partial) runs")
    ap.add_argument("--timing", action="store_true",
                    help="only time training steps and 512x512 prediction per network (adds 'timing' to the json)")
    ap.add_argument("--big", type=int, default=0,
                    help="only measure tiled prediction of a BIG x BIG image (time, peak memory) and add it to the json")
    args = ap.parse_args(argv)
    d = data_dir()
    if not (d / "image" / "0.png").exists():
        print(f"ISBI 2012 data not found at {d}; set LEAKSEG_DATA", file=sys.stderr)
        return 1
    if args.big:
        return big_image(d, args)
    if args.timing:
        return timing(d, args)
    if args.assemble:
        return assemble(args)

    test_ims, test_lbs = load(d, range(20, 30))
    settings = {"full": list(range(20)), "few": [int(v) for v in args.few_ids.split(",")]}
    rows, allpreds = [], {}
    seeds = [int(v) for v in args.seeds.split(",")]
    for i, seed in enumerate(seeds):
        args.seed = seed
        for name in args.settings.split(","):
            r, p = run_setting(name, settings[name], test_ims, test_lbs, d, args,
                               lambda row: print(json.dumps(row), flush=True), with_rf=i == 0)
            rows += r
            if i == 0:
                allpreds[name] = p
    print()
    print(table(summarize(rows)))
    print()
    print(paired_table(rows))
    if args.no_write:
        return 0
    write_outputs(rows, args)
    img_dir = ROOT / "docs" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, p in allpreds.items():
        picture(test_ims[0], test_lbs[0], {k: v[0] for k, v in p.items()}, img_dir / f"membrane_bench_{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
