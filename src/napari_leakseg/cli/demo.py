"""``leakseg demo``: napari with every widget docked, the sample data loaded and each widget run once.

The viewer itself is built by ``napari_leakseg._napari.demo``; this module only
parses arguments and picks the Qt binding (imported lazily: ``leakseg --help``
must not import napari).
"""

from __future__ import annotations

import os
import sys

SAMPLES = ("scribbles", "membranes", "sem", "timelapse")


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="open napari with all widgets docked, the sample data loaded and each widget run once",
        description="Open napari with the four widgets docked and their sample data side by side, and run "
                    "each widget once on its sample in the background (six short jobs, one at a time, "
                    "with progress in the activity panel), so that the "
                    "first screen shows four results. Uses PyQt6 when it is installed and QT_API is not set.")
    p.add_argument("--sample", choices=SAMPLES, default=None,
                   help="open only this sample (its widget in front) and run only its widget")
    p.add_argument("--no-run", action="store_true", help="do not run the widgets; just open the data")
    p.add_argument("--screenshot", metavar="PATH",
                   help="save a screenshot of the window (PNG) once the demo's jobs are done")
    p.add_argument("--quit", action="store_true", help="close after the demo's jobs (and the screenshot)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="with --screenshot/--quit: stop waiting for the jobs after S seconds (default 900)")
    p.set_defaults(func=run)


def qt_api_for_demo(environ=None) -> str | None:
    """The Qt binding the demo uses: ``QT_API`` if set, else PyQt6 when installed, else qtpy's choice (None).

    qtpy prefers PyQt5 when several bindings are installed, and napari shows a
    deprecation notice for PyQt5, so the demo asks for PyQt6 explicitly.
    """
    import importlib.util

    env = os.environ if environ is None else environ
    if env.get("QT_API"):
        return env["QT_API"].lower()
    return "pyqt6" if importlib.util.find_spec("PyQt6") is not None else None


def use_demo_qt_api() -> str | None:
    """Set ``QT_API`` for this process (before qtpy is imported); returns the binding asked for."""
    api = qt_api_for_demo()
    if api and "qtpy" not in sys.modules:
        os.environ["QT_API"] = api
    return api


def run(args) -> int:
    use_demo_qt_api()
    import napari
    from qtpy.QtCore import QTimer

    from .._napari.demo import DemoRun, build_viewer, echo_notifications

    echo_notifications()
    viewer, widgets = build_viewer(args.sample, outputs=not args.no_run)
    state = {"rc": 0, "finished": False}

    def finish(demo=None):
        if state["finished"]:
            return
        state["finished"] = True
        if demo is not None:
            print("\n".join(["demo jobs:"] + demo.summary()
                            + [f"demo: {'all jobs done' if demo.ok else 'NOT all jobs done'} in {demo.seconds:.0f} s"]),
                  flush=True)
            state["rc"] = 0 if demo.ok else 1
        if not (args.screenshot or args.quit):
            return

        def _shoot():
            if args.screenshot:
                viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
                print(f"screenshot saved to {args.screenshot}", flush=True)
            if args.quit:
                viewer.close()

        QTimer.singleShot(1500, _shoot)  # let the last layers draw

    demo = None
    if not args.no_run:
        samples = SAMPLES if args.sample is None else (args.sample,)
        demo = DemoRun(viewer, widgets, samples=samples, layout=args.sample is None, on_finished=finish)
        QTimer.singleShot(500, demo.start)  # once the window is up
    else:
        QTimer.singleShot(0, finish)
    if args.screenshot or args.quit:
        def _timeout():
            if not state["finished"]:
                print(f"demo: jobs not done after {args.timeout:.0f} s; stopping", file=sys.stderr, flush=True)
                if demo is not None:
                    demo.cancel()
                state["rc"] = 1
                finish()

        QTimer.singleShot(int(args.timeout * 1000), _timeout)
    napari.run()
    return state["rc"]
