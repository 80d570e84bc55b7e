"""Device check: the same work on the CPU and on a CUDA GPU, side by side in one run.

Runs on our own synthetic sample data (no ../shared needed, so it can run on a
lent GPU machine): membrane training steps and 512² prediction, restoration
training steps and 2048² tiled prediction, and scribble segmentation of the
bundled 400×600 coffee image for a fixed number of iterations. Each figure is
the median of ``--repeats`` runs after one warm-up; GPU times include
``torch.cuda.synchronize()``. Without CUDA only the CPU column is measured.

    python benchmarks/bench_device.py --out benchmarks/results/device.json --md docs/benchmarks/device.md

(CPU threads: torch's default for the machine, printed in the table.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from napari_leakseg import membrane as M  # noqa: E402
from napari_leakseg import restore as R  # noqa: E402
from napari_leakseg.samples import membranes, scribble_image, sem_particles  # noqa: E402
from napari_leakseg.scribble import segment  # noqa: E402


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def median_time(fn, dev, repeats):
    fn()  # warm-up (allocations, cuDNN autotuning)
    _sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def measure(dev, repeats, steps):
    img, lab = membranes((512, 512), seed=0)
    clean, low, _ = sem_particles((512, 512), seed=0)
    big = np.tile(low, (4, 4))
    cimg, scr = scribble_image()
    out = {}
    mkw = dict(membrane_value=1, epochs=1, steps_per_epoch=steps, batch_size=4, crop=128, seed=0, device=dev)
    out["membrane train s/step (4 × 128²)"] = median_time(lambda: M.train_membrane([img], [lab], **mkw), dev,
                                                          repeats) / steps
    tm = M.train_membrane([img], [lab], **mkw)
    pred = M.MembranePredictor(tm, device=dev)
    out["membrane predict 512² s (references, feedback)"] = median_time(lambda: pred.probability(img), dev,
                                                                       repeats)
    rkw = dict(steps=steps, batch_size=4, crop=128, seed=0, device=dev, val_every=10 ** 6, preview=False)
    out["restore train s/step (4 × 128²)"] = median_time(lambda: R.train(low=[low], high=[clean], **rkw), dev,
                                                         repeats) / steps
    rm = R.train(low=[low], high=[clean], **rkw)
    out["restore predict 2048² s (tiled)"] = median_time(lambda: R.restore_image(rm, big, device=dev), dev,
                                                         repeats)
    out["scribble segment 400×600 s (100 iterations)"] = median_time(
        lambda: segment(cimg, scr, device=dev, max_iter=100, stop_change=0.0), dev, repeats)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks" / "device.md"))
    args = ap.parse_args(argv)
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res = {d: measure(d, args.repeats, args.steps) for d in devs}
    env = dict(torch=torch.__version__, cpu_threads=torch.get_num_threads(), platform=platform.platform(),
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, python=platform.python_version())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(results=res, env=env, repeats=args.repeats, steps=args.steps), indent=1))
    head = "| work | CPU s | " + ("GPU s | CPU / GPU |" if "cuda" in res else "")
    lines = ["## Device: the same work on CPU and GPU", "",
             f"`benchmarks/bench_device.py` on our synthetic samples; median of {args.repeats} after a warm-up "
             f"(training: {args.steps} steps). Machine: {env['gpu'] or 'no GPU'}, torch {env['torch']}, "
             f"{env['cpu_threads']} CPU threads.", "", head, "|---|---|" + ("---|---|" if "cuda" in res else "")]
    for k, v in res["cpu"].items():
        row = f"| {k} | {v:.3f} |"
        if "cuda" in res:
            g = res["cuda"][k]
            row += f" {g:.4f} | {v / g:.1f}× |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
