"""Screenshot for docs/export.md: a label stack saved through our writer, reopened lazily.

    xvfb-run -a .venv/bin/python scripts/screenshot_export.py

Writes docs/images/export_napari.png.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main():
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_leakseg import samples

    frames, labels = samples.timelapse(n_frames=12, shape=(192, 192))[:2]
    tmp = Path(tempfile.mkdtemp())
    viewer = napari.Viewer(title="napari-leakseg: OME-Zarr export")
    viewer.add_image(np.asarray(frames, np.float32), name="cells", scale=(1, 0.5, 0.5))
    lab = viewer.add_labels(np.asarray(labels).astype(np.uint16), name="tracks", scale=(1, 0.5, 0.5))
    viewer.layers.selection = {lab}
    viewer.layers.save(str(tmp / "tracks.zarr"), selected=True, plugin="napari-leakseg")
    viewer.layers.remove(lab)
    viewer.open(str(tmp / "tracks.zarr"), plugin="napari-leakseg")
    viewer.dims.set_current_step(0, 6)
    for _ in range(20):
        QApplication.processEvents()
    out = ROOT / "docs" / "images" / "export_napari.png"
    viewer.screenshot(str(out), canvas_only=False)
    print("wrote", out, "layers:", [(l.name, type(l.data).__name__) for l in viewer.layers])
    viewer.close()


if __name__ == "__main__":
    main()
