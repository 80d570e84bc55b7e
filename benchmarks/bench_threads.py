"""torch's OpenMP wait policy on an idle and on a busy machine (``OMP_WAIT_POLICY``: a trade-off).

One scribble segmentation (``segment(image, strokes, classes_only=True)``, the filter-bank default) on
a 481×321 RGB image runs in a fresh process, with torch's default 2 threads on this machine, under
each wait policy (``default``: the variable unset, so GNU OpenMP threads spin for a while between
parallel regions before they sleep; ``PASSIVE``: they sleep at once, what a user may set), on an
idle machine and beside one busy process (a pure-Python loop, standing in for napari's GUI thread or any
other program). Policies alternate run by run so that both see the same load; medians are reported.

    python benchmarks/bench_threads.py [--repeats 5]

Writes benchmarks/results/threads.json and docs/benchmarks/threads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "threads.json"
DOC = ROOT / "docs" / "benchmarks" / "threads.md"

CHILD = r"""
import os, time, json
import numpy as np
import torch  # loaded first: the policy in the environment is what OpenMP sees
from napari_leakseg.scribble import segment
rng = np.random.default_rng(0)
img = (rng.random((321, 481, 3)) * 40).astype(np.uint8)
img[:, 240:] += 120  # two regions of different brightness and texture
img[100:200, 100:400, 1] += 60
scr = np.zeros(img.shape[:2], np.uint8)
scr[50:53, 20:200] = 1
scr[250:253, 300:460] = 2
scr[150:153, 150:350] = 3
segment(img[:64, :64], np.minimum(scr[:64, :64], 1), device="cpu")  # warm-up (imports, kernels)
t0 = time.perf_counter()
segment(img, scr, classes_only=True, device="cpu", seed=0)
print(json.dumps({"s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                  "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 600:\n    pass\n"


def one(policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    import torch

    res = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
           "load_at_start": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "repeats": a.repeats, "rows": []}
    for busy in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            if busy:
                time.sleep(1.0)
            times = {"default": [], "PASSIVE": []}
            for _ in range(a.repeats):
                for pol in times:
                    times[pol].append(one(pol))
        finally:
            if proc is not None:
                proc.kill()
        for pol, ts in times.items():
            row = {"busy_process": busy, "policy": pol, "seconds_median": statistics.median(ts), "runs": ts}
            res["rows"].append(row)
            print(f"{'busy' if busy else 'idle'}  {pol:8s} median {row['seconds_median']:.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in ts)})", flush=True)
    if a.no_write:
        return 0
    OUT.write_text(json.dumps(res, indent=1))
    med = {(r["busy_process"], r["policy"]): r["seconds_median"] for r in res["rows"]}
    lines = ["## torch threads on a busy machine (OpenMP wait policy)", "",
             f"Machine: {res['machine']}; load average at start {res['load_at_start']}. "
             "Reproduce with `python benchmarks/bench_threads.py`.", "",
             "One scribble segmentation (481×321 RGB, 3 classes, the filter-bank default) in a fresh process, "
             "torch's default threads; policies alternate run by run; medians of "
             f"{a.repeats}. We leave the variable to the user: PASSIVE wins beside another busy process and loses on "
             "an idle machine (the speed targets are measured idle), so the product does not set it.", "",
             "| machine | default (unset) s | PASSIVE s | default / PASSIVE |", "|---|---|---|---|"]
    for busy, name in ((False, "idle"), (True, "one other busy process")):
        a_, p_ = med[(busy, "default")], med[(busy, "PASSIVE")]
        lines.append(f"| {name} | {a_:.2f} | {p_:.2f} | {a_ / p_:.1f}× |")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
