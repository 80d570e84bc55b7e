"""GUI attacks on every widget in a real napari viewer (run under ``xvfb-run -a``).

Run twice, Stop at random points, delete input/output layers and close the
viewer while a job runs, and feed bad layers. Each case asserts that no
exception escapes (pytest-qt fails the test on any exception raised in a Qt
callback), the user's layers are unchanged, errors become notifications that
name the problem (never "<job> failed: <Python error>"), and the widget still
works afterwards.
"""

from __future__ import annotations

import importlib
import random

import numpy as np
import pytest

from conftest import FULL, record

pytestmark = pytest.mark.gui

WIDGETS = {
    "scribble": ("napari_leakseg._napari.widgets.scribble", "ScribbleWidget"),
    "membrane": ("napari_leakseg._napari.widgets.membrane", "MembraneWidget"),
    "restore": ("napari_leakseg._napari.widgets.restore", "RestoreWidget"),
    "propagate": ("napari_leakseg._napari.widgets.propagate", "PropagateWidget"),
}


@pytest.fixture
def notes(monkeypatch):
    """Every notification the plugin shows: list of (level, message)."""
    from napari_leakseg._napari import workers

    shown = []
    for level in ("error", "info", "warning"):
        monkeypatch.setattr(workers, f"show_{level}", lambda msg, _l=level: shown.append((_l, str(msg))))
    return shown


def _widget_class(name):
    mod, cls = WIDGETS[name]
    try:
        return getattr(importlib.import_module(mod), cls)
    except ModuleNotFoundError as e:
        if e.name == mod:
            pytest.skip(f"{cls} ({mod}) does not exist yet")
        raise


# --------------------------------------------------------------------------- per-widget setup
class Harness:
    """A widget with small valid inputs; ``start()`` starts its main job, ``make_long()`` makes it long."""

    def __init__(self, name, viewer):
        self.name = name
        self.viewer = viewer
        self.w = None
        self.user_layers = []
        getattr(self, f"_setup_{name}")()

    # -- scribble: Run writes the "segmentation" output layer (previews while it runs)
    def _setup_scribble(self):
        rng = np.random.default_rng(0)
        img = (rng.random((48, 64)) * 0.4).astype(np.float32)
        img[:, 32:] += 0.5
        scr = np.zeros((48, 64), np.uint8)
        scr[10:14, 5:25] = 1
        scr[30:34, 40:60] = 2
        self.img = self.viewer.add_image(img, name="img")
        self.lab = self.viewer.add_labels(scr, name="scr")
        self.user_layers = [self.img, self.lab]
        w = self.w = _widget_class("scribble")(self.viewer)
        w.image.value = self.img
        w.scribbles.value = self.lab
        w.max_iter.value = 5
        self.start = w.run
        self.outputs = w.output_layer_names()

    def _long_scribble(self):
        self.w.stop_by.value = "time budget"
        self.w.time_budget.value = 60.0
        self.w.stop_early.value = False  # a time budget is an upper bound: the strokes converge in < 1 s

    def _image_scribble(self, layer):
        self.w.image.value = layer
        self.w.scribbles.value = None

    def _labels_scribble(self, layer):
        self.w.scribbles.value = layer

    # -- membrane: Train (a model, no layer); Predict writes three output layers
    def _setup_membrane(self):
        from napari_leakseg import samples

        img, lab = samples.membranes(shape=(64, 64), seed=0)
        self.img = self.viewer.add_image(img, name="mem")
        self.lab = self.viewer.add_labels(lab, name="mem_lab")
        self.user_layers = [self.img, self.lab]
        w = self.w = _widget_class("membrane")(self.viewer)
        w.target.value = self.img
        w.ref_image.value = self.img
        w.ref_labels.value = self.lab
        w.epochs.value = 1
        w.steps.value = 1
        w.crop.value = 32
        self.start = w.train
        self.outputs = w.output_layer_names()

    def _long_membrane(self):
        self.w.epochs.value = 1000
        self.w.steps.value = 1000

    def _image_membrane(self, layer):
        self.w.ref_image.value = layer
        self.w.target.value = layer

    def _labels_membrane(self, layer):
        self.w.ref_labels.value = layer

    # -- restore: Train from high + degradation; Restore writes the "restored" layer
    def _setup_restore(self):
        from napari_leakseg import samples
        from napari_leakseg._napari.widgets.restore import MODE_LABELS

        clean, low, _ = samples.sem_particles(shape=(64, 64), seed=0)
        self.img = self.viewer.add_image(clean, name="high")
        self.low = self.viewer.add_image(low, name="low")
        self.user_layers = [self.img, self.low]
        w = self.w = _widget_class("restore")(self.viewer)
        w.mode.value = next(k for k, v in MODE_LABELS.items() if v == "degrade")
        w.high.value = self.img
        w.low.value = self.low
        w.target.value = self.low
        w.steps.value = 2
        w.crop.value = 32
        self.start = w.train
        self.outputs = w.output_layer_names()

    def _long_restore(self):
        self.w.steps.value = 100000

    def _image_restore(self, layer):
        self.w.high.value = layer
        self.w.target.value = layer

    # -- propagate (when it exists): a stack with frame 0 annotated
    def _setup_propagate(self):
        from napari_leakseg import samples

        stack, lab = samples.timelapse(n_frames=4, shape=(48, 48), seed=0)
        ann = np.zeros_like(lab)
        ann[0] = (lab[0] > 0).astype(lab.dtype) + 1
        self.img = self.viewer.add_image(stack, name="movie")
        self.lab = self.viewer.add_labels(ann, name="ann")
        self.user_layers = [self.img, self.lab]
        w = self.w = _widget_class("propagate")(self.viewer)
        w.image.value = self.img
        w.annotations.value = self.lab
        self._short_propagate()
        self.start = lambda: w.run("both")
        self.outputs = w.output_layer_names()

    def _short_propagate(self):
        self.w.init_steps.value = 10
        self.w.steps.value = 1

    def _long_propagate(self):
        self.w.init_steps.value = 10000
        self.w.steps.value = 200

    def _image_propagate(self, layer):
        self.w.image.value = layer

    def _labels_propagate(self, layer):
        self.w.annotations.value = layer

    def _short_scribble(self):
        self.w.stop_by.value = "iterations"
        self.w.max_iter.value = 5

    def _short_membrane(self):
        self.w.epochs.value = 1
        self.w.steps.value = 1

    def _short_restore(self):
        self.w.steps.value = 2

    def make_short(self):
        getattr(self, f"_short_{self.name}")()

    # -- generic
    def make_long(self):
        getattr(self, f"_long_{self.name}")()

    def set_image(self, layer):
        getattr(self, f"_image_{self.name}")(layer)

    def set_labels(self, layer):
        f = getattr(self, f"_labels_{self.name}", None)
        if f is None:
            pytest.skip(f"the {self.name} widget takes no labels")
        f(layer)

    def snapshot(self):
        return [np.array(ly.data, copy=True) for ly in self.user_layers]

    def assert_user_layers_unchanged(self, snap):
        for ly, before in zip(self.user_layers, snap):
            np.testing.assert_array_equal(np.asarray(ly.data), before, err_msg=f"user layer {ly.name} changed")


def _pick(w, kind, layer):
    from magicgui.widgets import ComboBox

    for p in w._pickers:
        if isinstance(p, ComboBox) and layer in [c for c in p.choices]:
            if (kind == "labels") == (layer._type_string == "labels"):
                p.value = layer
                return


def _wait(qtbot, h, timeout=60_000):
    qtbot.waitUntil(lambda: not h.w.runner.running, timeout=timeout)


def _crashes(notes):
    return [m for lvl, m in notes if lvl == "error" and " failed: " in m]


def _valid_run_works(qtbot, h, notes):
    h.make_short()
    n0 = len(notes)
    assert h.start() is not False
    _wait(qtbot, h)
    errs = [m for lvl, m in notes[n0:] if lvl == "error"]
    assert not errs, errs
    assert h.w.runner.last_result is not None and not h.w.runner.last_result.cancelled


@pytest.fixture(params=list(WIDGETS))
def h(request):
    _widget_class(request.param)  # skip before napari's fixture starts (its teardown needs a call report)
    viewer = request.getfixturevalue("make_napari_viewer")()
    hh = Harness(request.param, viewer)
    viewer.window.add_dock_widget(hh.w, name=request.param)
    return hh


# --------------------------------------------------------------------------- tests
def test_valid_run_then_run_twice(h, qtbot, notes):
    _valid_run_works(qtbot, h, notes)
    h.make_long()
    snap = h.snapshot()
    assert h.start() is not False
    assert h.w.runner.running
    assert h.start() is False  # second click refused with a message
    assert any("already running" in m for _, m in notes)
    qtbot.wait(200)
    h.w.stop()
    _wait(qtbot, h)
    h.assert_user_layers_unchanged(snap)
    assert not _crashes(notes)


@pytest.mark.parametrize("seed", [0, 1, 2] if FULL else [0])
def test_cancel_at_random_points(h, qtbot, notes, seed):
    """Stop after a random delay: user layers intact, outputs whole (never half-written), still usable."""
    _valid_run_works(qtbot, h, notes)  # gives a previous output
    prev = {n: np.array(h.viewer.layers[n].data, copy=True) for n in h.outputs if n in h.viewer.layers}
    snap = h.snapshot()
    h.make_long()
    h.start()
    qtbot.wait(random.Random(seed).randint(30, 1200))
    h.w.stop()
    _wait(qtbot, h)
    h.assert_user_layers_unchanged(snap)
    for n, before in prev.items():
        assert n in h.viewer.layers, f"output {n} disappeared on Stop"
        now = np.asarray(h.viewer.layers[n].data)
        assert now.shape == before.shape and now.dtype == before.dtype, f"output {n} half-written"
    assert not _crashes(notes)
    _valid_run_works(qtbot, h, notes)


def test_delete_input_layers_while_running(h, qtbot, notes):
    h.make_long()
    h.start()
    qtbot.wait(300)
    for ly in list(h.user_layers):
        if ly in h.viewer.layers:
            h.viewer.layers.remove(ly)
    qtbot.wait(300)
    h.w.stop()
    _wait(qtbot, h)
    assert not _crashes(notes), notes
    assert all(ly not in h.viewer.layers for ly in h.user_layers)  # not resurrected


def test_delete_output_layers_while_running(h, qtbot, notes):
    _valid_run_works(qtbot, h, notes)
    h.make_long()
    h.start()
    qtbot.wait(300)
    for n in h.outputs:
        if n in h.viewer.layers:
            h.viewer.layers.remove(n)
    qtbot.wait(300)
    h.w.stop()
    _wait(qtbot, h)
    assert not _crashes(notes), notes
    _valid_run_works(qtbot, h, notes)


def test_close_viewer_while_running(h, qtbot, notes):
    h.make_long()
    h.start()
    qtbot.wait(300)
    runner = h.w.runner
    h.viewer.close()  # no Stop: the widget must notice, cancel the job and drop its result
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    assert not _crashes(notes), notes
    assert runner.last_result is None or runner.last_result.cancelled


# --------------------------------------------------------------------------- bad layers
def _bad_images(shape=(48, 64)):
    """Bad layers with the harness image's spatial shape (so only the property under test differs)."""
    rng = np.random.default_rng(2)
    nan = rng.random(shape).astype(np.float32)
    nan[3, 3] = np.nan
    inf = rng.random(shape).astype(np.float32)
    inf[4, 4] = -np.inf
    return {
        "nan": (nan, {}, True),
        "inf": (inf, {}, True),
        "constant": (np.full(shape, 3.0, np.float32), {}, False),
        "one_by_one": (np.ones((1, 1), np.float32), {}, False),
        "one_by_n": (rng.random((1, 64)).astype(np.float32), {}, False),
        "huge_aspect": (rng.random((2, 3000)).astype(np.float32), {}, False),
        "bool": (rng.random(shape) > 0.5, {}, False),
        "int64": (rng.integers(-2 ** 40, 2 ** 40, shape), {}, False),
        "float64": (rng.random(shape) * 1e6, {}, False),
        "rgba": ((rng.random(shape + (4,)) * 255).astype(np.uint8), {"rgb": True}, False),
        "five_d": (rng.random((2, 2, 2, 16, 16)).astype(np.float32), {}, False),
    }


def _try_bad(h, qtbot, notes, case, must_fail, words, set_fn, kind):
    """Point the widget at one bad layer, press its main button, check, restore, run validly."""
    snap = h.snapshot()
    n0 = len(notes)
    if h.start():
        _wait(qtbot, h)
    errs = [m for lvl, m in notes[n0:] if lvl == "error"]
    assert not _crashes(notes), f"{h.name}/{case}: {errs}"
    if must_fail:
        assert errs, f"{h.name}/{case}: no notification"
        assert any(w in errs[0].lower() for w in words), f"{h.name}/{case}: {errs}"
    record(f"gui-{kind}", h.name, case, f"refused: {errs[0]}" if errs else "ok")
    h.assert_user_layers_unchanged(snap)


def test_bad_image_layers(h, qtbot, notes):
    """Every bad image in turn: a notification naming the problem (or a result), layers intact,
    and after each a valid run succeeds."""
    for case, (data, kw, must_fail) in _bad_images(tuple(h.img.data.shape[-2:])).items():
        bad = h.viewer.add_image(data, name=f"bad_{case}", **kw)
        h.user_layers.append(bad)
        h.set_image(bad)
        _try_bad(h, qtbot, notes, case, must_fail, ("nan", "inf"), h.set_image, "image")
        h.viewer.layers.remove(bad)
        h.user_layers.remove(bad)
        h.set_image(h.img)
        if h.name == "scribble":
            h.set_labels(h.lab)
        _valid_run_works(qtbot, h, notes)


def _bad_labels(shape):
    base = np.zeros(shape, np.int32)
    base[..., 2:6, 2:20] = 1
    base[..., -6:-2, -20:-2] = 2
    neg = base.copy()
    neg[..., 0, 0] = -3
    big = base.astype(np.uint32)
    big[..., -6:-2, -20:-2] = 70_000
    return {
        "shape_mismatch": (base[..., :-5, :-3].copy(), True, ("shape", "match")),
        "negative_ids": (neg, True, ("negative",)),
        "ids_above_65535": (big, False, ("",)),
    }


def test_bad_label_layers(h, qtbot, notes):
    if not hasattr(h, "lab"):
        pytest.skip(f"the {h.name} widget takes no labels")
    shape = tuple(h.lab.data.shape)
    for case, (data, must_fail, word) in _bad_labels(shape).items():
        bad = h.viewer.add_labels(data, name=f"bad_{case}")
        h.user_layers.append(bad)
        h.set_labels(bad)
        _try_bad(h, qtbot, notes, case, must_fail, word, h.set_labels, "labels")
        h.viewer.layers.remove(bad)
        h.user_layers.remove(bad)
        h.set_labels(h.lab)
        _valid_run_works(qtbot, h, notes)


def test_float_labels_are_refused_by_napari_itself(make_napari_viewer):
    """napari does not accept float data in a Labels layer: the case cannot reach our widgets."""
    viewer = make_napari_viewer()
    with pytest.raises(TypeError):
        viewer.add_labels(np.full((8, 8), 1.5, np.float32))
