"""Benchmark of scribble / unsupervised segmentation (issue 3).

Run under the shared lock so timings are not polluted by other benchmarks::

    flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_scribble.py

Parts (``--parts``, default all):

* ``unsup``   fast default, unsupervised, on the 25 BSDS500 images: time, first
              preview, iterations, Hungarian and best-overlap mIoU.
* ``nomerge`` the fast default without its colour merge (``merge=0``): "without the new idea".
* ``kmeans``  k-means on colour (CIELAB) + position, same scoring; k = 8 also with the
              fast default's colour merge applied to its result.
* ``paper``   our implementation of the paper-default configuration (q=100,
              nConv=2, zero padding, SGD lr 0.1 momentum 0.9, full resolution)
              for 100 iterations on 5 images, with the fast default on the same
              5 images side by side.
* ``scribble`` simulated scribbles (skeleton strokes in the 4 largest regions of
              annotator 1) versus unsupervised, on the 25 images.
* ``refine``  add strokes, then continue from the previous weights (warm start)
              versus training from scratch.
* ``memory``  peak RSS of a fresh process segmenting a 1024×1024 RGB image.
* ``voc``     the six human-scribbled PASCAL VOC images (255 = unlabeled):
              pictures in ``docs/images/scribble_voc_*.png``.

Writes ``benchmarks/results/scribble.json`` and ``docs/benchmarks/scribble.md``.
Results of parts that are not run are kept from the previous JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from scribble_scoring import DATA, load_bsds, score, simulate_scribbles  # noqa: E402

RESULTS = HERE / "results" / "scribble.json"
DOC = REPO / "docs" / "benchmarks" / "scribble.md"
IMAGES = REPO / "docs" / "images"
PARTS = ("unsup", "nomerge", "kmeans", "paper", "scribble", "refine", "memory", "voc", "figure")


def _seg(img, scr=None, **kw):
    from napari_leakseg.scribble import segment

    t0 = time.perf_counter()
    r = segment(img, scr, device="cpu", seed=0, **kw)
    return r, time.perf_counter() - t0


def _summary(rows, keys=("hung", "best", "seconds", "first_preview_s", "n_iter", "n_labels", "n_components")):
    out = {"n_images": len(rows)}
    for k in keys:
        v = [r[k] for r in rows if r.get(k) is not None]
        if v:
            out[f"{k}_mean"] = float(np.mean(v))
            out[f"{k}_median"] = float(np.median(v))
    return out


def _n_components(lab):
    from scribble_scoring import relabel_components

    return int(relabel_components(lab).max())


def run_unsup(data, **kw):
    rows = []
    for stem, img, gts in data:
        r, t = _seg(img, **kw)
        h, b = score(r.labels, gts)
        rows.append({"image": stem, "hung": h, "best": b, "seconds": t, "first_preview_s": r.first_preview_s,
                     "n_iter": r.n_iter, "stopped": r.stopped, "n_labels": r.n_labels,
                     "n_components": _n_components(r.labels)})
        print(f"  {stem}: hung {h:.3f} best {b:.3f} {t:5.1f} s it {r.n_iter} ({r.stopped}) "
              f"labels {r.n_labels} comps {rows[-1]['n_components']}", flush=True)
    return rows


def kmeans_labels(img, k=8, pos_weight=1.0, seed=0):
    """k-means on CIELAB colour + (y, x) position (both scaled to comparable ranges)."""
    from skimage.color import rgb2lab
    from sklearn.cluster import KMeans

    H, W = img.shape[:2]
    lab = rgb2lab(img).reshape(-1, 3) / np.array([100.0, 128.0, 128.0]) * 3
    yy, xx = np.mgrid[:H, :W]
    pos = np.stack([yy.ravel(), xx.ravel()], 1) / max(H, W) * pos_weight
    f = np.concatenate([lab, pos], 1).astype(np.float32)
    km = KMeans(k, n_init=3, random_state=seed).fit(f[::5])
    return km.predict(f).reshape(H, W)


def _colour_merged(img, lab):
    """``lab`` after the fast default's post-processing colour merge (same colour space and threshold)."""
    from napari_leakseg.core.regions import merge_similar_regions, region_colour
    from napari_leakseg.scribble import CONFIGS, prepare_image

    x, _ = prepare_image(img)
    return merge_similar_regions(lab, region_colour(x[0]), CONFIGS["fast"].merge)


def run_kmeans(data, ks=(4, 8, 16), merged=(8,)):
    out = {}
    for k, merge in [(k, False) for k in ks] + [(k, True) for k in merged]:
        rows = []
        for stem, img, gts in data:
            t0 = time.perf_counter()
            lab = kmeans_labels(img, k)
            if merge:
                lab = _colour_merged(img, lab)
            t = time.perf_counter() - t0
            h, b = score(lab, gts)
            rows.append({"image": stem, "hung": h, "best": b, "seconds": t, "n_components": _n_components(lab)})
        key = f"k={k}" + (" + colour merge" if merge else "")
        out[key] = {"summary": _summary(rows), "rows": rows}
        s = out[key]["summary"]
        print(f"  k-means {key}: hung {s['hung_mean']:.4f} best {s['best_mean']:.4f} "
              f"{s['seconds_median']:.2f} s", flush=True)
    return out


def run_scribble(data):
    rows = []
    for stem, img, gts in data:
        scr = simulate_scribbles(gts[0])
        r, t = _seg(img, scr)
        h, b = score(r.labels, gts)
        acc = float((r.labels[scr > 0] == scr[scr > 0]).mean())
        rows.append({"image": stem, "hung": h, "best": b, "seconds": t, "first_preview_s": r.first_preview_s,
                     "n_iter": r.n_iter, "n_labels": r.n_labels, "n_components": _n_components(r.labels),
                     "scribble_pixel_acc": acc, "n_classes": int(scr.max())})
        print(f"  {stem}: hung {h:.3f} best {b:.3f} {t:5.1f} s it {r.n_iter} stroke acc {acc:.3f}", flush=True)
    return rows


def run_refine(data):
    """Strokes for the 2 largest regions → run; add strokes for regions 3-4 → warm vs cold."""
    rows = []
    for stem, img, gts in data:
        full = simulate_scribbles(gts[0], n_regions=4)
        first = np.where(full <= 2, full, 0).astype(np.uint8)
        r0, t0 = _seg(img, first)
        cold, tc = _seg(img, full)
        warm, tw = _seg(img, full, warm_start=r0.state)
        hc, bc = score(cold.labels, gts)
        hw, bw = score(warm.labels, gts)
        acc = lambda r: float((r.labels[full > 0] == full[full > 0]).mean())  # noqa: E731
        rows.append({"image": stem, "cold_iter": cold.n_iter, "warm_iter": warm.n_iter, "cold_s": tc, "warm_s": tw,
                     "cold_hung": hc, "warm_hung": hw, "cold_acc": acc(cold), "warm_acc": acc(warm),
                     "first_s": t0})
        print(f"  {stem}: cold {cold.n_iter} it {tc:.1f} s hung {hc:.3f} acc {acc(cold):.3f} | "
              f"warm {warm.n_iter} it {tw:.1f} s hung {hw:.3f} acc {acc(warm):.3f}", flush=True)
    keys = ("cold_iter", "warm_iter", "cold_s", "warm_s", "cold_hung", "warm_hung", "cold_acc", "warm_acc")
    return {"summary": _summary(rows, keys), "rows": rows}


MEM_CODE = r"""
import resource, sys, time, numpy as np, imageio.v3 as iio
from skimage.transform import resize
img = iio.imread(sys.argv[1])
img = (resize(img, (1024, 1024), order=1) * 255).astype(np.uint8)
def hwm():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from napari_leakseg.scribble import segment
import torch
base = hwm()
t = time.perf_counter()
r = segment(img, device="cpu", max_iter=int(sys.argv[2]))
dt = time.perf_counter() - t
peak = hwm()
print(f"{base:.1f} {peak:.1f} {dt:.2f} {r.n_iter} {r.first_preview_s:.2f}")
"""


def run_memory(max_iter=200):
    img = sorted((DATA / "bsds500" / "images").glob("*.jpg"))[0]
    out = subprocess.run([sys.executable, "-c", MEM_CODE, str(img), str(max_iter)], capture_output=True,
                         text=True, check=True).stdout.split()
    base, peak, dt, it, fp = map(float, out)
    print(f"  1024x1024: peak RSS {peak:.0f} MB (after imports {base:.0f} MB), {dt:.1f} s, {int(it)} it, "
          f"first preview {fp:.2f} s", flush=True)
    return {"peak_rss_mb": peak, "rss_after_imports_mb": base, "seconds": dt, "n_iter": int(it),
            "first_preview_s": fp, "shape": [1024, 1024, 3]}


def run_voc(only=None, cache=None):
    import imageio.v3 as iio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    root = DATA / "scribbles_voc"
    rows = []
    pics = []
    for p in sorted(root.glob("*_scribble.png")):
        stem = p.name.replace("_scribble.png", "")
        if only and stem not in only:
            continue
        img = np.asarray(iio.imread(root / f"{stem}.jpg"))
        raw = np.asarray(iio.imread(p))
        scr = np.where(raw == 255, 0, raw.astype(np.int64) + 1)  # 255 = unlabeled; class v -> v+1
        cf = Path(cache) / f"{stem}.npz" if cache else None
        if cf is not None and cf.exists():
            z = np.load(cf, allow_pickle=False)
            row = json.loads(str(z["row"]))
            lab, labc = z["lab"], z["labc"]
        else:
            res = {}
            for mode, kw in (("scribble", {}), ("classes_only", {"classes_only": True})):
                r, t = _seg(img, scr, **kw)
                lab = r.labels.astype(np.int64)
                acc = float((lab[scr > 0] == scr[scr > 0]).mean())
                res[mode] = (r, t, acc)
            r, t, acc = res["scribble"]
            rc, tc, accc = res["classes_only"]
            row = {"image": stem, "classes": [int(v) for v in np.unique(raw) if v != 255],
                   "seconds": t, "n_iter": r.n_iter, "n_labels": r.n_labels, "stroke_acc": acc,
                   "classes_only_seconds": tc, "classes_only_stroke_acc": accc}
            lab, labc = r.labels, rc.labels
            if cf is not None:
                Path(cache).mkdir(parents=True, exist_ok=True)
                np.savez(cf, row=json.dumps(row), lab=lab, labc=labc)
        rows.append(row)
        print(f"  {stem}: {row['seconds']:.1f} s it {row['n_iter']} labels {row['n_labels']} stroke acc "
              f"{row['stroke_acc']:.3f} | classes-only {row['classes_only_seconds']:.1f} s acc "
              f"{row['classes_only_stroke_acc']:.3f}", flush=True)
        pics.append((stem, img, scr, lab, labc))
    fig, axes = plt.subplots(len(pics), 3, figsize=(10.5, 2.6 * len(pics)), squeeze=False)
    for row, (stem, img, scr, lab, labc) in zip(axes, pics):
        over = img.copy()
        m = scr > 0
        colors = (label2rgb(scr, bg_label=0) * 255).astype(np.uint8)
        over[m] = colors[m]
        row[0].imshow(over)
        row[0].set_title(f"{stem} + scribbles", fontsize=8)
        for ax, l, title in ((row[1], lab, "scribble mode"), (row[2], labc, "classes only")):
            vis = label2rgb(np.asarray(l, np.int64), img, alpha=0.45, bg_label=-1)
            vis[find_boundaries(l)] = (1, 1, 0)
            ax.imshow(vis)
            ax.set_title(f"{title} ({len(np.unique(l))} labels)", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "scribble_voc.png", dpi=80)
    plt.close(fig)
    return {"rows": rows, "picture": "docs/images/scribble_voc.png"}


def bsds_figure(data, n=2):
    """Side-by-side pictures: image, fast unsupervised, fast + scribbles, k-means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(n, 4, figsize=(13, 2.4 * n))
    for row, (stem, img, gts) in zip(axes, data[:n]):
        scr = simulate_scribbles(gts[0])
        un, _ = _seg(img)
        sc, _ = _seg(img, scr)
        km = kmeans_labels(img, 8)
        over = img.copy()
        over[scr > 0] = (label2rgb(scr, bg_label=0)[scr > 0] * 255).astype(np.uint8)
        row[0].imshow(over)
        row[0].set_title(f"{stem} + simulated scribbles", fontsize=8)
        for ax, l, t in ((row[1], un.labels, "fast, unsupervised"), (row[2], sc.labels, "fast, scribbles"),
                         (row[3], km, "k-means k=8")):
            vis = label2rgb(np.asarray(l, np.int64), img, alpha=0.4, bg_label=-1)
            vis[find_boundaries(l)] = (1, 1, 0)
            ax.imshow(vis)
            ax.set_title(t, fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(IMAGES / "scribble_bsds.png", dpi=70)
    plt.close(fig)


def write_markdown(res):
    L = []
    env = res.get("env", {})
    L.append("## Scribble / unsupervised segmentation (issue 3)\n")
    L.append(f"Machine: {env.get('cpu_count')} CPU cores, torch {env.get('torch')} with "
             f"{env.get('torch_threads')} threads, CPU only (load average when started: "
             f"{', '.join(f'{v:.1f}' for v in env.get('load_average_at_start') or [])}). Data: `bsds500` (25 images, 481×321, 4–9 "
             "annotators each; see the tables for how many were run) and `scribbles_voc` (6 images). Score: prediction relabelled into "
             "4-connected components; **Hungarian** = one-to-one matching maximising IoU, sum of matched IoU "
             "/ #GT regions; **best** = each GT region's best IoU with any component; averaged over "
             "annotators, then images. Reproduce with "
             "`flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_scribble.py` "
             f"(took {res.get('total_seconds', 0) / 60:.1f} min).\n")
    u = res.get("unsup", {}).get("summary")
    km = res.get("kmeans", {})
    p = res.get("paper", {})
    if u:
        L.append(f"### Unsupervised, {u['n_images']} BSDS500 images\n")
        L.append("| method | Hungarian mIoU | best-overlap mIoU | time / image (median) | first preview (median) "
                 "| iterations (median) | components (median) |")
        L.append("|---|---|---|---|---|---|---|")
        L.append(f"| **fast default** (q=32, Adam, ~40k-px training copy, full-res prediction, early stop, "
                 f"colour merge ΔE 12) | "
                 f"**{u['hung_mean']:.3f}** | **{u['best_mean']:.3f}** | {u['seconds_median']:.1f} s | "
                 f"{u['first_preview_s_median']:.2f} s | {u['n_iter_median']:.0f} | "
                 f"{u['n_components_median']:.0f} |")
        nm = res.get("nomerge", {}).get("summary")
        if nm:
            L.append(f"| fast default without the colour merge | {nm['hung_mean']:.3f} | {nm['best_mean']:.3f} | "
                     f"{nm['seconds_median']:.1f} s | {nm['first_preview_s_median']:.2f} s | "
                     f"{nm['n_iter_median']:.0f} | {nm['n_components_median']:.0f} |")
        for k, v in km.items():
            s = v["summary"]
            L.append(f"| k-means colour+position, {k} | {s['hung_mean']:.3f} | {s['best_mean']:.3f} | "
                     f"{s['seconds_median']:.2f} s | – | – | {s['n_components_median']:.0f} |")
        L.append("")
    if p and "fast" in p:
        ps, fs = p["paper"]["summary"], p["fast"]["summary"]
        L.append(f"### Paper-default configuration vs fast default ({p['n_images']} images: "
                 f"{', '.join(p['images'])}; paper config capped at {p['max_iter']} iterations)\n")
        L.append("| configuration | Hungarian mIoU | best-overlap mIoU | time / image (median) | s / iteration | "
                 "labels (median) | components (median) |")
        L.append("|---|---|---|---|---|---|---|")
        for name, s in (("paper default (q=100, nConv=2, SGD 0.1/0.9, zero padding, full res)", ps),
                        ("fast default", fs)):
            L.append(f"| {name} | {s['hung_mean']:.3f} | {s['best_mean']:.3f} | {s['seconds_median']:.1f} s | "
                     f"{s['seconds_median'] / max(s['n_iter_median'], 1):.3f} | {s['n_labels_median']:.0f} | "
                     f"{s['n_components_median']:.0f} |")
        L.append("")
    s = res.get("scribble", {}).get("summary")
    if s and u:
        L.append(f"### Scribbles versus unsupervised ({s['n_images']} images, simulated scribbles)\n")
        L.append("Scribbles: one skeleton stroke (≤60 px long, 3 px wide) in each of the 4 largest regions of "
                 "annotator 1, class k = k-th largest region.\n")
        L.append("| mode | Hungarian mIoU | best-overlap mIoU | time (median) | first preview | stroke pixels "
                 "correct |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| unsupervised | {u['hung_mean']:.3f} | {u['best_mean']:.3f} | {u['seconds_median']:.1f} s | "
                 f"{u['first_preview_s_median']:.2f} s | – |")
        L.append(f"| with scribbles | {s['hung_mean']:.3f} | {s['best_mean']:.3f} | {s['seconds_median']:.1f} s | "
                 f"{s['first_preview_s_median']:.2f} s | {s['scribble_pixel_acc_mean']:.3f} |")
        L.append("")
    r = res.get("refine", {}).get("summary")
    if r:
        L.append(f"### Refine: warm start versus from scratch ({r['n_images']} images)\n")
        L.append("First run with strokes in the 2 largest regions; then strokes in regions 3–4 are added and the "
                 "model is trained again, either from the first run's weights (warm) or from scratch (cold), "
                 "both until the early-stop rule fires.\n")
        L.append("| start | iterations (median) | time (median) | Hungarian mIoU | stroke pixels correct |")
        L.append("|---|---|---|---|---|")
        L.append(f"| from scratch | {r['cold_iter_median']:.0f} | {r['cold_s_median']:.1f} s | "
                 f"{r['cold_hung_mean']:.3f} | {r['cold_acc_mean']:.3f} |")
        L.append(f"| warm start (Refine) | {r['warm_iter_median']:.0f} | {r['warm_s_median']:.1f} s | "
                 f"{r['warm_hung_mean']:.3f} | {r['warm_acc_mean']:.3f} |")
        L.append("")
    m = res.get("memory")
    if m:
        L.append(f"### Memory at 1024×1024\n\nPeak RSS of a fresh process (torch included) segmenting a "
                 f"1024×1024 RGB image: **{m['peak_rss_mb']:.0f} MB** ({m['rss_after_imports_mb']:.0f} MB "
                 f"after imports); {m['seconds']:.1f} s, {m['n_iter']} iterations, first preview "
                 f"{m['first_preview_s']:.2f} s.\n")
    v = res.get("voc")
    if v:
        L.append("### Human scribbles (`scribbles_voc`, 255 = unlabeled)\n")
        L.append("| image | classes | time | iterations | labels | stroke pixels correct | classes-only: "
                 "stroke pixels correct |")
        L.append("|---|---|---|---|---|---|---|")
        for row in v["rows"]:
            L.append(f"| {row['image']} | {row['classes']} | {row['seconds']:.1f} s | {row['n_iter']} | "
                     f"{row['n_labels']} | {row['stroke_acc']:.3f} | {row['classes_only_stroke_acc']:.3f} |")
        L.append("\n![VOC scribbles](../images/scribble_voc.png)\n")
    if (IMAGES / "scribble_bsds.png").exists():
        L.append("![BSDS examples](../images/scribble_bsds.png)\n")
    tg = res.get("targets")
    if tg:
        L.append("### Targets\n")
        L.append("| target | value | met |")
        L.append("|---|---|---|")
        for t in tg:
            L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
        L.append("")
    if res.get("notes"):
        L.append("### Where we lose\n")
        for n in res["notes"]:
            L.append(f"- {n}")
        L.append("")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L))


def targets(res):
    out = []
    u = res.get("unsup", {}).get("summary")
    if u:
        out.append({"target": "first preview ≤ 1 s (median, 481×321)", "value": f"{u['first_preview_s_median']:.2f} s",
                    "met": u["first_preview_s_median"] <= 1.0})
        out.append({"target": "final result ≤ 10 s (median, 481×321)",
                    "value": f"{u['seconds_median']:.1f} s over {u['n_images']} images",
                    "met": u["seconds_median"] <= 10.0})
    m = res.get("memory")
    if m:
        out.append({"target": "peak memory ≤ 1.5 GB at 1024×1024", "value": f"{m['peak_rss_mb']:.0f} MB",
                    "met": m["peak_rss_mb"] <= 1536})
    p = res.get("paper")
    if p and "fast" in p:
        out.append({"target": "fast ≥ paper default (Hungarian mIoU, same images)",
                    "value": f"{p['fast']['summary']['hung_mean']:.3f} vs {p['paper']['summary']['hung_mean']:.3f}",
                    "met": p["fast"]["summary"]["hung_mean"] >= p["paper"]["summary"]["hung_mean"]})
    if u and res.get("kmeans"):
        plain = {k: v for k, v in res["kmeans"].items() if "merge" not in k}
        best_k = max(plain.items(), key=lambda kv: kv[1]["summary"]["hung_mean"])
        out.append({"target": "fast clearly above k-means (best k)",
                    "value": f"{u['hung_mean']:.3f} vs {best_k[1]['summary']['hung_mean']:.3f} ({best_k[0]})",
                    "met": u["hung_mean"] > best_k[1]["summary"]["hung_mean"] + 0.01})
        if "k=8" in plain:
            k8 = plain["k=8"]["summary"]["hung_mean"]
            out.append({"target": "unsupervised ≥ k-means (k = 8) + 0.02 (issue 14)",
                        "value": f"{u['hung_mean']:.3f} vs {k8:.3f} ({u['hung_mean'] - k8:+.3f})",
                        "met": u["hung_mean"] >= k8 + 0.02})
    s = res.get("scribble", {}).get("summary")
    if s and u:
        out.append({"target": "scribbles raise the score over unsupervised",
                    "value": f"{s['hung_mean']:.3f} vs {u['hung_mean']:.3f}", "met": s["hung_mean"] > u["hung_mean"]})
    r = res.get("refine", {}).get("summary")
    if r:
        out.append({"target": "Refine (warm start) converges faster than from scratch",
                    "value": f"{r['warm_iter_median']:.0f} vs {r['cold_iter_median']:.0f} iterations",
                    "met": r["warm_iter_median"] < r["cold_iter_median"]})
    return out


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N BSDS images (quick check)")
    ap.add_argument("--paper-images", type=int, default=5)
    ap.add_argument("--paper-iters", type=int, default=100)
    ap.add_argument("--refine-images", type=int, default=4)
    ap.add_argument("--results", default=str(RESULTS), help="JSON to read/update (default: %(default)s)")
    ap.add_argument("--merge", default=None, help="copy the parts present in this JSON into the results")
    ap.add_argument("--no-doc", action="store_true", help="do not write the markdown fragment")
    ap.add_argument("--voc-only", default=None, help="comma-separated VOC image names (partial run)")
    ap.add_argument("--voc-cache", default=None, help="folder caching per-image VOC results")
    ap.add_argument("--note", action="append", default=[], help="add a line to 'Where we lose / notes'")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not (DATA / "bsds500").exists():
        print(f"data not found at {DATA}; set LEAKSEG_DATA", file=sys.stderr)
        return 1
    parts = [p for p in args.parts.split(",") if p]
    res = json.loads(results.read_text()) if results.exists() else {}
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        for k in PARTS:
            if k in other:
                res[k] = other[k]
        if "total_seconds" in other:
            res["paper_process_seconds"] = other["total_seconds"]
    env_before = res.get("env", {})
    res["env"] = {"load_average_at_start": env_before.get("load_average_at_start") if not parts else os.getloadavg(),
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "python": platform.python_version(), "platform": platform.platform()}
    t_all = time.perf_counter()
    data = load_bsds(limit=args.limit)
    print(f"{len(data)} BSDS images", flush=True)
    if "unsup" in parts:
        print("fast default, unsupervised:", flush=True)
        rows = run_unsup(data)
        res["unsup"] = {"summary": _summary(rows), "rows": rows}
    if "nomerge" in parts:
        print("fast default without the colour merge, unsupervised:", flush=True)
        rows = run_unsup(data, merge=0.0)
        res["nomerge"] = {"summary": _summary(rows), "rows": rows}
    if "kmeans" in parts:
        print("k-means baseline:", flush=True)
        res["kmeans"] = run_kmeans(data)
    if "paper" in parts:
        sub = data[:: max(1, len(data) // args.paper_images)][: args.paper_images]
        print(f"paper default ({args.paper_iters} iterations) on {len(sub)} images:", flush=True)
        prow = run_unsup(sub, config="paper", max_iter=args.paper_iters)
        res["paper"] = {"n_images": len(sub), "images": [s[0] for s in sub], "max_iter": args.paper_iters,
                        "paper": {"summary": _summary(prow), "rows": prow}}
    if "paper" in res:  # the fast default on the same images, side by side
        names = set(res["paper"]["images"])
        frow = [r for r in res.get("unsup", {}).get("rows", []) if r["image"] in names]
        if len(frow) == len(names):
            res["paper"]["fast"] = {"summary": _summary(frow), "rows": frow}
    if "scribble" in parts:
        print("simulated scribbles:", flush=True)
        rows = run_scribble(data)
        res["scribble"] = {"summary": _summary(rows, ("hung", "best", "seconds", "first_preview_s", "n_iter",
                                                      "n_labels", "n_components", "scribble_pixel_acc")),
                           "rows": rows}
    if "refine" in parts:
        print("refine (warm start) vs from scratch:", flush=True)
        res["refine"] = run_refine(data[:: max(1, len(data) // args.refine_images)][: args.refine_images])
    if "memory" in parts:
        print("memory at 1024x1024:", flush=True)
        res["memory"] = run_memory()
    if "voc" in parts:
        print("scribbles_voc:", flush=True)
        res["voc"] = run_voc(args.voc_only.split(",") if args.voc_only else None, args.voc_cache)
    if "figure" in parts:
        bsds_figure(data)
    if parts:
        res["total_seconds"] = time.perf_counter() - t_all
    res["targets"] = targets(res)
    res.setdefault("notes", [])
    res["notes"] = args.note or res["notes"]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(res, indent=1))
    if not args.no_doc:
        write_markdown(res)
        print()
        print(DOC.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
