"""Screenshots of the RestoreWidget on the synthetic SEM sample.

    xvfb-run -a .venv/bin/python scripts/screenshot_restore.py [OUTDIR]

1. ``restore_widget.png``: trained paired (low + high layers), restored the low
   image with the fabrication-risk map on; restored and low shown side by side
   (grid mode).
2. ``restore_preview.png``: "Preview degradation" — a synthetic low-quality
   image from the high layer next to the real low-quality one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(outdir=None):
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_leakseg._napari.widgets.restore import OUT_PREVIEW, OUT_RESTORED, OUT_RISK, RestoreWidget
    from napari_leakseg.samples import sem_particles

    outdir = Path(outdir or ROOT / "docs" / "images")
    outdir.mkdir(parents=True, exist_ok=True)
    clean, low, _ = sem_particles((256, 256), seed=0)
    viewer = napari.Viewer(show=True)
    hi = viewer.add_image(clean, name="SEM high quality")
    lo = viewer.add_image(low, name="SEM low quality")
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w, name="SEM restoration", area="right")
    w.low.value, w.high.value, w.target.value = lo, hi, lo
    w.steps.value, w.crop.value = 80, 64
    w.device_combo.value = "cpu"
    app = QApplication.instance()
    viewer.window._qt_window.resize(1800, 900)

    def settle(n=20):
        for _ in range(n):
            app.processEvents()
            time.sleep(0.02)
        try:  # hide notification toasts (e.g. the PyQt5 deprecation notice)
            from napari._qt.dialogs.qt_notification import NapariQtNotification

            for t in viewer.window._qt_window.findChildren(NapariQtNotification):
                t.close()
        except Exception:
            pass
        app.processEvents()

    def wait():
        t0 = time.time()
        while w.running and time.time() - t0 < 900:
            app.processEvents()
            time.sleep(0.05)
        settle()

    # 2. degradation preview
    w.estimate()
    w.preview_degradation()
    viewer.layers.remove(hi)
    viewer.layers[OUT_PREVIEW].translate = (0, clean.shape[1] + 8)  # side by side
    settle()
    viewer.reset_view()
    settle()
    viewer.screenshot(str(outdir / "restore_preview.png"), canvas_only=False)
    viewer.layers.remove(OUT_PREVIEW)
    hi = viewer.add_image(clean, name="SEM high quality")
    w.high.value = hi

    # 1. train paired, restore with risk map
    w.train()
    wait()
    w.risk.value = True
    w.apply()
    wait()
    viewer.layers.remove(hi)
    viewer.layers[OUT_RISK].visible = True
    viewer.layers.move(viewer.layers.index(OUT_RISK), len(viewer.layers) - 1)
    viewer.layers[OUT_RESTORED].translate = (0, clean.shape[1] + 8)  # input | restored | risk
    viewer.layers[OUT_RISK].translate = (0, 2 * (clean.shape[1] + 8))
    viewer.layers[OUT_RISK].blending = "translucent"
    viewer.layers[OUT_RISK].opacity = 1.0
    settle()
    viewer.reset_view()
    settle(40)
    viewer.screenshot(str(outdir / "restore_widget.png"), canvas_only=False)
    print(f"wrote {outdir}/restore_widget.png and restore_preview.png: {w.status.value}")
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
