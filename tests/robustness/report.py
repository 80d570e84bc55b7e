"""Summarise a robustness run for docs/reliability.md.

    LEAKSEG_ROBUSTNESS_REPORT=/tmp/rob.json xvfb-run -a .venv/bin/pytest tests/robustness -q
    .venv/bin/python tests/robustness/report.py /tmp/rob.json

Prints markdown: per suite and target, how many attack cases were accepted
(valid output) and how many were refused with a one-line message.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.loads(open(path).read())
    table = defaultdict(lambda: {"ok": [], "refused": []})
    for key, outcome in data.items():
        suite, target, case = key.split("|")
        table[(suite, target)]["ok" if outcome == "ok" else "refused"].append(case)
    print("| suite | target | cases | accepted (valid output) | refused with a clear message |")
    print("|---|---|---|---|---|")
    for (suite, target), d in sorted(table.items()):
        n = len(d["ok"]) + len(d["refused"])
        print(f"| {suite} | {target} | {n} | {', '.join(sorted(d['ok'])) or '-'} | "
              f"{', '.join(sorted(d['refused'])) or '-'} |")
    print()
    print(f"total attack cases recorded: {len(data)}")
    print()
    print("Sample messages:")
    seen = set()
    for key, outcome in sorted(data.items()):
        case = key.split("|")[2]
        if outcome != "ok" and case not in seen:
            seen.add(case)
            print(f"- `{case}`: {outcome[len('refused: '):]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rob_report.json")
