"""``RestoreWidget``: SEM restoration in napari.

Train from a pair of layers (low, high), from high-quality layer(s) plus a
degradation model ("Preview degradation" shows a synthetic low-quality image
next to the real one; "Estimate from low" fills the settings from the low
layer), or from low-quality layer(s) only (self-supervised). Apply to any image
layer or stack: the output goes to the "restored" layer, and the "fabrication
risk" toggle adds/hides a risk-map layer. Models can be saved and loaded.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

from ... import restore as R
from ...core.errors import InputError, LeaksegError
from ..layers import read_image, write_layer
from ..workers import notify_error, notify_info
from .base import JobWidget

OUT_RESTORED = "restored"
OUT_RISK = "fabrication risk"
OUT_PREVIEW = "synthetic low quality"

MODE_LABELS = {
    "paired (low + high)": "paired",
    "high + degradation model": "degrade",
    "low only (self-supervised)": "self-supervised",
    "two scans of each field (Noise2Noise)": "noise2noise",
}

SS_LABELS = {
    "scan lines, SSIM + flips": "lines-ssim",
    "scan lines (even → odd)": "lines",
    "Neighbor2Neighbor": "nb2nb",
    "structN2V blind spot": "n2v",
}

OUTPUT_LABELS = {
    "input dtype and range": "input",
    "input scale, float": "float",
    "normalised (0-1)": "normalized",
}


class RestoreWidget(JobWidget):
    model_file_name = "restore.pt"
    title = "SEM restoration"
    capability = "restore"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.model: Optional[R.RestoreModel] = None
        self.mode = self.add(ComboBox(choices=list(MODE_LABELS), value="paired (low + high)", label="train from"))
        self.low = self.add_layer_picker("low", "low quality", "image", optional=True,
                                         tooltip="noisy image (or stack of images)")
        self.high = self.add_layer_picker("high", "high quality", "image", optional=True,
                                          tooltip="clean image(s): same fields as 'low' for paired training")
        self.low2 = self.add_layer_picker("low2", "second scan", "image", optional=True,
                                          tooltip="Noise2Noise: a second fast scan of the 'low' field(s)")
        self.ss_method = self.add(ComboBox(choices=list(SS_LABELS), value="scan lines, SSIM + flips",
                                           label="self-supervised",
                                           tooltip="method for noise correlated along the scan lines"))
        self.noise = self.add(FloatSpinBox(value=0.08, min=0, max=1, step=0.01, label="noise (Gaussian sd)"))
        self.poisson = self.add(FloatSpinBox(value=0.01, min=0, max=1, step=0.005, label="Poisson gain"))
        self.blur = self.add(FloatSpinBox(value=0.8, min=0, max=10, step=0.1, label="blur PSF sigma"))
        self.jitter = self.add(FloatSpinBox(value=0.0, min=0, max=10, step=0.1, label="scan-line jitter"))
        self.scan_corr = self.add(FloatSpinBox(value=0.0, min=0, max=5, step=0.1, label="scan noise corr."))
        self.downsample = self.add(SpinBox(value=1, min=1, max=8, label="downsample"))
        self.loss = self.add(ComboBox(choices=list(R.LOSSES), value="ssim", label="loss",
                                      tooltip="ssim = SSIM + L1 mix (sharp, fabricates least), mse, l1"))
        self.steps = self.add(SpinBox(value=300, min=1, max=100000, label="steps"))
        self.crop = self.add(SpinBox(value=128, min=32, max=512, step=32, label="crop size"))
        self.bar = self.add(CheckBox(value=True, text="crop instrument data bar (auto)"))
        self.target = self.add_layer_picker("target", "apply to", "image", tooltip="image or stack to restore")
        self.scope = self.add(ComboBox(choices=["current slice", "whole stack"], value="current slice",
                                       label="apply"))
        self.output = self.add(ComboBox(choices=list(OUTPUT_LABELS), value="input dtype and range",
                                        label="output", tooltip="intensity scale of the restored layer"))
        self.risk = self.add(CheckBox(value=False, text="fabrication-risk map"))
        self.risk.changed.connect(self._risk_toggled)
        self.estimate_button = self.add_button("Estimate from low", self.estimate, runs_job=False,
                                               tooltip="fill the degradation settings from the low layer")
        self.preview_button = self.add_button("Preview degradation", self.preview_degradation, runs_job=False,
                                              tooltip="show a synthetic low-quality version of the high layer")
        self.train_button = self.add_button("Train", self.train, "train a restoration model")
        self.apply_button = self.add_button("Restore", self.apply, "restore the 'apply to' layer")
        self.save_button = self.add_button("Save model", self._save_clicked, runs_job=False)
        self.load_button = self.add_button("Load model", self._load_clicked, runs_job=False)
        self.finish_layout()

    # ------------------------------------------------------------------ helpers
    def output_layer_names(self) -> list[str]:
        return [OUT_RESTORED, OUT_RISK]

    def export_provenance(self) -> dict:
        meta = self.model.metadata if self.model is not None else {}
        return {"capability": "restore", "arch": meta.get("arch"), "train": meta.get("train")}

    def degradation(self) -> R.Degradation:
        return R.Degradation(poisson=float(self.poisson.value), gaussian=float(self.noise.value),
                             blur=float(self.blur.value), jitter=float(self.jitter.value),
                             downsample=int(self.downsample.value), scan_corr=float(self.scan_corr.value))

    def _images(self, picker, what: str) -> list:
        """All 2D images of a layer (a stack gives one per slice), raw values."""
        layer = picker.value
        if layer is None:
            raise InputError(f"pick a {what} image layer" if "scan" in what else f"pick a {what}-quality image layer")
        ls = read_image(layer, self.viewer, current_slice=False, normalize=False)
        data = np.asarray(ls.data)
        nd = data.ndim - (1 if ls.rgb else 0)
        if nd == 2:
            return [data]
        if nd == 3:
            return [data[i] for i in range(data.shape[0])]
        raise InputError(f"layer {layer.name!r} has {nd} spatial/stack dims; use a 2D image or a stack")

    def _current(self, picker, what: str):
        layer = picker.value
        if layer is None:
            raise InputError(f"pick a {what}-quality image layer")
        return np.asarray(read_image(layer, self.viewer, current_slice=True, normalize=False).data)

    # ------------------------------------------------------------------ degradation
    def estimate(self) -> Optional[R.Degradation]:
        def run():
            low = R.crop_data_bar(R.as_gray(self._current(self.low, "low")), "auto" if self.bar.value else None)[0]
            high = None
            if self.high.value is not None:
                high = R.crop_data_bar(R.as_gray(self._current(self.high, "high")),
                                       "auto" if self.bar.value else None)[0]
            d = R.estimate_degradation(low, high)
            self.noise.value = round(d.gaussian, 3)
            self.poisson.value = round(d.poisson, 4)
            self.blur.value = round(d.blur, 1)
            self.scan_corr.value = round(d.scan_corr, 1)
            self.status.value = (f"estimated noise {d.gaussian:.3f}, Poisson {d.poisson:.4f}, blur {d.blur:.1f}, "
                                 f"scan corr. {d.scan_corr:.2f}")
            return d

        return self.call_guarded(run)

    def preview_degradation(self):
        def run():
            high = self._current(self.high, "high")
            g = R.as_gray(high)
            from ...core.normalize import normalize

            syn = R.degrade(normalize(g), self.degradation(), seed=0)
            layer = write_layer(self.viewer, OUT_PREVIEW, syn, "image", source=self.high.value)
            lo, hi = np.percentile(syn, [0.5, 99.5])
            layer.contrast_limits = (float(lo), float(max(hi, lo + 1e-6)))
            self.status.value = "preview: synthetic low-quality image (compare with the real low image)"
            return layer

        return self.call_guarded(run)

    # ------------------------------------------------------------------ train
    def train(self):
        mode = MODE_LABELS[self.mode.value]
        try:
            low = self._images(self.low, "low") if mode != "degrade" else None
            high = self._images(self.high, "high") if mode in ("paired", "degrade") else None
            low2 = self._images(self.low2, "second-scan") if mode == "noise2noise" else None
            deg = self.degradation() if mode == "degrade" else None
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return False
        kw = dict(low=low, high=high, low2=low2, mode=mode, loss=str(self.loss.value), degradation=deg,
                  ss_method=SS_LABELS[self.ss_method.value],
                  steps=int(self.steps.value), crop=int(self.crop.value),
                  bar="auto" if self.bar.value else None, device=self.device, val_every=10)

        def on_event(ev):
            self.status.value = ev.message

        def on_result(value, cancelled):
            if value is None:
                return
            self.model = value
            tr = value.metadata["train"]
            vs = tr.get("val_ssim")
            self.status.value = (f"{'stopped' if cancelled else 'trained'} ({tr['mode']}, {tr['steps_done']} "
                                 f"steps)" + (f", validation SSIM {vs:.3f}" if vs is not None else ""))

        return self.start_job(lambda: R.train_restore(**kw), description="Training restoration model",
                              on_event=on_event, on_result=on_result)

    # ------------------------------------------------------------------ apply
    def apply(self):
        if self.model is None:
            notify_error(f"{self.title}: train or load a model first")
            return False
        layer = self.target.value
        if layer is None:
            notify_error(f"{self.title}: pick an image layer to restore")
            return False
        stack = self.scope.value == "whole stack" and layer.ndim - (1 if layer.rgb else 0) > 2
        try:
            src = read_image(layer, self.viewer, current_slice=not stack, normalize=False)
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return False
        data = np.asarray(src.data)
        full_shape = tuple(layer.data.shape[:-1] if layer.rgb else layer.data.shape)
        index = src.index
        model, want_risk = self.model, bool(self.risk.value)
        output = OUTPUT_LABELS[self.output.value]

        def on_event(ev):
            self.status.value = ev.message

        def on_result(res, cancelled):
            if res is None:
                return
            kw = dict(source=layer)
            if index:
                kw.update(index=index, full_shape=full_shape)
            write_layer(self.viewer, OUT_RESTORED, res["restored"], "image", colormap="gray", **kw)
            if res["risk"] is not None:
                rl = write_layer(self.viewer, OUT_RISK, res["risk"], "image", colormap="magma",
                                 blending="additive", opacity=0.6, contrast_limits=(0, 8), **kw)
                rl.contrast_limits = (0, 8)
                rl.visible = True
            self.status.value = (f"restored {res['done']} slice(s)" + (" (stopped)" if cancelled else "")
                                 + ("; risk > 4 marks structure the input does not support" if want_risk else ""))

        return self.start_job(lambda: R.iter_apply(model, data, risk_map=want_risk, device=self.device,
                                                  output=output),
                              description="Restoring", on_event=on_event, on_result=on_result)

    def _risk_toggled(self, value):
        if OUT_RISK in self.viewer.layers:
            self.viewer.layers[OUT_RISK].visible = bool(value)
        elif value and OUT_RESTORED in self.viewer.layers:
            notify_info(f"{self.title}: press Restore to compute the fabrication-risk map")

    # ------------------------------------------------------------------ model store
    def save_model(self, path) -> bool:
        if self.model is None:
            notify_error(f"{self.title}: nothing to save; train or load a model first")
            return False
        return bool(self.call_guarded(lambda: self.model.save(path, overwrite=True)))

    def load_model(self, path) -> bool:
        m = self.call_guarded(lambda: R.RestoreModel.load(path, device="cpu"))
        if m is None:
            return False
        self.model = m
        self.status.value = f"loaded {path} ({m.metadata.get('train', {}).get('mode', '?')})"
        return True

