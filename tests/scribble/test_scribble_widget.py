"""ScribbleWidget in a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _image(h=48, w=64):
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.float32)
    img[:, : w // 2] = (0.9, 0.2, 0.2)
    img[:, w // 2:] = (0.2, 0.2, 0.9)
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


def _wait(qtbot, w, timeout=300_000):
    qtbot.waitUntil(lambda: not w.running, timeout=timeout)


def test_widget_preview_stop_refine(make_napari_viewer, qtbot, monkeypatch):
    from napari_leakseg import scribble as S
    from napari_leakseg._napari.widgets.scribble import OUT, ScribbleWidget

    viewer = make_napari_viewer()
    img = _image()
    viewer.add_image(img, name="photo", rgb=True)
    w = ScribbleWidget(viewer)
    # a scribble layer was created, matching the image
    scr_layer = w.scribbles.value
    assert scr_layer is not None and scr_layer.data.shape == img.shape[:2]
    scr_layer.data[24, 4:28] = 1
    scr_layer.data[24, 36:60] = 2
    before = scr_layer.data.copy()
    w.device_combo.value = "cpu"

    # 1) a run with live previews updating the named output layer
    w.max_iter.value = 60
    seen = []
    assert w.run()
    qtbot.waitUntil(lambda: OUT in viewer.layers, timeout=180_000)
    viewer.layers[OUT].events.data.connect(lambda e: seen.append(1))
    _wait(qtbot, w)
    assert w.n_previews >= 1
    out = viewer.layers[OUT].data
    assert out.shape == img.shape[:2]
    assert (out[:, :28] == 1).mean() > 0.8 and (out[:, 36:] == 2).mean() > 0.8
    np.testing.assert_array_equal(scr_layer.data, before)  # user's strokes untouched
    first = w.last_result
    assert not w.last_warm and first.stopped in ("converged", "max_iter")

    # 2) Stop keeps the last result (early stopping off, so only Stop can end it)
    w.stop_early.value = False
    w.reset_model()
    w.max_iter.value = 100000
    w.stop_by.value = "iterations"
    assert w.run()
    qtbot.waitUntil(lambda: w.n_previews >= 1, timeout=180_000)
    w.stop()
    _wait(qtbot, w)
    assert w.last_result.stopped == "cancelled"
    np.testing.assert_array_equal(viewer.layers[OUT].data, w.last_result.labels)
    assert w.status.value.startswith("stopped")

    assert S.CONFIGS["fast"].stop_change > 0  # the shared default is untouched

    # 3) Refine: new strokes, Run continues from the current weights
    w.stop_early.value = True
    w.max_iter.value = 200
    assert w.run()
    _wait(qtbot, w)
    base = w.last_result
    scr_layer.data[5, 4:28] = 1
    w.refine.value = True
    assert w.run()
    _wait(qtbot, w)
    assert w.last_warm
    assert w.last_result.n_iter <= base.n_iter
    assert w.last_result.state["metadata"]["arch"] == base.state["metadata"]["arch"]
    assert base.state["metadata"]["arch"]["guide_r"] == 8 == w.edge_smoothing.value
    assert base.state["metadata"]["arch"]["colour"] == "lab" and not w.colour.native.isHidden()  # RGB

    # 3b) the RGB filter bank instead of Lab: a new model, saved as such
    w.colour.value = "RGB"
    assert w.run()
    _wait(qtbot, w)
    assert not w.last_warm
    assert w.last_result.state["metadata"]["arch"].get("colour", "rgb") == "rgb"  # RGB: no key (old models)
    assert (viewer.layers[OUT].data[:, :28] == 1).mean() > 0.8
    w.colour.value = "Lab"

    # 4) edge smoothing off: a new model (no refine across settings), without the guided filter
    w.edge_smoothing.value = 0
    assert w.run()
    _wait(qtbot, w)
    assert not w.last_warm
    assert "guide_r" not in w.last_result.state["metadata"]["arch"]
    assert (viewer.layers[OUT].data[:, :28] == 1).mean() > 0.8


def test_widget_stack_whole_and_bad_scribbles(make_napari_viewer, qtbot):
    from napari_leakseg._napari.widgets.scribble import OUT, ScribbleWidget

    viewer = make_napari_viewer()
    img = _image(32, 40)[..., 0]
    stack = np.stack([img, img[:, ::-1], img])
    viewer.add_image(stack, name="stack")
    w = ScribbleWidget(viewer)
    w.device_combo.value = "cpu"
    assert w.colour.native.isHidden()  # grey: no colour space to choose
    scr = w.scribbles.value
    assert scr.data.shape == stack.shape
    scr.data[0, 16, 2:16] = 1
    scr.data[0, 16, 24:38] = 2
    w.scope.value = "whole stack"
    w.max_iter.value = 40
    assert w.run()
    _wait(qtbot, w)
    out = viewer.layers[OUT].data
    assert out.shape == stack.shape
    # the mirrored slice keeps the class ids of slice 0
    assert np.bincount(out[1][:, :16].ravel()).argmax() == 2
    assert np.bincount(out[2][:, :16].ravel()).argmax() == 1
    # a scribble layer of the wrong shape is refused with a message, nothing runs
    bad = viewer.add_labels(np.zeros((5, 5), np.uint8), name="bad")
    w.scribbles.value = bad
    assert w.run() is False
