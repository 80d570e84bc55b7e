"""Helpers shared by every ``leakseg`` subcommand (argument names, I/O, progress)."""

from __future__ import annotations

import argparse
import sys
import time

# torch, numpy and the IO stack are imported inside the helpers that use them, so that
# building the parser (``leakseg --help``, argument errors) stays fast
from ..core.choices import DEVICE_CHOICES
from ..core.jobs import Progress, run_job


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="compute device: auto picks cuda, then mps, then cpu (default: auto)")


def add_out_arg(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--out", required=required,
                   help=help or "output file (.tif, .png, .npy or .zarr); never overwritten unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output")


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; results are reproducible)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


class ProgressPrinter:
    """Prints job progress to stderr at most every ``interval`` seconds."""

    def __init__(self, quiet: bool = False, interval: float = 1.0, stream=None):
        self.quiet = quiet
        self.interval = interval
        self.stream = stream or sys.stderr
        self._last = 0.0

    def __call__(self, ev: Progress):
        if self.quiet:
            return None
        now = time.perf_counter()
        done = ev.total is not None and ev.step >= ev.total
        if now - self._last >= self.interval or done:
            self._last = now
            frac = f"{ev.step}/{ev.total}" if ev.total else f"{ev.step}"
            print(f"  [{frac}] {ev.message}", file=self.stream, flush=True)
        return None


def run_with_progress(gen, quiet: bool = False):
    """Drive a job generator in the CLI, printing progress; returns its value."""
    return run_job(gen, ProgressPrinter(quiet)).value


def read(path, lazy: bool = True):
    from ..core import io

    return io.imread(path, lazy=lazy)


def write(path, data, *, overwrite: bool = False, kind: str = "labels", **zarr_kw):
    """Write an output by extension (refuses existing paths unless overwrite)."""
    from ..core import io

    return io.imwrite(path, data, overwrite=overwrite, kind=kind, **zarr_kw)


def check_model_out(path, overwrite: bool = False, inputs=()):
    """A model file to write: ``.pt``, not existing unless ``overwrite``, in a writable folder,
    and none of ``inputs`` (the files the command reads).

    Checked before any training, so a bad path fails in a second, not after the run."""
    from pathlib import Path

    from ..core import io
    from ..core.errors import InputError

    path = Path(path)
    if path.suffix.lower() != ".pt":
        raise InputError(f"model output {path} must end in .pt")
    return io.check_target(path, overwrite, inputs)


def parse_int_list(s: str | None) -> list[int] | None:
    if s is None or s == "":
        return None
    try:
        return [int(v) for v in s.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def as_numpy(a):
    import numpy as np

    return np.asarray(a)
