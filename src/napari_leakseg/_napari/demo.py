"""The ``leakseg demo`` viewer: sample data, every widget docked, each run once on its sample.

``build_viewer`` loads the samples and docks the four widgets with their layer
pickers preset. With all four samples it lays them out side by side (world
coordinates: scale/translate of the demo's own sample layers; their data are
untouched) so that one screen shows every result. ``DemoRun`` then runs the
widgets one after another in the background, through their own buttons'
methods (``run``, ``train`` + ``predict``, ``train`` + ``apply``, ``run``) with
small settings, and shows its progress in the canvas and the activity panel.
Jobs run one at a time: on a 2-core laptop parallel jobs would only slow each
other down, and the first result appears sooner.
"""

from __future__ import annotations

import importlib
import string
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

WIDGETS = (
    ("Scribble segmentation", "napari_leakseg._napari.widgets.scribble", "ScribbleWidget"),
    ("Membrane segmentation", "napari_leakseg._napari.widgets.membrane", "MembraneWidget"),
    ("SEM restoration", "napari_leakseg._napari.widgets.restore", "RestoreWidget"),
    ("Label propagation", "napari_leakseg._napari.widgets.propagate", "PropagateWidget"),
)
SAMPLES = ("scribbles", "membranes", "sem", "timelapse")
#: which widget shows which sample, and the layer each of its pickers starts on
PRESETS = {
    "scribbles": ("Scribble segmentation", {"image": "coffee", "scribbles": "scribbles"}),
    "membranes": ("Membrane segmentation", {"target": "EM membranes", "ref_image": "EM membranes",
                                            "ref_labels": "membrane annotations"}),
    "sem": ("SEM restoration", {"low": "SEM low quality", "high": "SEM high quality",
                                "target": "SEM low quality"}),
    "timelapse": ("Label propagation", {"image": "moving cells", "annotations": "cell labels"}),
}
#: the layers each sample adds (in the order napari adds them)
SAMPLE_LAYERS = {
    "scribbles": ("coffee", "scribbles"),
    "membranes": ("EM membranes", "membrane annotations"),
    "sem": ("SEM high quality", "SEM low quality"),
    "timelapse": ("moving cells", "cell labels"),
}


@dataclass
class Step:
    """One sample's demo: widget settings for a short run, then widget actions in order."""

    sample: str
    caption: str  # short: shown above the sample in the canvas
    settings: dict
    actions: tuple  # (method name, args) pairs, each starts one background job
    outputs: tuple  # output layers this step must produce


#: small settings (the widgets' defaults train 3-10x longer): the demo shows results, not the best
#: results; its total compute is kept small for a 2-core laptop (bench_runtime.py measures it;
#: the membrane training is the longest job)
STEPS = (
    Step("scribbles", "1 scribbles",
         {"max_iter": 30}, (("run", ()),), ("segmentation",)),
    Step("membranes", "2 membranes (slice 1)",
         {"epochs": 2, "steps": 10, "crop": 96, "scope": "whole stack"},
         (("train", ()), ("predict", ())), ("membrane probability", "membrane", "cells")),
    Step("sem", "3 SEM: low | restored",
         {"mode": "paired (low + high)", "steps": 40, "crop": 64}, (("train", ()), ("apply", ())),
         ("restored",)),
    Step("timelapse", "4 propagation (frame 19)",
         {"init_steps": 60, "steps": 1}, (("run", ("forward",)),), ("propagated labels",)),
)
#: how the demo shows each result once its job is done: layer -> properties
LOOK = {
    ("scribbles", "run"): {"segmentation": {"opacity": 0.5}},
    ("membranes", "predict"): {"membrane": {"visible": False}, "cells": {"opacity": 0.35}},
    ("timelapse", "run"): {"propagated labels": {"opacity": 0.55}},
}
STEP_BY_SAMPLE = {s.sample: s for s in STEPS}
#: the output layers each sample's widget writes, created empty (and styled as LOOK shows them)
#: before the window is shown: adding a layer costs 0.2-0.7 s in the GUI thread (layer controls,
#: vispy visual, shader compilation on the first draw), updating one only its data.
#: name -> (kind, source layer, dtype (None: the source's), layer properties); the data: zeros
#: of the source's (spatial) shape
OUTPUT_LAYERS = {
    "scribbles": {"segmentation": ("labels", "coffee", "uint8", {"opacity": 0.5})},
    "membranes": {
        "membrane probability": ("image", "EM membranes", "float32",
                                 {"colormap": "magma", "blending": "additive", "opacity": 0.6,
                                  "contrast_limits": (0.0, 1.0)}),
        "membrane": ("labels", "EM membranes", "uint8", {"visible": False}),
        "cells": ("labels", "EM membranes", "uint32", {"opacity": 0.35}),
    },
    # a black tile beside the low-quality input until the restored image arrives
    "sem": {"restored": ("image", "SEM low quality", None, {"colormap": "gray"})},
    "timelapse": {
        "propagated labels": ("labels", "moving cells", "uint8", {"opacity": 0.55}),
        "propagation confidence": ("image", "moving cells", "uint8",
                                   {"colormap": "magma", "opacity": 0.5, "contrast_limits": (0, 255),
                                    "visible": False}),
    },
}

#: canvas layout of the four samples: each tile is TILE world units high
TILE, GAP = 400, 24
#: the shown time point (the last frame of the time-lapse); the 2-slice membrane stack is
#: moved along axis 0 so that its second (unannotated) slice is shown at the same point
SHOW_T = 19


def build_viewer(sample: Optional[str] = None, show: bool = True, outputs: bool = True):
    """Create the demo viewer; returns ``(viewer, {title: widget})``.

    ``sample=None`` loads all four samples side by side; a sample key loads
    only that one and brings its widget to the front. ``outputs``: also create
    the widgets' output layers, empty (``OUTPUT_LAYERS``), and warm up the text
    overlay and the progress bar, so that the demo's jobs only update data in
    the GUI thread (``DemoRun`` needs this for a responsive viewer, not for its
    results; ``leakseg demo --no-run`` does without).
    """
    import napari

    viewer = napari.Viewer(title="napari-leakseg demo", show=show)
    try:
        viewer.window._qt_window.resize(1700, 960)
    except Exception:  # pragma: no cover - headless without a Qt window
        pass
    keys = SAMPLES if sample is None else (sample,)
    for key in keys:
        viewer.open_sample("napari-leakseg", key)
    widgets, docks = {}, {}
    for title, mod, cls in WIDGETS:
        w = getattr(importlib.import_module(mod), cls)(viewer)
        docks[title] = viewer.window.add_dock_widget(w, name=title, area="right", tabify=True)
        widgets[title] = w
    if sample is None:
        lay_out(viewer, captions=False)
    if outputs:
        add_output_layers(viewer, keys, layout=sample is None)
        warm_up(viewer)
    if sample is None:
        add_captions(viewer)  # on top of the outputs
    _preset_pickers(viewer, widgets)
    front = PRESETS[keys[0]][0]
    if front in docks:  # bring the sample's widget to the front once the window is shown
        from qtpy.QtCore import QTimer

        docks[front].raise_()
        QTimer.singleShot(0, docks[front].raise_)
        QTimer.singleShot(0, lambda: _narrow_docks(viewer, list(docks.values())))
    viewer.reset_view()
    return viewer, widgets


def _narrow_docks(viewer, docks, width: int = 430) -> None:
    """Give the canvas the room: the tabified dock widgets get ``width`` pixels."""
    from qtpy.QtCore import Qt

    try:
        viewer.window._qt_window.resizeDocks(docks, [width] * len(docks), Qt.Orientation.Horizontal)
    except Exception:  # pragma: no cover - window closed
        pass


def _preset_pickers(viewer, widgets) -> None:
    """Point each widget's layer pickers at its own sample's layers."""
    names = {ly.name: ly for ly in viewer.layers}
    for title, picks in PRESETS.values():
        w = widgets.get(title)
        for attr, layer_name in picks.items():
            picker = getattr(w, attr, None)
            if picker is not None and layer_name in names and names[layer_name] in picker.choices:
                picker.value = names[layer_name]


def _tiles() -> dict:
    """World origin (y, x) of each sample's tile: two rows, the second holds SEM low | restored."""
    row2 = TILE + GAP
    return {"scribbles": (0.0, 0.0), "membranes": (0.0, 600.0 + GAP),
            "sem": (row2, 0.0), "sem_out": (row2, TILE + GAP), "timelapse": (row2, 2 * (TILE + GAP))}


def lay_out(viewer, captions: bool = True) -> None:
    """Place the four samples side by side (scale/translate only) and show the layers that matter."""
    tiles = _tiles()
    for key, names in SAMPLE_LAYERS.items():
        for name in names:
            if name not in viewer.layers:
                continue
            ly = viewer.layers[name]
            spatial = ly.data.shape[-3:-1] if getattr(ly, "rgb", False) else ly.data.shape[-2:]
            s = TILE / spatial[0]
            lead = ly.ndim - 2
            # stacks: axis 0 is time/z; the membrane stack's last slice sits at SHOW_T
            t0 = (float(SHOW_T - ly.data.shape[0] + 1),) if key == "membranes" and lead else (0.0,) * lead
            ly.scale = (1.0,) * lead + (s, s)
            ly.translate = t0 + tiles[key]
    for name in ("SEM high quality", "membrane annotations", "cell labels"):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    if viewer.dims.ndim >= 3:
        viewer.dims.set_point(0, SHOW_T)
    if captions:
        add_captions(viewer)


def add_output_layers(viewer, keys=SAMPLES, layout: bool = True) -> list:
    """Create the output layers of the samples ``keys`` (``OUTPUT_LAYERS``), empty, beside their inputs.

    They are the widgets' own output layers (``write_layer`` updates them in place), with the
    source's scale/translate (``restored`` goes beside its input when ``layout``). Layers that
    already exist are left alone. Returns the layers created.
    """
    import numpy as np

    from .layers import write_layer

    made = []
    for key in keys:
        for name, (kind, src_name, dtype, props) in OUTPUT_LAYERS.get(key, {}).items():
            if name in viewer.layers or src_name not in viewer.layers:
                continue
            src = viewer.layers[src_name]
            shape = src.data.shape[:-1] if getattr(src, "rgb", False) else src.data.shape
            layer = write_layer(viewer, name, np.zeros(shape, dtype or src.data.dtype), kind, source=src, **props)
            if layout and name == "restored":
                layer.translate = _tiles()["sem_out"]
            made.append(layer)
    return made


#: modules the demo's jobs import on first use (besides what a torch optimizer step imports)
JOB_IMPORTS = ("napari_leakseg.core.filters", "napari_leakseg.propagate", "scipy.fft", "scipy.sparse",
               "scipy.spatial", "skimage.morphology", "skimage.segmentation", "skimage.registration",
               "pytorch_msssim")


def preimport() -> None:
    """Import now what the demo's jobs would import in their thread on first use.

    The first ``optimizer.step()`` imports torch._dynamo, sympy & co. (~900 modules, 2-3 s of
    Python); in a job thread that competes for the GIL with the GUI thread and stalls it.
    """
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    for opt in (torch.optim.Adam([p], lr=0.0), torch.optim.SGD([p], lr=0.0, momentum=0.9)):
        opt.step()
    for mod in JOB_IMPORTS:
        try:
            importlib.import_module(mod)
        except ImportError:  # pragma: no cover - optional
            pass


def text_overlay(viewer):
    """The viewer's canvas text overlay (``viewer.canvas.overlays.text`` since napari 0.9)."""
    ov = getattr(getattr(getattr(viewer, "canvas", None), "overlays", None), "text", None)
    return ov if ov is not None else viewer.text_overlay


#: the characters of the demo's canvas messages
GLYPHS = string.ascii_letters + string.digits + " .,:;/()-…"


def warm_up(viewer) -> None:
    """Create once what the first job would otherwise create in the GUI thread while the viewer is
    in use: the canvas text overlay (its shader is compiled on the first draw), a progress bar
    in the activity panel, and the modules the jobs import (``preimport``)."""
    from napari.utils import progress

    preimport()

    try:
        ov = text_overlay(viewer)
        ov.position = "top_left"
        ov.font_size = 9
        ov.text = "napari-leakseg demo: starting…"
        ov.visible = True
    except Exception:  # pragma: no cover - napari without a text overlay
        pass
    try:
        progress(total=1, desc="napari-leakseg demo").close()
    except Exception:  # pragma: no cover
        pass
    try:  # the glyphs of the overlay's messages (rendered on first use, in the GUI thread)
        info = viewer.window._qt_viewer.canvas._font_info
        font = info.font_manager.get_font(info.face)
        for ch in GLYPHS:
            font[ch]
    except Exception:  # pragma: no cover - napari internals differ
        pass


def add_captions(viewer):
    """A Points layer with one text caption above each tile."""
    import numpy as np

    tiles = _tiles()
    keys = [s.sample for s in STEPS] + ["sem_out"]
    text = [STEP_BY_SAMPLE[k].caption if k in STEP_BY_SAMPLE else "" for k in keys]
    pts = np.array([[tiles[k][0] + 4, tiles[k][1] + 4] for k in keys], float)
    keep = [i for i, t in enumerate(text) if t]
    return viewer.add_points(
        pts[keep], name="demo captions", size=1, face_color="transparent", border_width=0,
        features={"caption": [text[i] for i in keep]},
        text={"string": "{caption}", "size": 9, "color": "white", "anchor": "upper_left",
              "translation": [2, 6]})


def echo_notifications(stream=None) -> None:
    """Print napari's notifications (warnings, errors, infos) on stderr as well, one line each."""
    from napari.utils.notifications import notification_manager

    def _echo(n):
        msg = " ".join(str(getattr(n, "message", n)).split())
        print(f"napari {getattr(n, 'severity', 'info')}: {msg}", file=stream or sys.stderr, flush=True)

    notification_manager.notification_ready.connect(_echo)


_gc_frozen = [0]  # DemoRuns running with the collector's heap frozen


def freeze_gc() -> None:
    """Move every object alive now out of the cyclic garbage collector's way (``gc.freeze``).

    A full (generation 2) collection walks every object of the process: with napari's viewer that
    is about 650,000 objects; its 0.3 s in the GUI thread made the longest stalls of a demo run (300-750 ms
    turns, bench_runtime.py). Frozen objects are skipped by collections; the objects the jobs create
    are still collected. ``unfreeze_gc`` undoes it when the last run ends.
    """
    import gc

    if _gc_frozen[0] == 0:
        gc.freeze()
    _gc_frozen[0] += 1


def unfreeze_gc() -> None:
    import gc

    if _gc_frozen[0] > 0:
        _gc_frozen[0] -= 1
        if _gc_frozen[0] == 0:
            gc.unfreeze()


@dataclass
class StepLog:
    sample: str
    action: str
    seconds: float = 0.0
    status: str = ""
    ok: bool = False


@dataclass
class DemoRun:
    """Runs each sample's widget once, one job at a time, in the background.

    ``start()`` returns at once; ``done`` turns True after the last job (or when
    the viewer is closed), then ``on_finished(self)`` is called.
    """

    viewer: object
    widgets: dict
    samples: tuple = SAMPLES
    #: whether the viewer has the side-by-side layout (``restored`` then goes beside its input)
    layout: bool = True
    on_finished: Optional[Callable] = None
    log: list = field(default_factory=list)
    done: bool = False
    seconds: float = 0.0

    def start(self) -> "DemoRun":
        from napari.utils import progress

        freeze_gc()
        self._queue = []
        self._saved = []
        for key in self.samples:
            step = STEP_BY_SAMPLE[key]
            w = self.widgets.get(PRESETS[key][0])
            if w is None:
                continue
            self._apply_settings(w, step.settings)
            w.runner.on_state_changed(lambda running, w=w: self._state_changed(w, running))
            self._queue += [(step, w, name, args) for name, args in step.actions]
        self._total = len(self._queue)
        self._current = None
        self._t0 = time.perf_counter()
        self._pbar = progress(total=self._total, desc="napari-leakseg demo")
        self._show(f"demo: running each widget once on its sample (0/{self._total} jobs)")
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._next)
        return self

    def _apply_settings(self, w, settings: dict) -> None:
        for attr, value in settings.items():
            ctl = getattr(w, attr, None)
            if ctl is None:
                continue
            self._saved.append((ctl, ctl.value))
            ctl.value = value

    def _show(self, text: str) -> None:
        try:
            ov = text_overlay(self.viewer)
            ov.visible = True
            ov.position = "top_left"
            ov.text = text
            ov.font_size = 9
        except Exception:  # pragma: no cover - viewer closed
            pass

    def _alive(self) -> bool:
        return getattr(self.viewer.window, "_qt_window", None) is not None

    def _next(self) -> None:
        if self._current is not None:
            return
        while self._queue and self._alive():
            step, w, name, args = self._queue.pop(0)
            entry = StepLog(step.sample, name)
            self.log.append(entry)
            done = self._total - len(self._queue) - 1
            self._show(f"demo job {done + 1}/{self._total}: {w.title}, {name} (progress: activity, bottom right)")
            self._current = (w, entry, time.perf_counter())
            if getattr(w, name)(*args):
                return  # _state_changed continues when the job ends
            self._current = None
            entry.status = str(w.status.value) or "could not start"
            self._tick()
        self._finish()

    def _state_changed(self, w, running: bool) -> None:
        cur = self._current
        if running or cur is None or cur[0] is not w:
            return
        _, entry, t0 = cur
        entry.seconds = time.perf_counter() - t0
        entry.status = str(w.status.value)
        entry.ok = not w.runner.last_error and bool(w.runner.last_result and not w.runner.last_result.cancelled)
        self._current = None
        self._show_result(entry)
        self._tick()
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._next)

    def _show_result(self, entry: StepLog) -> None:
        layers = self.viewer.layers
        for name, props in LOOK.get((entry.sample, entry.action), {}).items():
            if name in layers:
                for k, v in props.items():
                    # only changes: setting ``visible`` even to its value redraws the canvas at once
                    if getattr(layers[name], k) != v:
                        setattr(layers[name], k, v)
        if self.layout and (entry.sample, entry.action) == ("sem", "apply") and "restored" in layers:
            out = layers["restored"]  # beside its input, not over it
            if tuple(out.translate) != tuple(_tiles()["sem_out"]):
                out.translate = _tiles()["sem_out"]

    def cancel(self) -> None:
        """Drop the queued jobs and stop the running one (it keeps its result so far)."""
        self._queue.clear()
        if self._current is not None:
            self._current[0].stop()

    def _tick(self) -> None:
        try:
            self._pbar.update(1)
        except Exception:  # pragma: no cover
            pass

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.seconds = time.perf_counter() - self._t0
        unfreeze_gc()
        for ctl, value in self._saved:  # the widgets keep their normal defaults for the user's runs
            try:
                ctl.value = value
            except Exception:  # pragma: no cover - widget deleted
                pass
        try:
            self._pbar.close()
        except Exception:  # pragma: no cover
            pass
        n_ok = sum(e.ok for e in self.log)
        self._show(f"napari-leakseg demo: {n_ok}/{len(self.log)} jobs done in {self.seconds:.0f} s")
        if self.on_finished is not None:
            self.on_finished(self)

    @property
    def ok(self) -> bool:
        return self.done and bool(self.log) and all(e.ok for e in self.log)

    def summary(self) -> list[str]:
        return [f"{e.sample:>10} {e.action:<8} {'ok ' if e.ok else 'FAILED'} {e.seconds:6.1f} s  {e.status}"
                for e in self.log]
