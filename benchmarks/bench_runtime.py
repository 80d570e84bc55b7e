"""Foundation benchmark: GUI responsiveness and the micro-sam #740 thread-worker check.

Runs the same CPU-heavy torch training loop (a) in the main thread and (b) in our
JobRunner's napari thread_worker while a 10 ms QTimer measures event-loop stalls.
Repeats R times, reports medians, writes benchmarks/results/runtime.json.

Then the demo (``leakseg demo``'s viewer with its jobs: every widget run once on
its sample), D times: the same 10 ms timer measures stalls over the whole run,
with the demo's time to first result and to all four, and the process's peak
RSS beside its RSS with the same viewer before any job ran (what the demo used
before it ran its widgets).

    xvfb-run -a python benchmarks/bench_runtime.py [--repeats 5] [--seconds 3] [--demo-repeats 3]
    xvfb-run -a python benchmarks/bench_runtime.py --only demo   # keeps the stored worker results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "results" / "runtime.json"


def torch_job(seconds, info):
    from napari_leakseg.core.jobs import Progress

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(1, 3, 256, 256)
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        i += 1
        yield Progress(i, None, f"iter {i}", preview=np.zeros((4, 4)))
    info["iters"] = i
    info["seconds"] = time.perf_counter() - t0
    return i


class StallMeter:
    """A 10 ms QTimer; records the gaps between its ticks (and the peak RSS, sampled at each tick)."""

    def __init__(self):
        import psutil
        from qtpy.QtCore import QTimer

        self.proc = psutil.Process()
        self.gaps, self.peak_rss = [], 0
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        self.last = now
        if len(self.gaps) % 10 == 0:
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def _gc(self, phase, info):
        """gc callback: the longest full (generation 2) collection, which runs in whatever thread allocates."""
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif info.get("generation") == 2 and self._gc_t0 is not None:
            self.gc_full.append(time.perf_counter() - self._gc_t0)

    def start(self):
        import gc

        self.gc_full, self._gc_t0 = [], None
        gc.callbacks.append(self._gc)
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self):
        import gc

        self.timer.stop()
        gc.callbacks.remove(self._gc)
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
        return {"max_stall_ms": 1000 * max(self.gaps[1:]),
                "p99_stall_ms": 1000 * float(np.percentile(self.gaps[1:], 99)),
                "full_gc": len(self.gc_full), "full_gc_max_ms": 1000 * max(self.gc_full, default=0.0)}


def demo_run(app) -> dict:
    """One demo: build its viewer, run its jobs, measure stalls, times and memory."""
    import gc

    import psutil

    from napari_leakseg._napari import demo as D

    viewer, widgets = D.build_viewer(None)
    for _ in range(50):  # let the window come up before measuring
        app.processEvents()
        time.sleep(0.01)
    rss_before = psutil.Process().memory_info().rss
    meter = StallMeter()
    meter.start()
    run = D.DemoRun(viewer, widgets).start()
    first = None
    t0 = time.perf_counter()
    while not run.done and time.perf_counter() - t0 < 1200:
        app.processEvents()
        time.sleep(0.002)
        if first is None and any(e.seconds for e in run.log):
            first = time.perf_counter() - t0
    row = meter.stop()
    row.update({"first_result_s": first, "all_results_s": run.seconds, "ok": run.ok,
                "jobs": {f"{e.sample} {e.action}": round(e.seconds, 2) for e in run.log},
                "rss_before_jobs_mb": rss_before / 2 ** 20, "peak_rss_mb": meter.peak_rss / 2 ** 20,
                "load_avg_end": list(os.getloadavg())})
    viewer.close()
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--demo-repeats", type=int, default=3, help="demo runs (0: none)")
    ap.add_argument("--only", choices=("worker", "demo"), default=None,
                    help="run one part; the other part's stored results are kept")
    args = ap.parse_args(argv)
    load = list(os.getloadavg())

    from napari_leakseg.cli.demo import use_demo_qt_api

    use_demo_qt_api()  # the same binding as `leakseg demo` (PyQt6 when installed)
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.workers import JobRunner

    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.only == "demo":
        result = dict(old)
        from napari.qt import get_qapp

        result["demo"] = demo_part(get_qapp(), args.demo_repeats, load)
        return write(result)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    rows = []
    for r in range(args.repeats):
        main_info = {}
        for _ in torch_job(args.seconds, main_info):
            pass
        gaps, last = [], [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(tick)
        info = {}
        runner = JobRunner("bench")
        timer.start()
        runner.start(lambda: torch_job(args.seconds, info))
        while runner.running:
            app.processEvents()
            time.sleep(0.002)
        timer.stop()
        rows.append({
            "main_iters_per_s": main_info["iters"] / main_info["seconds"],
            "worker_iters_per_s": info["iters"] / info["seconds"],
            "max_stall_ms": 1000 * max(gaps[1:]),
            "p99_stall_ms": 1000 * float(np.percentile(gaps[1:], 99)),
        })
        print(f"run {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1].items()))
    viewer.close()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    med["worker_over_main"] = med["worker_iters_per_s"] / med["main_iters_per_s"]
    from qtpy import API_NAME

    result = {"napari": napari.__version__, "torch": torch.__version__, "qt": API_NAME,
              "torch_threads": torch.get_num_threads(), "load_avg_start": load, "repeats": args.repeats,
              "seconds_per_run": args.seconds, "median": med, "runs": rows}
    print("\n| metric | median |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    if args.only != "worker" and args.demo_repeats > 0:
        result["demo"] = demo_part(app, args.demo_repeats, list(os.getloadavg()))
    elif "demo" in old:
        result["demo"] = old["demo"]
    return write(result)


def demo_part(app, repeats: int, load) -> dict:
    from qtpy import API_NAME

    runs = []
    for r in range(repeats):
        runs.append(demo_run(app))
        print(f"demo {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items()
                                        if isinstance(v, float)) + f", ok {runs[-1]['ok']}", flush=True)
    keys = ("max_stall_ms", "p99_stall_ms", "full_gc_max_ms", "first_result_s", "all_results_s", "rss_before_jobs_mb",
            "peak_rss_mb")
    med = {k: statistics.median(x[k] for x in runs if x[k] is not None) for k in keys}
    print("\n| demo metric | median |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    from napari_leakseg._napari.workers import worker_nice

    return {"repeats": repeats, "qt": API_NAME, "load_avg_start": load, "worker_nice": worker_nice(),
            "torch_threads": torch.get_num_threads(), "all_ok": all(x["ok"] for x in runs),
            "stall_limit_ms": 150, "median": med, "runs": runs}


def write(result) -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
