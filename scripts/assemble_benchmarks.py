"""Assemble docs/benchmarks.md from the per-benchmark fragments in docs/benchmarks/*.md.

Each benchmarks/bench_*.py writes its own fragment (and benchmarks/results/*.json);
this script only concatenates them in a fixed order under a common header.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["summary", "runtime", "threads", "cli", "scribble", "scribble_forest", "membrane", "membrane_diagnosis", "membrane_cross",
         "restore", "propagate", "scale", "device"]

HEADER = """# Benchmarks

All numbers were measured by the scripts in `benchmarks/` on the real data in
`../shared/data` (see its `SOURCES.md`), on the development machine: **2 CPU cores, no GPU**.
Each script prints its table and writes `benchmarks/results/<name>.json`; the sections
below are the fragments they write to `docs/benchmarks/<name>.md`, assembled by
`scripts/assemble_benchmarks.py`. Speed figures are medians, and every method is
compared with its baseline in the same run, because the machine is noisy (during
development it was shared by several jobs at once; where that inflated times, the
section says so).

"""


def runtime_section() -> str:
    p = ROOT / "benchmarks" / "results" / "runtime.json"
    if not p.exists():
        return ""
    r = json.loads(p.read_text())
    m = r["median"]
    return f"""## Foundation: responsiveness and the thread-worker slowdown (micro-sam #740)

`xvfb-run -a python benchmarks/bench_runtime.py` runs a CPU-heavy torch training loop
({r['seconds_per_run']} s, {r['repeats']} repeats) in the main thread, then in our
`JobRunner` thread worker while a 10 ms `QTimer` measures event-loop stalls
(napari {r['napari']}, torch {r['torch']}, {r['torch_threads']} torch threads).

| metric | median |
|---|---|
| longest event-loop stall (ms) | {m['max_stall_ms']:.0f} |
| 99th-percentile tick gap (ms) | {m['p99_stall_ms']:.0f} |
| torch iterations/s, main thread | {m['main_iters_per_s']:.2f} |
| torch iterations/s, napari thread worker | {m['worker_iters_per_s']:.2f} |
| worker / main throughput | {m['worker_over_main']:.2f} |

micro-sam #740 reported a "massive slowdown" of computations in napari thread workers
with napari ≥ 0.5. On napari {r['napari']} we do not see it: the worker keeps
{m['worker_over_main']:.0%} of the main-thread throughput (a ratio ≥ 1 means no slowdown; the
test suite asserts > 50 %, and a stall < 150 ms).

""" + demo_section(r.get("demo"))


def _end_loads(d) -> str:
    ends = [r["load_avg_end"][0] for r in d.get("runs", []) if r.get("load_avg_end")]
    return f", {', '.join(f'{v:.1f}' for v in ends)} at the end of each run" if ends else ""


def _nice(d) -> str:
    return f"; job threads at nice {d['worker_nice']}" if "worker_nice" in d else ""


def demo_section(d) -> str:
    """The demo part of runtime.json (``bench_runtime.py`` runs ``leakseg demo``'s jobs)."""
    if not d:
        return ""
    m = d["median"]
    jobs = d["runs"][0]["jobs"] if d.get("runs") else {}
    stall_ok = "met" if m["max_stall_ms"] < d.get("stall_limit_ms", 150) else "**missed**"
    return f"""### The demo (`leakseg demo`): four results on start

The same timer runs while the demo viewer runs its six jobs (each widget once on its sample,
one job at a time; {d['repeats']} runs, {d['qt']}, load average {d['load_avg_start'][0]:.1f} at the start{_end_loads(d)}{_nice(d)}):

| metric | median |
|---|---|
| longest event-loop stall (ms) | {m['max_stall_ms']:.0f} ({stall_ok}: < {d.get('stall_limit_ms', 150)} ms) |
| 99th-percentile tick gap (ms) | {m['p99_stall_ms']:.0f} |
| first result (scribble segmentation) shown after (s) | {m['first_result_s']:.1f} |
| all four results after (s) | {m['all_results_s']:.1f} |
| process RSS with the viewer, before the jobs (MB) | {m['rss_before_jobs_mb']:.0f} |
| peak RSS during the jobs (MB) | {m['peak_rss_mb']:.0f} |

Jobs of the first run (s): {', '.join(f'{k} {v:.1f}' for k, v in jobs.items())}.
All jobs succeeded in every run: {'yes' if d.get('all_ok') else '**no**'}.
{('Note: ' + d['note'] + '.') if d.get('note') else ''}

"""


def main() -> int:
    parts = [HEADER]
    for name in ORDER:
        if name == "runtime":
            parts.append(runtime_section())
            continue
        frag = ROOT / "docs" / "benchmarks" / f"{name}.md"
        if frag.exists():
            parts.append(frag.read_text().rstrip() + "\n\n")
        else:
            parts.append(f"## {name}\n\nNot measured yet: `benchmarks/bench_{name}.py` has not been run.\n\n")
    (ROOT / "docs" / "benchmarks.md").write_text("".join(parts))
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
