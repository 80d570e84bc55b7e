"""MembraneWidget train/predict on the synthetic EM sample (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_leakseg import membrane as M

pytestmark = pytest.mark.gui


def _sample(seed, shape=(96, 96)):
    from napari_leakseg.samples import membranes

    return membranes(shape=shape, n_cells=12, seed=seed)


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: not w.running, timeout=timeout)


def test_widget_train_predict_save_load(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_leakseg._napari.widgets.membrane import MembraneWidget

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    img0, lab0 = _sample(0)
    img1, _ = _sample(1)
    # a stack: slice 0 annotated, slice 1 not (labels all 0 = unlabeled)
    stack = np.stack([img0, img1])
    labels = np.stack([lab0, np.zeros_like(lab0)])
    im_layer = viewer.add_image(stack, name="em")
    lab_layer = viewer.add_labels(labels, name="annotation")
    user_labels = lab_layer.data.copy()
    w = MembraneWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.target.value = im_layer
    w.ref_image.value = im_layer
    w.ref_labels.value = lab_layer
    w.epochs.value, w.steps.value, w.crop.value = 2, 3, 64
    w.device_combo.value = "cpu"
    assert w.train()
    _wait(qtbot, w)
    assert w.trained is not None and w.trained.metadata["train"]["n_images"] == 1  # slice 1 skipped
    # predict the slice shown (slice 1, not annotated)
    viewer.dims.set_current_step(0, 1)
    assert w.predict()
    _wait(qtbot, w)
    for name in ("membrane probability", "membrane", "cells"):
        assert name in viewer.layers
        assert viewer.layers[name].data.shape == stack.shape
    assert viewer.layers["membrane"].data[1].any() and not viewer.layers["membrane"].data[0].any()
    assert viewer.layers["cells"].data[1].max() >= 1
    np.testing.assert_array_equal(lab_layer.data, user_labels)  # user layers untouched
    # whole stack
    w.scope.value = "whole stack"
    assert w.predict()
    _wait(qtbot, w)
    assert viewer.layers["membrane"].data[0].any()
    # Predict again with the same references: their setup (encoding, scale, head) is reused
    setups = []
    set_refs = M.MembranePredictor.set_references
    monkeypatch.setattr(M.MembranePredictor, "set_references",
                        lambda self, *a, **k: setups.append(1) or set_refs(self, *a, **k))
    first = w._pred
    with_head = viewer.layers["membrane probability"].data.copy()
    assert w.predict()
    _wait(qtbot, w)
    assert w._pred is first and setups == []
    np.testing.assert_array_equal(viewer.layers["membrane probability"].data, with_head)
    # the reference head (on by default) is what the checkbox turns off: the attention alone differs
    w.ref_head.value = False
    assert w.predict()
    _wait(qtbot, w)
    assert w._pred is not first and setups == [1]
    assert np.abs(viewer.layers["membrane probability"].data - with_head).mean() > 1e-3
    w.ref_head.value = True
    # edited reference labels are new references
    old = int(lab_layer.data[0, 0, 0])
    lab_layer.data[0, 0, 0] = 2 if old != 2 else 1
    assert w.predict()
    _wait(qtbot, w)
    assert setups == [1, 1]
    lab_layer.data[0, 0, 0] = old
    # save / load through the model store
    path = tmp_path / "m.pt"
    assert w.save_model(path) and path.exists()
    w.trained = None
    assert w.load_model(path) and w.trained is not None and w.membrane_value.value == 1
    # "Fine-tune on these labels": a timed background job on the annotated slice
    loaded = w.trained
    w.ft_seconds.value = 2
    assert w.finetune_on_labels()
    _wait(qtbot, w)
    assert w.trained is not loaded and w.trained.metadata["train"]["fine_tuned"]
    assert w.trained.metadata["train"]["steps_done"] >= 1 and w.trained.metadata["train"]["n_images"] == 1
    changed = [k for k, v in w.trained.model.state_dict().items()
               if not torch.equal(v, loaded.model.state_dict()[k])]
    assert changed  # the weights moved
    np.testing.assert_array_equal(lab_layer.data, user_labels)
    assert w.predict()
    _wait(qtbot, w)
    assert viewer.layers["membrane"].data[1].any()


def test_widget_bad_reference_is_a_notification(make_napari_viewer, qtbot):
    from napari_leakseg._napari.widgets.membrane import MembraneWidget

    viewer = make_napari_viewer()
    img0, lab0 = _sample(0, (64, 64))
    im = viewer.add_image(img0, name="em")
    lab = viewer.add_labels(np.full_like(lab0, 2), name="cells only")
    w = MembraneWidget(viewer)
    w.target.value, w.ref_image.value, w.ref_labels.value = im, im, lab
    w.device_combo.value = "cpu"
    assert w.train()  # the job starts, and fails with a user message
    _wait(qtbot, w)
    assert w.runner.last_error and "no membrane" in w.runner.last_error
    assert w.trained is None
    # mismatched shapes are refused before any job starts
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    w.ref_labels.value = viewer.layers["small"]
    assert w.train() is False
    assert not w.predict()  # no model yet
    assert w.finetune_on_labels() is False  # nothing to fine-tune yet
