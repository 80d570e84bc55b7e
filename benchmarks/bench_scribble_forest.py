"""Scribble segmentation against the user's alternative: an ilastik-style random forest (issue 14).

Same simulated strokes for both methods (skeleton pieces 30-60 px long, 3 px wide, fixed
seeds), in the same run, on every domain of ``scribble_domains.DOMAINS``. leakseg runs as
``segment(image, strokes, classes_only=True)`` with its defaults (the CLI's
``--classes-only``); the forest is ``skimage.future.fit_segmenter`` on
``multiscale_basic_features`` (sigma 1-16) with a 50-tree, depth-10 random forest.

Also: speed at 512² grey and 481×321 RGB (first preview, final result, one more stroke with a
warm start), and a stack (strokes on one slice of ``em/fibsem_medulla``, one model for the
whole stack, against the forest trained on the same slice), and every slice of each EM stack with
one stroke draw per slice (``--parts allslices``: the EM verdicts on whole stacks, not on 4 slices).

Run under the shared lock::

    flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_scribble_forest.py

Writes ``benchmarks/results/scribble_vs_forest.json`` and ``docs/benchmarks/scribble_forest.md``.
``--set KEY=VALUE`` (tuning) and ``--draw-offset`` (other stroke draws) never write results.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from scribble_domains import DOMAINS, EM_STACKS, available, cases, draw_strokes, forest, mean_iou  # noqa: E402

RESULTS = HERE / "results" / "scribble_vs_forest.json"
DOC = REPO / "docs" / "benchmarks" / "scribble_forest.md"


def leakseg(img, scr, **kw):
    from napari_leakseg.scribble import segment

    t0 = time.perf_counter()
    r = segment(img, scr, classes_only=True, device="cpu", seed=0, **kw)
    return r.labels, time.perf_counter() - t0, r


def run_domains(domains, draws, offset, limit, overrides):
    rows = []
    for d in domains:
        if not available(d):
            print(f"{d}: data not found, skipped", flush=True)
            continue
        for dom, name, img, cls, targets in cases(d, limit):
            for k in range(draws):
                scr = draw_strokes(cls.shape, targets, seed=offset + k)
                fp, ft = forest(img, scr, seed=k)
                lp, lt, _ = leakseg(img, scr, **overrides)
                rows.append({"domain": d, "image": name, "draw": offset + k, "stroke_px": int((scr > 0).sum()),
                             "forest": mean_iou(fp, cls), "forest_s": ft,
                             "leakseg": mean_iou(lp, cls), "leakseg_s": lt})
        sub = [r for r in rows if r["domain"] == d]
        if sub:
            print(f"{d:18s} n={len(sub):3d}  leakseg {np.mean([r['leakseg'] for r in sub]):.3f} "
                  f"({np.median([r['leakseg_s'] for r in sub]):.2f} s)  forest {np.mean([r['forest'] for r in sub]):.3f} "
                  f"({np.median([r['forest_s'] for r in sub]):.2f} s)", flush=True)
    return rows


def run_all_slices(domains):
    """Every slice of each EM stack, one stroke draw each (seed 1000 + slice: draws that no tuning saw),
    leakseg and the forest on the same strokes: the domain verdict on the whole stack, not on 4 slices."""
    from scribble_domains import _em_cases, em_slices

    out = []
    for d in domains:
        if d not in EM_STACKS or not available(d):
            continue
        rows = []
        for dom, name, img, cls, targets in _em_cases(d, slices=em_slices(d)):
            k = 1000 + int(name.lstrip("z"))
            scr = draw_strokes(cls.shape, targets, seed=k)
            fp, _ = forest(img, scr, seed=k)
            lp, _, _ = leakseg(img, scr)
            rows.append((mean_iou(lp, cls), mean_iou(fp, cls)))
        v = np.asarray(rows)
        dv = v[:, 0] - v[:, 1]
        out.append({"domain": d, "slices": len(v), "leakseg": float(v[:, 0].mean()), "forest": float(v[:, 1].mean()),
                    "delta": float(dv.mean()), "delta_se": float(dv.std(ddof=1) / np.sqrt(len(dv))),
                    "won": int((dv > 0).sum())})
        o = out[-1]
        print(f"{d:18s} all {o['slices']} slices: leakseg {o['leakseg']:.3f} forest {o['forest']:.3f} "
              f"Δ {o['delta']:+.3f} ± {o['delta_se']:.3f} (won {o['won']})", flush=True)
    return out


def run_variant(domains, draws, method, label, **kw):
    """leakseg with other settings ``kw`` on the same strokes (a "without the new idea" row per domain)."""
    out = []
    for d in domains:
        if not available(d):
            continue
        scores, secs = [], []
        for dom, name, img, cls, targets in cases(d):
            for k in range(draws):
                scr = draw_strokes(cls.shape, targets, seed=k)
                lp, lt, _ = leakseg(img, scr, **kw)
                scores.append(mean_iou(lp, cls))
                secs.append(lt)
        out.append({"domain": d, "method": method, "miou": float(np.mean(scores)),
                    "seconds_median": float(np.median(secs))})
        print(f"{d:18s} {label} {out[-1]['miou']:.3f} ({out[-1]['seconds_median']:.2f} s)", flush=True)
    return out


def run_without_filters(domains, draws):
    """'Without the new idea': the raw-image CNN (config='fast', the default before issue 14), same strokes."""
    return run_variant(domains, draws, "leakseg_raw_cnn", "raw CNN (config fast)", config="fast")


def run_without_guide(domains, draws):
    """'Without the new idea' of 2026-12-05: the filter network without the guided filter (guide_r=0) and
    without the later sharpening round, as it was before that day."""
    return run_variant(domains, draws, "leakseg_no_edge_smoothing", "without edge smoothing", guide_r=0,
                       sharpen_iter=0)


def run_without_sharpen(domains, draws):
    """'Without the new idea' of stop 27: the filter network without the final sharpening round
    (sharpen_iter=0; edge smoothing on)."""
    return run_variant(domains, draws, "leakseg_no_sharpening", "without sharpening", sharpen_iter=0)


def run_without_lab(domains, draws):
    """'Without the new idea' of stop 28: the filter bank on the RGB channels instead of CIELAB
    (colour='rgb'). Only the colour domain is run: on grey images the two are the same."""
    return run_variant([d for d in domains if d == "bsds500"], draws, "leakseg_rgb_filters", "RGB filters",
                       colour="rgb")


def run_without_small_scales(domains, draws):
    """'Without the new idea' of stop 28 (second change): the filter bank at sigma 1, 2, 4, 8 and 16
    instead of 1, 1.5, 2, 3 and 4."""
    from napari_leakseg.core.filters import DEFAULT_SIGMAS

    return run_variant(domains, draws, "leakseg_sigma_1_16", "sigma 1-16", sigmas=list(DEFAULT_SIGMAS))


def summarise(rows):
    out = []
    for d in dict.fromkeys(r["domain"] for r in rows):
        sub = [r for r in rows if r["domain"] == d]
        for m in ("leakseg", "forest"):
            out.append({"domain": d, "method": m, "miou": float(np.mean([r[m] for r in sub])),
                        "seconds_median": float(np.median([r[f"{m}_s"] for r in sub]))})
    return out


def run_speed(repeats=5):
    """First preview, final result and a warm-started update after one more stroke (medians)."""
    from napari_leakseg.core.jobs import run_job
    from napari_leakseg.scribble import iter_segment, segment

    out = {}
    cs = {"512² grey (isbi2012)": cases("isbi2012", 1)[0], "481×321 RGB (bsds500)": cases("bsds500", 1)[0]}
    for label, (_, _, img, cls, targets) in cs.items():
        scr = draw_strokes(cls.shape, targets, seed=0)
        extra = draw_strokes(cls.shape, targets, seed=1)
        more = np.where(scr > 0, scr, 0)
        first = extra[(extra > 0) & (scr == 0)]
        # one more stroke: the first stroke of another draw
        more[(extra == (first[0] if first.size else 1)) & (scr == 0)] = first[0] if first.size else 1
        fp, fin, warm = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            seen = []
            res = run_job(iter_segment(img, scr, classes_only=True, device="cpu", seed=0),
                          lambda p: seen.append(time.perf_counter() - t0) if p.preview is not None else None).value
            fp.append(seen[0] if seen else res.seconds)
            fin.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            segment(img, more, classes_only=True, device="cpu", seed=0, warm_start=res.state)
            warm.append(time.perf_counter() - t0)
        out[label] = {"first_preview_s": float(np.median(fp)), "final_s": float(np.median(fin)),
                      "warm_update_s": float(np.median(warm)), "repeats": repeats}
        print(f"{label}: first preview {out[label]['first_preview_s']:.2f} s, final {out[label]['final_s']:.2f} s, "
              f"one more stroke (warm) {out[label]['warm_update_s']:.2f} s", flush=True)
    return out


def run_stack(draws=3):
    """Strokes on slice 3 of fibsem_medulla; the whole 50-slice stack segmented by one model."""
    import imageio.v3 as iio

    from napari_leakseg.scribble import segment
    from scribble_domains import DATA, _em_cases

    root = DATA / "em" / "fibsem_medulla"
    files = sorted((root / "image").glob("z*.png"))
    stack = np.stack([iio.imread(p) for p in files])
    mem = np.stack([iio.imread(root / "membrane" / p.name) > 127 for p in files])
    cls = np.where(mem, 1, 2).astype(np.uint8)
    z0 = 3
    _, _, _, _, targets = next(_em_cases("fibsem_medulla", 1))
    rows = []
    for k in range(draws):
        s2 = draw_strokes(cls[z0].shape, targets, seed=k)
        scr = np.zeros(stack.shape, np.uint8)
        scr[z0] = s2
        t0 = time.perf_counter()
        lab = segment(stack, scr, classes_only=True, device="cpu", seed=0, stack=True).labels
        lt = time.perf_counter() - t0
        # the forest trained on the same slice, applied to every slice
        from functools import partial

        from sklearn.ensemble import RandomForestClassifier
        from skimage.feature import multiscale_basic_features
        from skimage.future import fit_segmenter, predict_segmenter

        t0 = time.perf_counter()
        fn = partial(multiscale_basic_features, sigma_min=1, sigma_max=16)
        clf = fit_segmenter(s2, fn(stack[z0]), RandomForestClassifier(n_estimators=50, n_jobs=-1, max_depth=10,
                                                                       random_state=k))
        fpred = np.stack([predict_segmenter(fn(im), clf) for im in stack])
        ft = time.perf_counter() - t0
        others = [z for z in range(len(stack)) if z != z0]
        rows.append({"draw": k, "leakseg": float(np.mean([mean_iou(lab[z], cls[z]) for z in others])),
                     "forest": float(np.mean([mean_iou(fpred[z], cls[z]) for z in others])),
                     "leakseg_s": lt, "forest_s": ft,
                     "ids_consistent": bool(set(np.unique(lab)) <= {1, 2})})
        print(f"stack draw {k}: leakseg {rows[-1]['leakseg']:.3f} ({lt:.1f} s)  forest {rows[-1]['forest']:.3f} "
              f"({ft:.1f} s)", flush=True)
    return {"stack": "fibsem_medulla", "slices": int(len(stack)), "stroke_slice": z0, "rows": rows,
            "leakseg_miou": float(np.mean([r["leakseg"] for r in rows])),
            "forest_miou": float(np.mean([r["forest"] for r in rows])),
            "leakseg_s_median": float(np.median([r["leakseg_s"] for r in rows])),
            "forest_s_median": float(np.median([r["forest_s"] for r in rows]))}


def write_doc(res):
    s = res["summary"]
    lines = ["## Scribble segmentation against a random forest (issue 14)", "",
             f"Machine: {res['machine']}. Load average at start: {res['load']}. Reproduce with "
             "`flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_scribble_forest.py` "
             f"(took {res['minutes']:.1f} min).", "",
             "Same strokes for both methods: skeleton pieces 30–60 px long and 3 px wide, "
             f"{res['draws']} draws per image from fixed seeds (0..{res['draws'] - 1}). leakseg: "
             "`segment(image, strokes, classes_only=True)` with its defaults (`leakseg segment --classes-only`). "
             "Forest: `skimage.future.fit_segmenter` on `multiscale_basic_features` (intensity, edges, texture, "
             "sigma 1–16) with `RandomForestClassifier(n_estimators=50, max_depth=10)`, in process. Score: mean "
             "over classes of IoU(prediction = class, truth = class) on the scored pixels; then the mean over "
             "images and draws.", "",
             "| domain | cases | leakseg mIoU | forest mIoU | Δ | leakseg s (median) | forest s (median) | time ratio | target (Δ ≥ 0.03) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in dict.fromkeys(r["domain"] for r in s):
        L = next(r for r in s if r["domain"] == d and r["method"] == "leakseg")
        Fr = next(r for r in s if r["domain"] == d and r["method"] == "forest")
        n = sum(1 for r in res["rows"] if r["domain"] == d)
        delta = L["miou"] - Fr["miou"]
        lines.append(f"| {d} | {n} | {L['miou']:.3f} | {Fr['miou']:.3f} | {delta:+.3f} | {L['seconds_median']:.2f} | "
                     f"{Fr['seconds_median']:.2f} | {L['seconds_median'] / max(Fr['seconds_median'], 1e-9):.1f}× | "
                     f"{'met' if delta >= 0.03 else '**missed**'} |")
    if res.get("without_filters"):
        # columns: the parts' results by domain; a domain a part does not run shows "—" (RGB filters on grey)
        cols = [{r["domain"]: r for r in res.get(k, [])} for k in WITHOUT_KEYS]
        lines += ["", "Without the new ideas (same strokes; each column is today's default with one idea taken out, "
                  "so it is not the older default itself): the raw-image CNN (`config='fast'`, the default before "
                  "issue 14); the filter network without edge smoothing and sharpening (`guide_r=0, sharpen_iter=0`, "
                  "added on 2026-12-05); without the sharpening round only (`sharpen_iter=0`, added at stop 27); "
                  "on colour images, the filter bank on RGB instead of CIELAB "
                  "(`colour='rgb'`, added at stop 28; grey images: —, the same); and the filter bank at σ 1–16 "
                  "instead of σ 1–4 (`sigmas=[1, 2, 4, 8, 16]`, changed at stop 28):", "",
                  "| domain | raw CNN mIoU | no edge smoothing mIoU | no sharpening mIoU | RGB filters mIoU | σ 1–16 mIoU "
                  "| default mIoU | raw CNN s | no edge smoothing s | no sharpening s | RGB filters s | σ 1–16 s | default s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in cols[0]:
            row = [c.get(d) for c in cols] + [next((x for x in s if x["domain"] == d and x["method"] == "leakseg"),
                                                   None)]
            miou = [f"{r['miou']:.3f}" if r else "—" for r in row]
            secs = [f"{r['seconds_median']:.2f}" if r else "—" for r in row]
            lines.append("| " + " | ".join([d] + miou + secs) + " |")
    if res.get("speed"):
        lines += ["", "Speed (medians of " + str(next(iter(res["speed"].values()))["repeats"]) + " runs, in process):", "",
                  "| image | first preview (s) | final result (s) | one more stroke, warm start (s) |", "|---|---|---|---|"]
        for k, v in res["speed"].items():
            lines.append(f"| {k} | {v['first_preview_s']:.2f} | {v['final_s']:.2f} | {v['warm_update_s']:.2f} |")
    if res.get("stack"):
        st = res["stack"]
        lines += ["", f"Stack: strokes on slice {st['stroke_slice']} of `{st['stack']}` ({st['slices']} slices), "
                  f"scored on the other slices: leakseg {st['leakseg_miou']:.3f} (one model, {st['leakseg_s_median']:.1f} s "
                  f"for the stack) vs forest {st['forest_miou']:.3f} ({st['forest_s_median']:.1f} s); ids consistent "
                  f"across slices: {all(r['ids_consistent'] for r in st['rows'])}."]
    if res.get("all_slices"):
        lines += ["", "Every slice of each EM stack, one stroke draw per slice (seeds 1000 + slice, never used for "
                  "tuning), same strokes for both (Δ ± standard error of the mean over slices):", "",
                  "| stack | slices | leakseg mIoU | forest mIoU | Δ | slices won | target (Δ ≥ 0.03) |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["all_slices"]:
            lines.append(f"| {r['domain']} | {r['slices']} | {r['leakseg']:.3f} | {r['forest']:.3f} | "
                         f"{r['delta']:+.3f} ± {r['delta_se']:.3f} | {r['won']} of {r['slices']} | "
                         f"{'met' if r['delta'] >= 0.03 else '**missed**'} |")
    lines += ["", "<!-- notes -->", res.get("notes", ""), ""]
    DOC.write_text("\n".join(lines))


#: "without the new idea" parts, in the order of the table's columns: --parts name → (results key, runner)
WITHOUT_PARTS = {"raw": ("without_filters", run_without_filters), "noguide": ("without_guide", run_without_guide),
                 "nosharpen": ("without_sharpen", run_without_sharpen), "nolab": ("without_lab", run_without_lab),
                 "nosmall": ("without_small_scales", run_without_small_scales)}
WITHOUT_KEYS = [key for key, _ in WITHOUT_PARTS.values()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--draw-offset", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="images per domain (default all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (tuning)")
    ap.add_argument("--parts", default="domains,raw,noguide,nosharpen,nolab,nosmall,speed,stack,allslices")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "[{0123456789-.tf" and v not in ("filters",) else v
    write = not (a.no_write or a.set or a.draw_offset or a.limit)
    import torch

    t0 = time.time()
    parts = a.parts.split(",")
    res = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
                      f"{platform.processor() or platform.machine()}",
           "load": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "draws": a.draws}
    if "domains" in parts:
        res["rows"] = run_domains(a.domains.split(","), a.draws, a.draw_offset, a.limit, overrides)
        res["summary"] = summarise(res["rows"])
    for part, (key, runner) in WITHOUT_PARTS.items():
        if part in parts:
            res[key] = runner(a.domains.split(","), a.draws)
    if "speed" in parts:
        res["speed"] = run_speed()
    if "stack" in parts and available("fibsem_medulla"):
        res["stack"] = run_stack(a.draws)
    if "allslices" in parts:
        res["all_slices"] = run_all_slices(a.domains.split(","))
    if "domains" in parts:
        res["minutes"] = (time.time() - t0) / 60
    else:  # a partial run keeps the main run's machine, load and duration lines
        for k in ("machine", "load"):
            res.pop(k, None)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for k in ("rows", "summary", "speed", "stack", "all_slices", *WITHOUT_KEYS, "minutes",
              "load", "machine"):  # parts not run now keep their last results
        if k not in res and k in old:
            res[k] = old[k]
    if write and "summary" in res:
        res["notes"] = old.get("notes", "")  # hand-written analysis
        RESULTS.write_text(json.dumps(res, indent=1))
        write_doc(res)
        print(f"wrote {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
