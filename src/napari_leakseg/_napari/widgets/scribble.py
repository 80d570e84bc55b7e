"""``ScribbleWidget``: scribble-guided (or unsupervised) segmentation, trained live.

Pick an image and a scribble Labels layer (one named "scribbles" is created if
there is none), paint a few strokes (1 = first class, 2 = second, ...) and
press Run. The segmentation appears in the Labels layer "segmentation" and
sharpens while the network trains; Stop keeps the current result. After adding
strokes, Run again: with "refine" checked it continues from the current weights
(much faster than starting over). With no strokes it segments unsupervised.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

from ... import scribble as S
from ...core.errors import InputError, LeaksegError
from ..layers import read_image, read_labels, write_layer
from ..workers import notify_error, notify_info
from .base import JobWidget

OUT = "segmentation"
SCRIBBLES = "scribbles"


class ScribbleWidget(JobWidget):
    title = "Scribble segmentation"
    capability = "scribble"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.state: Optional[dict] = None      # last model (for Refine and Save model)
        self._state_key = None                  # (image layer name, scope) the state was trained on
        self.last_result: Optional[S.SegmentResult] = None
        self.last_warm = False                  # whether the last run warm-started
        self.n_previews = 0
        self.image = self.add_layer_picker("image", "image", "image", tooltip="the image (2D, RGB or a stack)")
        self.scribbles = self.add_layer_picker(
            "scribbles", "scribbles", "labels", optional=True,
            tooltip="Labels layer with strokes: 0 = unlabeled, 1..K = classes; (none) = unsupervised")
        self.n_segments = self.add(SpinBox(value=0, min=0, max=255, label="segments",
                                           tooltip="at most this many clusters (0 = as many as found)"))
        self.stop_by = self.add(ComboBox(choices=["iterations", "time budget"], value="iterations",
                                         label="stop after"))
        self.max_iter = self.add(SpinBox(value=150, min=1, max=100000, label="max iterations",
                                         tooltip="training stops earlier when the labels stop changing"))
        self.time_budget = self.add(FloatSpinBox(value=10.0, min=0.5, max=3600.0, step=1.0,
                                                 label="time budget (s)"))
        self.time_budget.visible = False
        self.stop_by.changed.connect(self._stop_by_changed)
        self.stop_early = self.add(CheckBox(value=True, text="stop early when the labels are stable",
                                            tooltip="off: use every iteration or the whole time budget"))
        self.seed = self.add(SpinBox(value=0, min=0, max=2**31 - 1, label="seed"))
        self.classes_only = self.add(CheckBox(value=False, text="classes only (every pixel gets a scribbled class)"))
        self.scope = self.add(ComboBox(choices=["current slice", "whole stack"], value="current slice",
                                       label="stack", tooltip="whole stack: one shared model, ids kept across slices"))
        self.config = self.add(ComboBox(choices=["auto", "filters", "fast", "paper"], value="auto", label="configuration",
                                        tooltip="fast (interactive) or the paper's reference setting (slow)"))
        self.edge_smoothing = self.add(SpinBox(
            value=8, min=0, max=64, label="edge smoothing (px)",
            tooltip="with scribbles: smooth the class map within this many pixels along the image's own edges "
                    "(guided filter); 0 = off. Changing it starts a new model"))
        self.colour = self.add(ComboBox(
            choices=["Lab", "RGB"], value="Lab", label="colour space",
            tooltip="colour images, with scribbles: compute the filters on CIELAB (lightness and two colour axes, "
                    "closer to how colours look) or on the R, G, B channels. Changing it starts a new model"))
        self.refine = self.add(CheckBox(value=True, text="refine: continue from the current model"))
        self.run_button = self.add_button("Run", self.run, "train on the image (and strokes) and segment it")
        self.reset_button = self.add_button("Reset model", self.reset_model, runs_job=False)
        self.save_button = self.add_button("Save model", self._save_clicked, runs_job=False)
        self.finish_layout()
        self.image.changed.connect(lambda *_: self.ensure_scribble_layer())
        self.image.changed.connect(self._colour_visible)
        self.ensure_scribble_layer()
        self._colour_visible()

    # ------------------------------------------------------------------ helpers
    def output_layer_names(self) -> list[str]:
        return [OUT]

    def export_provenance(self) -> dict:
        meta = (self.state or {}).get("metadata", {})
        return {"capability": "scribble", "arch": meta.get("arch"), "train": meta.get("train")}

    def _colour_visible(self, *_):
        img = self.image.value
        self.colour.visible = bool(img is not None and getattr(img, "rgb", False))

    def _stop_by_changed(self, *_):
        tb = self.stop_by.value == "time budget"
        self.time_budget.visible = tb
        self.max_iter.visible = not tb

    def ensure_scribble_layer(self):
        """Create an empty "scribbles" Labels layer matching the image if no Labels layer exists."""
        img = self.image.value
        if img is None or self.scribbles.value is not None:
            return self.scribbles.value
        if any(ly._type_string == "labels" and not ly.metadata.get("napari_leakseg_output")
               for ly in self.viewer.layers):
            return None
        shape = tuple(img.data.shape[:-1] if img.rgb else img.data.shape)
        if getattr(img, "multiscale", False):
            shape = tuple(img.data[0].shape[:-1] if img.rgb else img.data[0].shape)
        layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=SCRIBBLES, scale=img.scale,
                                       translate=img.translate)
        layer.brush_size = max(3, min(shape[-2:]) // 80)
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer
        self.scribbles.value = layer
        return layer

    def reset_model(self):
        self.state = None
        self._state_key = None
        self.status.value = "model reset: the next Run starts from scratch"

    def _inputs(self):
        layer = self.image.value
        if layer is None:
            raise InputError("no image layer selected")
        whole = self.scope.value == "whole stack"
        img = read_image(layer, self.viewer, current_slice=not whole, normalize=False)
        data = np.asarray(img.data)
        scr = None
        if self.scribbles.value is not None:
            sl = self.scribbles.value
            lab = read_labels(sl, self.viewer, current_slice=not whole,
                              index=img.index if (img.index and sl.ndim == layer.ndim - int(img.rgb)) else None)
            scr = lab.data
            want = tuple(data.shape[:-1] if img.rgb else data.shape)
            if scr.shape != want:
                raise InputError(f"scribble layer {sl.name!r} has shape {scr.shape} but the image "
                                 f"{layer.name!r} has shape {want}; they must match")
            if not scr.any():
                scr = None
        full_shape = tuple(layer.data.shape[:-1] if img.rgb else layer.data.shape)
        stack = whole and len(full_shape) > 2
        return layer, img, data, scr, stack, full_shape

    # ------------------------------------------------------------------ run
    def run(self):
        try:
            layer, img, data, scr, stack, full_shape = self._inputs()
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return False
        colour = self.colour.value.lower()
        key = (layer.name, self.scope.value, self.config.value, int(self.edge_smoothing.value), colour)
        warm = self.state if (self.refine.value and self.state is not None and self._state_key == key) else None
        n_seg = int(self.n_segments.value) or None
        kw = dict(n_segments=n_seg, seed=int(self.seed.value), device=self.device, warm_start=warm,
                  classes_only=bool(self.classes_only.value), config=self.config.value,
                  rgb=bool(img.rgb), stack=stack, guide_r=int(self.edge_smoothing.value), colour=colour)
        if not self.stop_early.value:
            kw.update(stop_change=0.0, min_labels_stop=False)
        if self.stop_by.value == "time budget":
            kw.update(time_budget=float(self.time_budget.value), max_iter=100000)
        else:
            kw.update(max_iter=int(self.max_iter.value))
        index = img.index if not stack else ()
        write_kw = dict(index=index, full_shape=full_shape if index else None, source=layer)
        self.n_previews = 0
        self._final_msg = ""

        def job_factory():
            return S.iter_segment(data, scr, **kw)

        def on_event(ev):
            self.status.value = ev.message
            if ev.preview is not None:
                self.n_previews += 1
                write_layer(self.viewer, OUT, ev.preview, "labels", **write_kw)

        def on_result(res, cancelled):
            if res is None:
                return
            self.last_result = res
            self.state = res.state
            self._state_key = key
            self.last_warm = warm is not None
            write_layer(self.viewer, OUT, res.labels, "labels", **write_kw)
            self._final_msg = (f"{'stopped' if cancelled else res.stopped}: {res.n_labels} labels, "
                               f"{res.n_iter} iterations{' (refined)' if warm is not None else ''}, "
                               f"{res.seconds:.1f} s")
            self.status.value = self._final_msg

        return self.start_job(job_factory, description="Scribble segmentation", on_event=on_event,
                              on_result=on_result)

    def _on_running_changed(self, running: bool) -> None:
        super()._on_running_changed(running)
        msg = getattr(self, "_final_msg", "")
        if not running and msg and not self.runner.last_error:
            try:
                self.status.value = msg
            except RuntimeError:  # pragma: no cover - widget deleted
                pass

    # ------------------------------------------------------------------ model
    model_file_name = "scribble_model.pt"

    def _save_clicked(self, *_):
        if self.state is None:
            notify_error(f"{self.title}: run it first; there is no model to save")
            return
        path = self.ask_save_path(self.model_file_name)
        if path:
            self.save_model(path, overwrite=True)

    def save_model(self, path, overwrite: bool = False):
        from ...core import store

        try:
            store.save(self.state["state_dict"], path, self.state["metadata"], overwrite=overwrite)
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return None
        notify_info(f"{self.title}: model saved to {path}")
        return path
