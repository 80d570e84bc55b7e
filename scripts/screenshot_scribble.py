"""Real screenshots of the ScribbleWidget in napari (run under ``xvfb-run -a``).

    xvfb-run -a .venv/bin/python scripts/screenshot_scribble.py

Opens the sample image with its scribbles, docks the widget, runs it, waits
for the worker to finish and saves ``docs/images/scribble_widget.png``; then
adds a stroke, runs Refine and saves ``docs/images/scribble_widget_refine.png``.
"""

from __future__ import annotations

import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "images"


def wait(app, widget, timeout=600):
    t0 = time.time()
    while widget.running and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def close_toasts(viewer):
    from qtpy.QtWidgets import QWidget

    for wdg in viewer.window._qt_window.findChildren(QWidget):
        if type(wdg).__name__ == "NapariQtNotification":
            wdg.close()


def main():
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.widgets.scribble import OUT as OUT_LAYER, ScribbleWidget
    from napari_leakseg.samples import scribble_image

    img, scr = scribble_image()
    viewer = napari.Viewer(title="napari-leakseg: scribble segmentation")
    viewer.window.resize(1400, 850)
    viewer.add_image(img, name="coffee", rgb=True)
    viewer.add_labels(scr, name="scribbles")
    w = ScribbleWidget(viewer)
    viewer.window.add_dock_widget(w, name="Scribble segmentation", area="right")
    w.scribbles.value = viewer.layers["scribbles"]
    w.device_combo.value = "cpu"
    app = QApplication.instance()
    assert w.run()
    wait(app, w)
    viewer.layers[OUT_LAYER].opacity = 0.45
    viewer.layers.move(viewer.layers.index("scribbles"), len(viewer.layers) - 1)
    viewer.layers.selection.active = viewer.layers["scribbles"]
    OUT.mkdir(parents=True, exist_ok=True)
    viewer.reset_view()
    close_toasts(viewer)
    wait(app, w)
    viewer.screenshot(str(OUT / "scribble_widget.png"), canvas_only=False)
    print("first run:", w.status.value)
    # add a third class (the spoon/handle area) and refine from the current weights
    data = viewer.layers["scribbles"].data
    data[150:156, 440:520] = 3
    viewer.layers["scribbles"].refresh()
    assert w.run()
    wait(app, w)
    close_toasts(viewer)
    wait(app, w)
    viewer.screenshot(str(OUT / "scribble_widget_refine.png"), canvas_only=False)
    print("refine:", w.status.value)
    viewer.close()


if __name__ == "__main__":
    main()
