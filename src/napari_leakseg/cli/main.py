"""``leakseg``: command-line entry point.

Subcommands live in their own modules (``napari_leakseg.cli.<name>``), each with
``register(subparsers)`` that adds a parser whose ``func(args) -> int`` runs it.
User errors (:class:`~napari_leakseg.core.errors.LeaksegError`) become one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..core.errors import JobCancelled, LeaksegError

#: subcommand modules, in help order
SUBCOMMANDS = ("segment", "membrane", "restore", "propagate", "apply", "export", "info", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leakseg",
        description="Live-trained segmentation and restoration networks (napari-leakseg).",
    )
    parser.add_argument("--version", action="version", version=f"napari-leakseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"napari_leakseg.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"napari_leakseg.cli.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def _one_line(e: BaseException, limit: int = 600) -> str:
    """The error message on one line (the CLI promises exactly one stderr line per error)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _quiet_pending_tasks() -> None:
    """An interrupted zarr write leaves asyncio tasks in zarr's I/O loop; at interpreter exit asyncio
    logs "Task was destroyed but it is pending!" for each, and a coroutine collected after the loop
    closed reports "Exception ignored in: <coroutine ...> ... Event loop is closed" (seen under load).
    The one-line promise holds: silence both, and nothing else."""
    import inspect
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    default = sys.unraisablehook

    def hook(u):
        if inspect.iscoroutine(u.object) or "Event loop is closed" in str(u.exc_value):
            return
        default(u)

    sys.unraisablehook = hook


def main(argv=None) -> int:
    from ..core.jobs import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (partial stores, temporary files)
        rc = _main(argv)
    if argv is None and rc == 0:
        # the outputs are complete: a Ctrl-C/SIGTERM during interpreter shutdown (torch and dask
        # teardown take a while) must not turn a finished run into "interrupted" with exit 130
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return rc


def _main(argv=None) -> int:
    from ..core.jobs import Terminated

    try:
        parser = build_parser()  # imports torch & co: Ctrl-C here must not print a traceback either
    except KeyboardInterrupt:
        print("leakseg: interrupted; nothing was written", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except LeaksegError as e:
        print(f"leakseg {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except JobCancelled:
        print(f"leakseg {args.command}: cancelled", file=sys.stderr)
        return 130
    except Terminated:
        _quiet_pending_tasks()
        print(f"leakseg {args.command}: terminated (SIGTERM); no output was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        _quiet_pending_tasks()
        print(f"leakseg {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (permissions, read-only, disk full, not a folder)
        what = f"{e.strerror}: {e.filename}" if getattr(e, "strerror", None) and e.filename else str(e)
        print(f"leakseg {args.command}: error: {what.splitlines()[0] if what else type(e).__name__}",
              file=sys.stderr)
        return 2
    except MemoryError:
        print(f"leakseg {args.command}: error: out of memory; use a .zarr input (processed tile by tile)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
