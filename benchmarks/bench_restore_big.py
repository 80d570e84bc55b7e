"""Tiled restoration of a large zarr image in bounded memory (issue 5: 8192×8192).

The model is the benchmark's SSIM U-Net architecture (base 16, depth 3) trained
briefly on the first SEM pair: compute and memory do not depend on how long it
was trained. Measures wall time and the peak RSS increase while restoring a
SIZE×SIZE uint8 zarr (the test image tiled) into a float32 zarr, and adds the
figures to ``benchmarks/results/restore.json`` under ``tiled``.

    flock /tmp/leakseg-bench.lock .venv/bin/python benchmarks/bench_restore_big.py --size 8192
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_restore as B  # noqa: E402
from napari_leakseg import restore as R  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    d = B.data_dir()
    if not (d / "low").exists():
        print(f"SEM data not found at {d}; skipped", file=sys.stderr)
        return 1
    p = B.load_pairs(d)[0]
    model = R.train(low=[p["low"]], high=[p["high"]], mode="paired", loss="ssim", steps=args.steps,
                    batch_size=4, crop=128, seed=0, device="cpu", bar=None, preview=False)
    big = B.big_tiled(model, p["low"], args.size)
    print(json.dumps(big))
    out = HERE / "results" / "restore.json"
    if not args.no_write and out.exists():
        js = json.loads(out.read_text())
        js["tiled"] = big
        out.write_text(json.dumps(js, indent=1))
        B.write_md(js, B.make_table(js["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
