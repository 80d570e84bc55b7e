"""Screenshot of the MembraneWidget after training and predicting on the synthetic EM sample.

    xvfb-run -a .venv/bin/python scripts/screenshot_membrane.py [OUT.png]

A 3-slice synthetic EM stack; slice 0 is annotated (1 = membrane, 2 = cell) and
is the reference; slice 2 (shown) is predicted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(out=None):
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.widgets.membrane import MembraneWidget
    from napari_leakseg.samples import membranes

    out = Path(out or ROOT / "docs" / "images" / "membrane_widget.png")
    pairs = [membranes(shape=(256, 256), n_cells=40, seed=s) for s in range(3)]
    stack = np.stack([p[0] for p in pairs])
    labels = np.zeros_like(np.stack([p[1] for p in pairs]))
    labels[0] = pairs[0][1]
    viewer = napari.Viewer(show=True)
    im = viewer.add_image(stack, name="EM (synthetic)")
    lab = viewer.add_labels(labels, name="annotation (slice 0)", opacity=0.4)
    w = MembraneWidget(viewer)
    viewer.window.add_dock_widget(w, name="Membrane segmentation", area="right")
    w.target.value, w.ref_image.value, w.ref_labels.value = im, im, lab
    w.epochs.value, w.steps.value, w.crop.value = 4, 25, 96
    w.device_combo.value = "cpu"
    app = QApplication.instance()

    def wait():
        t0 = time.time()
        while w.running and time.time() - t0 < 600:
            app.processEvents()
            time.sleep(0.05)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)

    w.train()
    wait()
    viewer.dims.set_current_step(0, 2)
    w.scope.value = "whole stack"
    w.predict()
    wait()
    lab.visible = False
    viewer.layers["membrane"].visible = False
    viewer.layers["cells"].opacity = 0.35
    viewer.window._qt_window.resize(1400, 900)
    try:  # hide toast notifications (e.g. napari's PyQt5 deprecation notice)
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for n in viewer.window._qt_window.findChildren(NapariQtNotification):
            n.close()
    except Exception:  # pragma: no cover - private napari API
        pass
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}: {w.status.value}")
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
