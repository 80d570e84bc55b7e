"""RestoreWidget flow on the synthetic SEM sample (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: not w.running, timeout=timeout)


def test_widget_paired_degrade_selfsup_apply_risk_save_load(make_napari_viewer, qtbot, tmp_path):
    from napari_leakseg._napari.widgets.restore import OUT_PREVIEW, OUT_RESTORED, OUT_RISK, RestoreWidget
    from napari_leakseg.samples import sem_particles

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    clean, low, _ = sem_particles((96, 96), seed=2)
    lo = viewer.add_image(low, name="low")
    hi = viewer.add_image(clean, name="high")
    low_before = lo.data.copy()
    w = RestoreWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.low.value, w.high.value, w.target.value = lo, hi, lo
    w.steps.value, w.crop.value = 6, 32
    w.device_combo.value = "cpu"
    # paired
    assert w.train()
    _wait(qtbot, w)
    assert w.model is not None and w.model.metadata["train"]["mode"] == "paired"
    w.risk.value = True
    assert w.apply()
    _wait(qtbot, w)
    assert viewer.layers[OUT_RESTORED].data.shape == low.shape
    assert viewer.layers[OUT_RESTORED].data.dtype == low.dtype  # on the input's scale by default
    assert viewer.layers[OUT_RISK].data.shape == low.shape
    w.risk.value = False
    assert not viewer.layers[OUT_RISK].visible
    np.testing.assert_array_equal(lo.data, low_before)  # user layers untouched
    # degradation: estimate + preview + train
    d = w.estimate()
    assert d is not None and w.noise.value > 0
    w.preview_degradation()
    assert viewer.layers[OUT_PREVIEW].data.shape == clean.shape
    w.mode.value = "high + degradation model"
    assert w.train()
    _wait(qtbot, w)
    assert w.model.metadata["train"]["mode"] == "degrade"
    # self-supervised
    w.mode.value = "low only (self-supervised)"
    assert w.train()
    _wait(qtbot, w)
    assert w.model.metadata["train"]["mode"] == "self-supervised"
    assert w.model.metadata["train"]["ss_method"] == "lines-ssim"  # the default
    assert w.model.metadata["tta"] == "flips"
    # stack apply, normalised output
    st = viewer.add_image(np.stack([low, low[::-1]]), name="stack")
    w.target.value = st
    w.scope.value = "whole stack"
    w.output.value = "normalised (0-1)"
    assert w.apply()
    _wait(qtbot, w)
    assert viewer.layers[OUT_RESTORED].data.shape == (2,) + low.shape
    assert viewer.layers[OUT_RESTORED].data.dtype == np.float32
    # save / load
    p = tmp_path / "r.pt"
    assert w.save_model(p) and p.exists()
    w.model = None
    assert w.load_model(p) and w.model.metadata["train"]["mode"] == "self-supervised"


def test_widget_errors_are_notifications(make_napari_viewer, qtbot):
    from napari_leakseg._napari.widgets.restore import RestoreWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    a = viewer.add_image(rng.random((64, 64)).astype(np.float32), name="a")
    b = viewer.add_image(rng.random((64, 48)).astype(np.float32), name="b")
    w = RestoreWidget(viewer)
    w.device_combo.value = "cpu"
    w.low.value, w.high.value = a, b
    w.steps.value, w.crop.value = 2, 32
    assert w.train()  # starts, then fails with a user message
    _wait(qtbot, w)
    assert w.runner.last_error and "different shapes" in w.runner.last_error
    assert w.model is None
    assert w.apply() is False  # no model yet
