"""Screenshots for docs/tour.md and the README: the demo's four results (run under ``xvfb-run -a``).

    xvfb-run -a .venv/bin/python scripts/screenshot_tour.py

Builds the ``leakseg demo`` viewer (all four samples side by side), runs the demo's
jobs exactly as ``leakseg demo`` does and waits for them; then saves

* ``docs/images/readme_demo.png``: the whole window with the four results;
* ``docs/images/tour_<sample>.png``: for each widget, its dock in front and the
  canvas zoomed to its sample and result.

Prints the demo's job log; exits 1 if a job failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "images"


def pump(app, seconds: float = 0.5) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def close_toasts(viewer) -> None:
    from qtpy.QtWidgets import QWidget

    for w in viewer.window._qt_window.findChildren(QWidget):
        if type(w).__name__ == "NapariQtNotification":
            w.close()


def zoom_to(viewer, y0, x0, h, w, margin: float = 1.06) -> None:
    """Centre the 2D view on a world rectangle and zoom so that it fills the canvas."""
    ch, cw = viewer.canvas.size
    viewer.camera.center = (y0 + h / 2, x0 + w / 2)
    viewer.camera.zoom = min(ch / (h * margin), cw / (w * margin))


def main() -> int:
    from napari_leakseg.cli.demo import use_demo_qt_api

    use_demo_qt_api()
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari import demo as D

    viewer, widgets = D.build_viewer(None)
    app = QApplication.instance()
    pump(app, 1.0)
    run = D.DemoRun(viewer, widgets).start()
    t0 = time.time()
    while not run.done and time.time() - t0 < 1800:
        pump(app, 0.2)
    print("\n".join(run.summary()))
    print(f"demo {'ok' if run.ok else 'FAILED'} in {run.seconds:.0f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    docks = viewer.window._dock_widgets
    first = D.PRESETS["scribbles"][0]
    docks[first].raise_()
    viewer.reset_view()
    close_toasts(viewer)
    pump(app, 1.5)
    viewer.screenshot(str(OUT / "readme_demo.png"), canvas_only=False, flash=False)
    viewer.text_overlay.visible = False
    tiles = D._tiles()
    extent = {"scribbles": (D.TILE, 600), "membranes": (D.TILE, D.TILE),
              "sem": (D.TILE, 2 * D.TILE + D.GAP), "timelapse": (D.TILE, D.TILE)}
    for key in D.SAMPLES:
        title = D.PRESETS[key][0]
        docks[title].raise_()
        zoom_to(viewer, *tiles[key], *extent[key])
        close_toasts(viewer)
        pump(app, 1.0)
        viewer.screenshot(str(OUT / f"tour_{key}.png"), canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {OUT / 'readme_demo.png'} and tour_<sample>.png")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
