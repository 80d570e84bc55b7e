"""Real screenshots of the PropagateWidget in napari (run under ``xvfb-run -a``).

    xvfb-run -a .venv/bin/python scripts/screenshot_propagate.py

Writes docs/images/propagate_widget.png (after a forward propagation) and
docs/images/propagate_resume.png (after painting a frame, confirming it and resuming).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "images"


def close_toasts(viewer):
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for n in viewer.window._qt_window.findChildren(NapariQtNotification):
            n.close()
    except Exception:  # private API: best effort only
        pass


def wait(app, widget, timeout=900):
    t0 = time.time()
    while widget.running and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def main():
    import warnings

    warnings.filterwarnings("ignore")  # no deprecation toasts in the screenshot
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.widgets.propagate import PropagateWidget
    from napari_leakseg.samples import timelapse

    stack, inst = timelapse(n_frames=30, shape=(160, 160), n_cells=5, seed=0)
    ann = np.zeros(inst.shape, np.uint8)
    ann[0] = inst[0] > 0
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1750, 900)
    im = viewer.add_image(stack, name="cells (time-lapse)")
    al = viewer.add_labels(ann, name="annotation (frame 0)")
    w = PropagateWidget(viewer)
    viewer.window.add_dock_widget(w, name="Label propagation", area="right")
    app = QApplication.instance()
    w.image.value, w.annotations.value = im, al
    w.init_steps.value, w.steps.value = 150, 3
    w.device_combo.value = "cpu"
    w.run("forward")
    wait(app, w)
    al.visible = False
    viewer.dims.set_current_step(0, 22)
    viewer.reset_view()
    OUT.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        app.processEvents()
    close_toasts(viewer)
    viewer.screenshot(str(OUT / "propagate_widget.png"), canvas_only=False)
    # simulate a correction: paint the ground truth into frame 22 and resume from it
    out = viewer.layers[w.OUT_LABELS]
    out.data[22] = (inst[22] > 0).astype(out.data.dtype)
    out.refresh()
    w.confirm_current()
    w.resume()
    wait(app, w)
    viewer.layers[w.OUT_CONF].visible = True
    viewer.dims.set_current_step(0, 26)
    viewer.reset_view()
    w.status_list.scrollToItem(w.status_list.item(22))
    for _ in range(10):
        app.processEvents()
    close_toasts(viewer)
    viewer.screenshot(str(OUT / "propagate_resume.png"), canvas_only=False)
    print("wrote", OUT / "propagate_widget.png", OUT / "propagate_resume.png")
    viewer.close()


if __name__ == "__main__":
    main()
