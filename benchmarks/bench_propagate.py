"""Benchmark: label propagation on PhC-C2DH-U373 (Cell Tracking Challenge), frame 0 annotated.

Methods
  copy        frame 0's labels copied to every frame
  train-only  the U-Net trained on frame 0 only predicts every frame (same model
              as "ours" before it starts walking: same seed, same steps)
  ours        pseudo-label propagation (tau, fine-tune steps, sliding window)
  ours+k      ours, then the k worst frames (vs silver) are "corrected" with
              silver and confirmed one after the other, resuming each time (k = 1, 3)

Scores: per-frame foreground IoU vs silver (frames 1..99, frame 0 is the
annotation), vs gold on the 17 gold frames, and in instance mode (connected
components + overlap linking) the CTC SEG measure. Run it under the shared lock:

    flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_propagate.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_leakseg.core.jobs import run_job
from napari_leakseg.propagate import Propagator, clean_labels, ctc_seg, foreground_iou, link_instances

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAKSEG_DATA", REPO / ".." / "shared" / "data")) / "timelapse" / "PhC-C2DH-U373"
GOLD_FRAMES = [10, 17, 19, 20, 22, 26, 35, 36, 41, 49, 51, 52, 59, 74, 77, 85, 92]


def load(n_frames: int):
    stack = np.stack([tifffile.imread(DATA / "02" / f"t{t:03d}.tif") for t in range(n_frames)])
    silver = np.stack([tifffile.imread(DATA / "02_ST" / "SEG" / f"man_seg{t:03d}.tif") for t in range(n_frames)])
    gold = {t: tifffile.imread(DATA / "02_GT" / "SEG" / f"man_seg{t:03d}.tif") for t in GOLD_FRAMES
            if t < n_frames}
    return stack, silver, gold


def scores(labels, silver, gold, instances=True):
    T = len(silver)
    ious = [foreground_iou(labels[t], silver[t]) for t in range(T)]
    g_ious = {t: foreground_iou(labels[t], g) for t, g in gold.items()}
    out = {
        "iou_per_frame": [round(v, 4) for v in ious],
        "mean_iou_silver": float(np.mean(ious[1:])),
        "worst_iou_silver": float(np.min(ious[1:])),
        "worst_frame": int(1 + np.argmin(ious[1:])),
        "mean_iou_gold": float(np.mean(list(g_ious.values()))) if g_ious else None,
        "worst_iou_gold": float(np.min(list(g_ious.values()))) if g_ious else None,
    }
    if instances:
        inst = link_instances(np.asarray(labels), min_size=100)
        s = n = 0.0
        for t in range(1, T):
            a, b = ctc_seg(silver[t], inst[t])
            s, n = s + a, n + b
        gs = gn = 0.0
        for t, g in gold.items():
            a, b = ctc_seg(g, inst[t])
            gs, gn = gs + a, gn + b
        out["seg_silver"] = s / max(n, 1)
        out["seg_gold"] = gs / max(gn, 1) if gold else None
        out["n_tracks"] = int(len(np.unique(inst)) - 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--init-steps", type=int, default=None)
    ap.add_argument("--params", default="", help="extra PropagateParams as JSON")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--ks", default="1,3")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"data not found: {DATA}")
    stack, silver, gold = load(args.frames)
    T = len(stack)
    ann = np.zeros(stack.shape, np.uint8)
    ann[0] = silver[0] > 0
    # e.g. --params '{"min_size": 300}' drops debris and fills holes below 300 px (every method)
    params = json.loads(args.params) if args.params else {}
    for k, v in (("tau", args.tau), ("steps", args.steps), ("init_steps", args.init_steps)):
        if v is not None:
            params[k] = v
    results: dict = {}
    times: dict = {}

    # (1) copy
    copy = np.repeat(ann[:1], T, 0)
    results["copy"] = scores(copy, silver, gold)

    # (3) ours, keeping the frame-0-only model for (2)
    sess = Propagator(stack, ann, device="cpu", **params)
    t0 = time.perf_counter()
    base_done = []

    def cb(ev):
        if ev.preview is not None and not base_done:
            base_done.append(time.perf_counter() - t0)

    run_job(sess.iter_run("forward"), cb)
    t_ours = time.perf_counter() - t0
    times["ours_total_s"] = t_ours
    times["ours_train_s"] = base_done[0] if base_done else None
    times["ours_per_frame_s"] = t_ours / (T - 1)
    ours_labels = np.array(sess.labels, copy=True)
    results["ours"] = scores(ours_labels, silver, gold)
    print(f"ours: mean IoU {results['ours']['mean_iou_silver']:.3f} in {t_ours:.0f}s", flush=True)

    # (2) train-only: the same model before propagation, predicting every frame
    live = {k: v.clone() for k, v in sess.model.state_dict().items()}
    sess.model.load_state_dict(sess._base_state)
    t1 = time.perf_counter()
    train_only = np.zeros_like(ours_labels)
    train_only[0] = ann[0]
    for t in range(1, T):
        pred = sess.predict_frame(t)[0]
        train_only[t] = clean_labels(pred, sess.params.min_size) if sess.params.min_size else pred
    times["train_only_predict_per_frame_s"] = (time.perf_counter() - t1) / (T - 1)
    sess.model.load_state_dict(live)
    results["train-only"] = scores(train_only, silver, gold)

    # (4) simulated corrections: fix the worst frame, confirm, resume; repeat
    ks = [int(k) for k in args.ks.split(",") if k]
    resume_times = []
    resumed_frames = []
    cur_ious = results["ours"]["iou_per_frame"]
    for k in range(1, max(ks, default=0) + 1):
        cand = [t for t in range(T) if sess.status[t] == "pseudo"]
        worst = min(cand, key=lambda t: cur_ious[t])
        n_before = len(sess.resume_frames(worst)) - 1
        t2 = time.perf_counter()
        sess.resume(worst, labels_t=(silver[worst] > 0).astype(np.uint8))
        resume_times.append(time.perf_counter() - t2)
        resumed_frames.append({"corrected": worst, "recomputed": n_before, "seconds": resume_times[-1]})
        sc = scores(np.asarray(sess.labels), silver, gold, instances=k in ks)
        cur_ious = sc["iou_per_frame"]
        if k in ks:
            results[f"ours+{k}"] = sc
            print(f"ours+{k}: mean IoU {sc['mean_iou_silver']:.3f} (corrected {worst})", flush=True)
    times["resumes"] = resumed_frames

    # ------------------------------------------------------------------ report
    order = ["copy", "train-only", "ours"] + [f"ours+{k}" for k in ks if f"ours+{k}" in results]
    head = f"{'method':<12} {'mean IoU':>9} {'worst':>6} {'gold mean':>9} {'gold worst':>10} {'SEG silver':>10} {'SEG gold':>8}"
    print(head)
    for m in order:
        r = results[m]
        f = lambda v, w: f"{v:{w}.3f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
        print(f"{m:<12} {f(r['mean_iou_silver'], 9)} {f(r['worst_iou_silver'], 6)} {f(r['mean_iou_gold'], 9)} "
              f"{f(r['worst_iou_gold'], 10)} {f(r['seg_silver'], 10)} {f(r['seg_gold'], 8)}")
    print(f"time: {times['ours_per_frame_s']:.2f} s/frame for ours (incl. {times['ours_train_s'] or 0:.0f}s "
          f"initial training), torch threads {torch.get_num_threads()}")
    r3, r2, r1 = results["ours"], results["train-only"], results["copy"]
    targets = {
        "ours_beats_train_only_by_0.05": r3["mean_iou_silver"] >= r2["mean_iou_silver"] + 0.05,
        "train_only_beats_copy": r2["mean_iou_silver"] > r1["mean_iou_silver"],
        "ours_mean_iou_ge_0.85": r3["mean_iou_silver"] >= 0.85,
        "k3_mean_iou_ge_0.90": results.get("ours+3", {}).get("mean_iou_silver", 0) >= 0.90,
        "le_3s_per_frame": times["ours_per_frame_s"] <= 3.0,
    }
    print("targets:", json.dumps(targets))
    payload = {
        "dataset": "PhC-C2DH-U373/02 (CTC), frames 0..%d, frame 0 annotated (silver, binarised)" % (T - 1),
        "params": sess.metadata()["train"],
        "results": results,
        "times": times,
        "targets": targets,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_at_end": os.getloadavg()},
    }
    if args.no_write:
        return payload
    (REPO / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "results" / "propagate.json").write_text(json.dumps(payload, indent=1))
    plot(results, order, REPO / "docs" / "images" / "propagate_iou.png")
    write_md(payload, order, REPO / "docs" / "benchmarks" / "propagate.md")
    return payload


def plot(results, order, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    for m in order:
        ax.plot(results[m]["iou_per_frame"], label=f"{m} ({results[m]['mean_iou_silver']:.3f})", lw=1.3)
    ax.set_xlabel("frame")
    ax.set_ylabel("foreground IoU vs silver")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    ax.set_title("PhC-C2DH-U373/02: frame 0 annotated")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def write_md(p, order, path):
    r = p["results"]
    t = p["times"]
    lines = [
        "## Time-series label propagation (PhC-C2DH-U373)",
        "",
        f"{p['dataset']}. Foreground IoU per frame over frames 1–{len(r['copy']['iou_per_frame']) - 1}; "
        "gold = the 17 human-annotated frames; SEG = Cell Tracking Challenge SEG after instance "
        "splitting (connected components) and overlap linking. `ours+k`: the k worst frames were "
        "replaced by silver and confirmed one at a time, resuming after each (a simulated user); "
        "the corrected frames count with IoU 1 vs silver.",
        "",
        "| method | mean IoU (silver) | worst IoU | mean IoU (gold) | worst (gold) | SEG (silver) | SEG (gold) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in order:
        x = r[m]
        lines.append(f"| {m} | {x['mean_iou_silver']:.3f} | {x['worst_iou_silver']:.3f} (frame {x['worst_frame']}) | "
                     f"{x['mean_iou_gold']:.3f} | {x['worst_iou_gold']:.3f} | {x['seg_silver']:.3f} | {x['seg_gold']:.3f} |")
    lines += [
        "",
        f"Time: {t['ours_per_frame_s']:.2f} s per frame for `ours` over the whole run "
        f"({t['ours_total_s']:.0f} s for {len(r['copy']['iou_per_frame']) - 1} frames, including "
        f"{t['ours_train_s'] or 0:.0f} s of initial training on frame 0), CPU, torch threads "
        f"{p['machine']['torch_threads']}, load average at the end {p['machine']['loadavg_at_end'][0]:.1f} "
        "(the machine is shared). Resumes: "
        + "; ".join(f"frame {x['corrected']}: {x['recomputed']} frames in {x['seconds']:.0f} s" for x in t["resumes"])
        + ".",
        "",
        "Targets: " + ", ".join(f"{k}: {'met' if v else '**missed**'}" for k, v in p["targets"].items()) + ".",
        "",
        "![IoU per frame](images/propagate_iou.png)",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
