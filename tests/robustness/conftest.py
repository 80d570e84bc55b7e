"""Shared helpers for the robustness suite: CLI driver, file hashing, markers."""

from __future__ import annotations

import hashlib
import io as _io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long repeated-run memory test (short unless LEAKSEG_SOAK=full)")
    config.addinivalue_line("markers", "gui: needs a display (run under xvfb-run)")


#: LEAKSEG_ROBUSTNESS=full runs every seed/combination; CI runs the short selection
FULL = os.environ.get("LEAKSEG_ROBUSTNESS", "").lower() == "full"

#: (suite, target, case) -> outcome ("ok" or "refused: <message>"); written to the JSON file named by
#: LEAKSEG_ROBUSTNESS_REPORT at the end of the session (docs/reliability.md is built from it)
OUTCOMES: dict = {}


def record(suite: str, target: str, case: str, outcome: str) -> None:
    OUTCOMES[f"{suite}|{target}|{case}"] = outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LEAKSEG_ROBUSTNESS_REPORT")
    if path and OUTCOMES:
        import json

        old = {}
        if Path(path).exists():
            try:
                old = json.loads(Path(path).read_text())
            except ValueError:
                old = {}
        old.update(OUTCOMES)
        Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


def soak_iterations(full: int = 200, short: int = 30) -> int:
    return full if os.environ.get("LEAKSEG_SOAK", "").lower() == "full" else short


# --------------------------------------------------------------------------- files
def digest(path) -> str:
    """A hash of a file or of a whole directory tree (names + contents); '-' if missing."""
    p = Path(path)
    if not p.exists():
        return "-"
    h = hashlib.sha256()
    if p.is_file():
        h.update(p.read_bytes())
        return h.hexdigest()
    for f in sorted(p.rglob("*")):
        h.update(str(f.relative_to(p)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def snapshot(folder) -> dict:
    """{relative path: digest} of every file under ``folder`` (to prove nothing changed/appeared)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): digest(f) for f in sorted(folder.rglob("*")) if f.is_file()}


# --------------------------------------------------------------------------- CLI
def cli_commands() -> set[str]:
    from napari_leakseg.cli.main import build_parser

    p = build_parser()
    for a in p._actions:
        if a.dest == "command":
            return set(a.choices)
    return set()


def run_cli(argv, cwd=None) -> tuple[int, str, str]:
    """Run ``leakseg ARGV`` in this process; returns (exit code, stdout, stderr).

    SystemExit (argparse) is turned into its code. Any other exception escapes
    (and fails the test: a traceback is a bug).
    """
    from napari_leakseg.cli.main import main

    out, err = _io.StringIO(), _io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def run_cli_subprocess(argv, cwd=None, env=None, timeout=240) -> tuple[int, str, str]:
    """Run the real ``leakseg`` console script (fresh process: proves no traceback reaches the user)."""
    exe = Path(sys.executable).with_name("leakseg")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "napari_leakseg.cli.main"]
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "ignore"
    e.update(env or {})
    r = subprocess.run(cmd + [str(a) for a in argv], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def assert_clean_failure(rc: int, err: str, *needles: str) -> str:
    """Non-zero exit, exactly one stderr line, no traceback, and the line names the problem."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc != 0, f"expected failure, got rc=0; stderr={err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    low = lines[0].lower()
    for n in needles:
        assert n.lower() in low, f"{n!r} not in error line {lines[0]!r}"
    return lines[0]


@pytest.fixture
def cli():
    return run_cli
