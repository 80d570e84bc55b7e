"""Foundation benchmark: GUI responsiveness and the micro-sam #740 thread-worker check.

Runs the same CPU-heavy torch training loop (a) in the main thread and (b) in our
JobRunner's napari thread_worker while a 10 ms QTimer measures event-loop stalls.
Repeats R times, reports medians, writes benchmarks/results/runtime.json.

    xvfb-run -a python benchmarks/bench_runtime.py [--repeats 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.workers import JobRunner

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
    result = {"napari": napari.__version__, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "seconds_per_run": args.seconds, "median": med, "runs": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print("\n| metric | median |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
