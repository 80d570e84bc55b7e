"""``MembraneWidget``: reference-assisted membrane segmentation in napari.

Pick the target image, and a reference image with its Labels layer (they may be
the same stack: annotated slices — labels not constant — are the references).
Train (or fine-tune a loaded model), then Predict: outputs go to the layers
"membrane probability" (Image), "membrane" (Labels) and "cells" (Labels).
"Fine-tune on these labels" adapts the trained/loaded model to the reference
labels for a fixed number of seconds (the fast way to a new stack, measured in
docs/benchmarks/membrane_cross.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

from ... import membrane as M
from ...core.errors import InputError
from ...core.io import content_digest
from ..layers import read_image, read_labels, write_layer
from ..workers import notify_error, notify_info
from .base import JobWidget

OUT_PROB = "membrane probability"
OUT_MEMBRANE = "membrane"
OUT_CELLS = "cells"


class MembraneWidget(JobWidget):
    model_file_name = "membrane.pt"
    title = "Membrane segmentation"
    capability = "membrane"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.trained: Optional[M.TrainedMembrane] = None
        self.target = self.add_layer_picker("target", "target image", "image",
                                            tooltip="the 2D image or stack to segment")
        self.ref_image = self.add_layer_picker("ref_image", "reference image", "image",
                                               tooltip="annotated image (or stack); may be the target itself")
        self.ref_labels = self.add_layer_picker(
            "ref_labels", "reference labels", "labels",
            tooltip="labels of the reference image; in a stack, annotated slices (labels not constant) are used")
        self.membrane_value = self.add(SpinBox(value=1, min=0, max=65535, label="membrane value",
                                               tooltip="label value of membrane; if not 0, label 0 = unlabeled"))
        self.use_refs = self.add(CheckBox(value=True, text="reference attention (uncheck: plain baseline)"))
        self.feedback = self.add(CheckBox(value=True, text="feedback refinement"))
        self.finetune = self.add(CheckBox(value=True, text="fine-tune the loaded/trained model"))
        self.epochs = self.add(SpinBox(value=6, min=1, max=1000, label="epochs"))
        self.steps = self.add(SpinBox(value=40, min=1, max=10000, label="steps per epoch"))
        self.crop = self.add(SpinBox(value=128, min=32, max=512, step=32, label="crop size"))
        self.ft_seconds = self.add(SpinBox(value=60, min=1, max=3600, label="fine-tune seconds",
                                           tooltip="time budget of 'Fine-tune on these labels'"))
        self.n_refs = self.add(SpinBox(value=4, min=1, max=64, label="references averaged"))
        self.ref_head = self.add(CheckBox(
            value=True, text="fit a pixel head to the references",
            tooltip="a small per-pixel classifier fitted in about a second to the reference labels (filters + "
                    "the network's probability); uncheck for the attention alone"))
        self.scale = self.add(FloatSpinBox(value=0.0, min=0.0, max=20.0, step=0.1, label="scale (0 = auto)",
                                           tooltip="zoom of the target before the network; 0: from the "
                                                   "references' membrane width (or the model's own)"))
        self.threshold = self.add(FloatSpinBox(value=0.5, min=0.01, max=0.99, step=0.05, label="threshold"))
        self.min_size = self.add(SpinBox(value=30, min=0, max=100000, label="min cell size"))
        self.scope = self.add(ComboBox(choices=["current slice", "whole stack"], value="current slice",
                                       label="predict"))
        self.train_button = self.add_button("Train", self.train, "train (or fine-tune) on the references")
        self.finetune_button = self.add_button(
            "Fine-tune on these labels", self.finetune_on_labels,
            "adapt the trained/loaded model to the reference labels for 'fine-tune seconds'")
        self.predict_button = self.add_button("Predict", self.predict, "segment the target image")
        self.save_button = self.add_button("Save model", self._save_clicked, runs_job=False)
        self.load_button = self.add_button("Load model", self._load_clicked, runs_job=False)
        self.finish_layout()
        self._pred: Optional[M.MembranePredictor] = None  # kept from the last Predict (see _predictor)
        self._pred_key: Optional[tuple] = None

    # ------------------------------------------------------------------ helpers
    def output_layer_names(self) -> list[str]:
        return [OUT_PROB, OUT_MEMBRANE, OUT_CELLS]

    def export_provenance(self) -> dict:
        meta = self.trained.metadata if self.trained is not None else {}
        return {"capability": "membrane", "arch": meta.get("arch"), "train": meta.get("train")}

    def _references(self):
        """Raw reference image(s) and labels (whole stacks; the core skips unannotated slices)."""
        if self.ref_image.value is None or self.ref_labels.value is None:
            raise InputError("fewer than 1 reference: pick a reference image and its labels layer")
        img = read_image(self.ref_image.value, self.viewer, current_slice=False, normalize=False)
        lab = read_labels(self.ref_labels.value, self.viewer, current_slice=False)
        data = np.asarray(img.data)
        if img.rgb:
            data = data[..., :3].mean(-1)
        if data.shape != lab.data.shape:
            raise InputError(f"reference image {img.layer_name!r} has shape {data.shape} but labels "
                             f"{lab.layer_name!r} have shape {lab.data.shape}; they must match")
        tgt = self.target.value
        if tgt is not None and tuple(self.ref_image.value.scale)[-2:] != tuple(tgt.scale)[-2:]:
            notify_info(f"{self.title}: the reference and target layers have different pixel scales "
                        f"({tuple(self.ref_image.value.scale)[-2:]} vs {tuple(tgt.scale)[-2:]}); "
                        "membranes should have a similar width in pixels")
        return data, lab.data

    def _predictor(self, trained, refs, mv: int):
        """The predictor for Predict and the references it still has to set up (None when the one
        kept from the last Predict has exactly these references and settings: encoding them,
        choosing the scale and fitting the reference head take seconds, predicting a slice less
        than one). Returns ``(predictor, references or None, cache key)``."""
        digest = content_digest(*refs) if refs is not None else None
        scale = float(self.scale.value) or None
        key = (digest, mv, scale, int(self.n_refs.value), bool(self.ref_head.value), str(self.device))
        if self._pred is not None and self._pred.trained is trained and self._pred_key == key:
            return self._pred, None, key
        self._pred = M.MembranePredictor(trained, device=self.device, n_refs=key[3], scale=scale,
                                         ref_head=key[4])
        self._pred_key = None  # valid once a Predict with it has finished
        return self._pred, refs, key

    # ------------------------------------------------------------------ train
    def train(self):
        try:
            imgs, labs = self._references()  # read in the GUI thread; the worker only computes
        except InputError as e:
            notify_error(f"{self.title}: {e}")
            return False
        init = self.trained if (self.finetune.value and self.trained is not None) else None
        kw = dict(membrane_value=int(self.membrane_value.value), use_reference=bool(self.use_refs.value),
                  feedback=bool(self.feedback.value), epochs=int(self.epochs.value),
                  steps_per_epoch=int(self.steps.value), crop=int(self.crop.value), device=self.device, init=init)

        return self._start_model_job(
            lambda: M.iter_train_membrane(imgs, labs, **kw), "Training membrane model",
            lambda tr, md, cancelled: (f"{'stopped' if cancelled else 'trained'}: {tr['steps_done']} steps, "
                                       f"loss {tr.get('best_loss') or float('nan'):.3f}"))

    def _start_model_job(self, job_factory, description, summary):
        """Start a job that yields a trained model: it becomes the current model, and the status line
        shows its progress, then ``summary(train metadata, metadata, cancelled)``."""

        def on_event(ev):
            self.status.value = ev.message

        def on_result(value, cancelled):
            if value is None:
                return
            self.trained = value
            self.status.value = summary(value.metadata["train"], value.metadata, cancelled)

        return self.start_job(job_factory, description=description, on_event=on_event, on_result=on_result)

    def finetune_on_labels(self):
        """Fine-tune the current model on the reference labels for a fixed time (a background job)."""
        if self.trained is None:
            notify_error(f"{self.title}: train or load a model first, then fine-tune it on your labels")
            return False
        try:
            imgs, labs = self._references()
        except InputError as e:
            notify_error(f"{self.title}: {e}")
            return False
        start = self.trained
        kw = dict(membrane_value=int(self.membrane_value.value), seconds=float(self.ft_seconds.value),
                  device=self.device)

        return self._start_model_job(
            lambda: M.iter_finetune_membrane(start, imgs, labs, **kw), "Fine-tuning membrane model",
            lambda tr, md, cancelled: (f"fine-tuned{' (stopped)' if cancelled else ''}: {tr['steps_done']} steps "
                                       f"in {tr['seconds']:.0f} s; scale {md.get('input_scale', 1.0):.2f}"))

    # ------------------------------------------------------------------ predict
    def predict(self):
        if self.trained is None:
            notify_error(f"{self.title}: train or load a model first")
            return False
        layer = self.target.value
        if layer is None:
            notify_error(f"{self.title}: no target image layer selected")
            return False
        stack = self.scope.value == "whole stack" and layer.ndim - (1 if layer.rgb else 0) > 2
        trained = self.trained
        refs = None
        try:
            if trained.model.use_reference and self.ref_image.value is not None and self.ref_labels.value is not None:
                refs = self._references()
            tgt = read_image(layer, self.viewer, current_slice=not stack, normalize=False)
        except InputError as e:
            notify_error(f"{self.title}: {e}")
            return False
        data = np.asarray(tgt.data)
        if tgt.rgb:
            data = data[..., :3].mean(-1)
        full_shape = tuple(layer.data.shape[:-1] if layer.rgb else layer.data.shape)
        index = tgt.index
        mv = int(self.membrane_value.value)
        pred, setup, key = self._predictor(trained, refs, mv)

        def make():
            return M.iter_predict_membrane(
                pred, data, *(setup if setup is not None else (None, None)), membrane_value=mv,
                threshold=float(self.threshold.value), min_size=int(self.min_size.value), membrane_background=True)

        def on_event(ev):
            self.status.value = ev.message

        def on_result(res, cancelled):
            if res is None:
                return
            kw = dict(source=layer)
            if index:
                kw.update(index=index, full_shape=full_shape)
            write_layer(self.viewer, OUT_PROB, res["probability"], "image", colormap="magma",
                        blending="additive", opacity=0.6, contrast_limits=(0.0, 1.0), **kw)
            write_layer(self.viewer, OUT_MEMBRANE, res["membrane"], "labels", **kw)
            write_layer(self.viewer, OUT_CELLS, res["cells"], "labels", **kw)
            if res["done"] > 0:  # its references are set: the next Predict with the same ones reuses them
                self._pred_key = key
            self.status.value = f"predicted {res['done']} slice(s)" + (" (stopped)" if cancelled else "")

        return self.start_job(make, description="Predicting membranes", on_event=on_event, on_result=on_result)

    # ------------------------------------------------------------------ model store
    def save_model(self, path) -> bool:
        if self.trained is None:
            notify_error(f"{self.title}: nothing to save; train or load a model first")
            return False
        return bool(self.call_guarded(lambda: self.trained.save(path, overwrite=True)))

    def load_model(self, path) -> bool:
        tm = self.call_guarded(lambda: M.load_model(path))
        if tm is None:
            return False
        self.trained = tm
        self.use_refs.value = bool(tm.model.use_reference)
        self.feedback.value = bool(tm.model.feedback)
        self.membrane_value.value = int(tm.metadata.get("membrane_value", self.membrane_value.value))
        self.status.value = f"loaded {path}"
        return True

