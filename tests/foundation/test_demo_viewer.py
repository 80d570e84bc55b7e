"""The demo viewer (``leakseg demo``): output layers exist before the jobs, and the jobs' results land
in them without adding layers (adding a layer costs 0.2-0.7 s in the GUI thread)."""

from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np
import pytest

pytestmark = pytest.mark.gui

#: the demo's steps with the smallest settings: the same six jobs through the same widgets
TINY = {"scribbles": {"max_iter": 2},
        "membranes": {"epochs": 1, "steps": 1, "crop": 64, "scope": "whole stack"},
        "sem": {"mode": "paired (low + high)", "steps": 2, "crop": 32},
        "timelapse": {"init_steps": 2, "steps": 1}}


def _close(viewer):
    try:
        viewer.close()
    except Exception:  # pragma: no cover
        pass


def test_demo_precreates_output_layers_and_results_land_in_them(qtbot, monkeypatch):
    from napari_leakseg._napari import demo as D
    from napari_leakseg._napari.layers import is_output_layer

    for key, settings in TINY.items():
        monkeypatch.setitem(D.STEP_BY_SAMPLE, key, dataclasses.replace(D.STEP_BY_SAMPLE[key], settings=settings))
    viewer, widgets = D.build_viewer(None, show=False)
    try:
        names = [ly.name for ly in viewer.layers]
        expected = [n for outs in D.OUTPUT_LAYERS.values() for n in outs]
        assert set(expected) <= set(names)
        assert names[-1] == "demo captions"  # captions drawn over the outputs
        before = list(viewer.layers)
        for n in expected:
            ly = viewer.layers[n]
            assert is_output_layer(ly) and not np.asarray(ly.data).any()
        # styled as the demo shows them, beside their inputs
        assert viewer.layers["segmentation"].opacity == 0.5
        assert viewer.layers["membrane"].visible is False
        assert tuple(viewer.layers["membrane probability"].contrast_limits) == (0.0, 1.0)
        assert tuple(viewer.layers["restored"].translate) == D._tiles()["sem_out"]
        assert tuple(viewer.layers["cells"].translate) == tuple(viewer.layers["EM membranes"].translate)
        # the pickers still point at the samples, not at the new outputs
        assert widgets["SEM restoration"].target.value.name == "SEM low quality"

        frozen_before = gc.get_freeze_count()
        run = D.DemoRun(viewer, widgets).start()
        # the viewer's objects are out of the collector's way while the jobs run (no 0.3 s full collections)
        assert gc.get_freeze_count() > frozen_before + 100_000
        qtbot.waitUntil(lambda: run.done, timeout=600_000)
        assert run.ok, run.summary()
        assert gc.get_freeze_count() == frozen_before
        assert list(viewer.layers) == before  # the same layer objects: none added, none replaced
        for n in ("segmentation", "membrane probability", "membrane", "cells", "restored", "propagated labels"):
            assert np.asarray(viewer.layers[n].data).any(), n
        prob = viewer.layers["membrane probability"]
        assert prob.data.shape == viewer.layers["EM membranes"].data.shape and 0 < prob.data.max() <= 1
        assert tuple(prob.contrast_limits) == (0.0, 1.0)
        assert viewer.layers["restored"].data.shape == viewer.layers["SEM low quality"].data.shape
        assert tuple(viewer.layers["restored"].translate) == D._tiles()["sem_out"]
    finally:
        _close(viewer)


def test_demo_without_run_has_no_output_layers(qtbot):
    """``leakseg demo --no-run`` builds the viewer with ``outputs=False``: only the samples."""
    from napari_leakseg._napari import demo as D

    viewer, _ = D.build_viewer(None, show=False, outputs=False)
    try:
        names = {ly.name for ly in viewer.layers}
        assert not names & {n for outs in D.OUTPUT_LAYERS.values() for n in outs}
        assert {n for ns in D.SAMPLE_LAYERS.values() for n in ns} <= names
    finally:
        _close(viewer)


def test_demo_warm_up_renders_the_message_glyphs(qtbot):
    """The overlay's glyphs are rendered while the viewer is built, not during the jobs."""
    from napari_leakseg._napari import demo as D

    viewer, _ = D.build_viewer("sem", show=False)
    try:
        info = viewer.window._qt_viewer.canvas._font_info
        glyphs = info.font_manager.get_font(info.face)._glyphs
        assert set(D.GLYPHS) <= set(glyphs)
        assert D.text_overlay(viewer).visible
    finally:
        _close(viewer)
