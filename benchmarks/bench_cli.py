"""How fast the command line answers: ``leakseg --help``, ``--version``, ``info``, an argument error.

Each command runs R times in a fresh process, interleaved with ``python -c pass``
(the interpreter's own start-up, the floor) so that both see the same machine
load; medians are reported. Also measured, for context: ``python -c "import torch"``
(what every subcommand paid before torch was imported lazily) and
``leakseg info --devices`` (which imports torch on purpose).

    python benchmarks/bench_cli.py [--repeats 15]

Writes benchmarks/results/cli.json and docs/benchmarks/cli.md. Target: the fast
commands under 1 s (median).
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
OUT = ROOT / "benchmarks" / "results" / "cli.json"
DOC = ROOT / "docs" / "benchmarks" / "cli.md"
TARGET_S = 1.0


def leakseg_cmd() -> list[str]:
    """The installed ``leakseg`` script beside this interpreter (what users run), else ``-m``."""
    script = Path(sys.executable).parent / "leakseg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "napari_leakseg.cli.main"]


def commands() -> dict:
    ls = leakseg_cmd()
    return {
        # name: (argv, expected exit code, target seconds or None)
        "python -c pass": ([sys.executable, "-c", "pass"], 0, None),
        "leakseg --help": (ls + ["--help"], 0, TARGET_S),
        "leakseg --version": (ls + ["--version"], 0, TARGET_S),
        "leakseg info": (ls + ["info"], 0, TARGET_S),
        "leakseg segment (argument error)": (ls + ["segment"], 2, TARGET_S),
        "leakseg segment --help": (ls + ["segment", "--help"], 0, TARGET_S),
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], 0, None),
        "leakseg info --devices": (ls + ["info", "--devices"], 0, None),
    }


def time_once(argv, want_rc) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != want_rc:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode} (expected {want_rc}): {r.stderr[-500:]}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15, help="runs of each fast command (default 15)")
    ap.add_argument("--slow-repeats", type=int, default=5, help="runs of the torch-importing ones (default 5)")
    args = ap.parse_args(argv)

    load = list(os.getloadavg())
    cmds = commands()
    where = subprocess.run([sys.executable, "-c", "import napari_leakseg; print(napari_leakseg.__file__)"],
                           capture_output=True, text=True).stdout.strip()
    times = {name: [] for name in cmds}
    for name, (av, rc, _) in cmds.items():  # warm the file cache once
        time_once(av, rc)
    for r in range(max(args.repeats, args.slow_repeats)):
        for name, (av, rc, target) in cmds.items():
            slow = target is None and name != "python -c pass"
            if r < (args.slow_repeats if slow else args.repeats):
                times[name].append(time_once(av, rc))
    base = statistics.median(times["python -c pass"])
    rows = {}
    for name, (av, rc, target) in cmds.items():
        med = statistics.median(times[name])
        rows[name] = {"argv": [Path(av[0]).name] + av[1:], "exit_code": rc, "runs": len(times[name]),
                      "median_s": round(med, 4), "min_s": round(min(times[name]), 4),
                      "max_s": round(max(times[name]), 4), "over_python_s": round(med - base, 4),
                      "target_s": target, "met": (med < target) if target else None}
    result = {"benchmark": "cli start-up", "load_avg_start": load, "load_avg_end": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "imported_from": where,
              "target_s": TARGET_S, "commands": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    table = ["| command | median (s) | min (s) | above `python -c pass` (s) | target | met |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        table.append(f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['over_python_s']:+.2f} | "
                     f"{'< %.0f s' % r['target_s'] if r['target_s'] else '—'} | {met} |")
    print("\n".join(table))
    fast = [r for r in rows.values() if r["target_s"]]
    torch_s = rows['python -c "import torch"']["median_s"]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"""## Command-line start-up

`python benchmarks/bench_cli.py` runs each command {args.repeats} times in a fresh process
({args.slow_repeats} for the two that import torch), interleaved with `python -c pass` so that all
see the same load (load average {load[0]:.1f} at the start, {os.cpu_count()} cores); medians.
`leakseg` is the installed console script.

{chr(10).join(table)}

The subcommand modules import torch, napari and dask only inside the functions that run
them (a test checks `sys.modules` after building the parser, and after `--help`, `info`
and argument errors), so these commands cost the interpreter plus argparse:
{sum(r['met'] for r in fast)}/{len(fast)} of them are under {TARGET_S:.0f} s. Importing torch alone takes
{torch_s:.1f} s here, which every command paid before. `leakseg info` reads versions from the
package metadata and the torch build from its files; `leakseg info --devices` imports torch to
list the devices and threads, and is not one of the fast commands.
""")
    print(f"wrote {OUT} and {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
