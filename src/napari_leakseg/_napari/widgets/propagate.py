"""PropagateWidget: propagate labels through a time-lapse, correct, confirm, resume.

Flow: pick the time-lapse and the annotations layer (any frame with labels is
an annotation), press Forward / Backward / Both. The "propagated labels" layer
fills in frame by frame; "propagation confidence" shows the per-frame
confidence. Stop at a wrong frame, fix it with the brush in "propagated
labels", press *Confirm current frame* (or just *Resume from current frame*:
frames you painted since the last run are confirmed automatically and never
overwritten). The status list shows every frame's status; click one to jump there;
*Suggest frame to check* jumps to the frame where a correction helps most. In
instance mode "propagated instances" holds cells whose ids follow them through time.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, FloatSpinBox, SpinBox
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from ...core.errors import InputError
from ..layers import current_index, is_output_layer, read_image, read_labels, write_layer
from ..workers import notify_info
from .base import JobWidget

STATUS_COLORS = {"annotated": "#2a9d8f", "confirmed": "#4caf50", "pseudo": "#e9c46a", "pending": "#888888"}


class PropagateWidget(JobWidget):
    title = "Label propagation"
    capability = "propagate"
    OUT_LABELS = "propagated labels"
    OUT_CONF = "propagation confidence"
    OUT_INST = "propagated instances"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.image = self.add_layer_picker("image", "time-lapse", tooltip="T×Y×X stack")
        self.annotations = self.add_layer_picker(
            "annotations", "annotations", kind="labels",
            tooltip="frames with any label are the annotated frames (0 = background)")
        self.tau = self.add(FloatSpinBox(value=0.9, min=0.5, max=1.0, step=0.01, label="τ (confidence)",
                                         tooltip="pixels with confidence ≥ τ become pseudo-labels"))
        self.steps = self.add(SpinBox(value=6, min=0, max=200, label="steps / frame",
                                      tooltip="fine-tune steps per propagated frame (0 = no pseudo-labels)"))
        self.init_steps = self.add(SpinBox(value=400, min=0, max=10000, step=50, label="initial steps",
                                           tooltip="training steps on the annotated frames"))
        self.instances = self.add(CheckBox(value=False, label="instance mode",
                                           tooltip="split cells and keep their ids through time"))
        self.follow = self.add(CheckBox(
            value=True, label="follow annotated cells only",
            tooltip="instance mode: label only objects linked frame to frame to the annotated cells; a cell "
                    "entering the field stays background until you label it in one frame and resume"))
        self.follow.enabled = bool(self.instances.value)  # only instance mode follows cells
        self.instances.changed.connect(lambda v: setattr(self.follow, "enabled", bool(v)))
        self.forward_button = self.add_button("Forward", lambda: self.run("forward"))
        self.backward_button = self.add_button("Backward", lambda: self.run("backward"))
        self.both_button = self.add_button("Both", lambda: self.run("both"))
        self.resume_button = self.add_button("Resume from current frame", self.resume,
                                             tooltip="confirm edited frames, then recompute from here")
        self.confirm_button = self.add_button("Confirm current frame", self.confirm_current, runs_job=False,
                                              tooltip="this frame is right: never modify it")
        self.suggest_button = self.add_button(
            "Suggest frame to check", self.suggest_next, runs_job=False,
            tooltip="jump to the frame where the network is least sure or disagrees most with the previous frame")
        self.finish_layout()
        self.status_list = QListWidget()
        self.status_list.setMaximumHeight(180)
        self.status_list.itemClicked.connect(self._jump)
        self.layout().insertWidget(self.layout().count() - 1, self.status_list)
        self.session = None
        self._last: Optional[np.ndarray] = None  # the last version written to the output layer
        self._painted_during_run: set[int] = set()
        self._source = None

    # ------------------------------------------------------------- helpers
    def output_layer_names(self) -> list[str]:
        return [self.OUT_LABELS, self.OUT_CONF, self.OUT_INST]

    def export_to(self, path, names=None, *, overwrite: bool = False, confirm: bool = False):
        """The shared OME-Zarr export (labels + per-frame status); in instance mode also the
        tracks in Cell Tracking Challenge format, in ``<name>_ctc/`` beside the store."""
        from ...core.errors import LeaksegError
        from ...propagate import ctc_folder_taken, export_ctc
        from ..workers import notify_error

        path = self.zarr_path(path)
        ctc = path.with_name(path.name[: -len(".zarr")] + "_ctc")
        want_ctc = self.OUT_INST in self.viewer.layers and (names is None or self.OUT_INST in names)
        if want_ctc and self.may_replace(ctc, ctc_folder_taken(ctc), overwrite, confirm) is None:
            return None
        out = super().export_to(path, names, overwrite=overwrite, confirm=confirm)
        if out is None or not want_ctc:
            return out
        try:  # the CTC folder was checked (or its replacement confirmed) above
            export_ctc(np.asarray(self.viewer.layers[self.OUT_INST].data), ctc, overwrite=True)
        except (LeaksegError, OSError) as e:
            notify_error(f"{self.title}: tracks not exported: {e}")
            return out
        notify_info(f"{self.title}: tracks in Cell Tracking Challenge format in {ctc}")
        return out

    def export_provenance(self) -> dict:
        prov = {"capability": self.capability}
        if self.session is not None:
            prov["frame_status"] = self.session.frame_status()
            prov["params"] = self.session.metadata()["train"]
        return prov

    def _out_layer(self):
        if self.OUT_LABELS in self.viewer.layers and is_output_layer(self.viewer.layers[self.OUT_LABELS]):
            return self.viewer.layers[self.OUT_LABELS]
        return None

    def current_frame(self) -> int:
        layer = self.image.value or self._out_layer()
        if layer is None:
            raise InputError("no time-lapse selected")
        idx = current_index(layer, self.viewer)
        return int(idx[0]) if idx else 0

    def _jump(self, item):
        t = int(item.data(256))
        self.viewer.dims.set_current_step(0, t)

    def refresh_status(self):
        self.status_list.clear()
        if self.session is None:
            return
        for t, s in enumerate(self.session.status):
            it = QListWidgetItem(f"{t:4d}  {s}")
            it.setData(256, t)
            it.setForeground(QColor(STATUS_COLORS.get(s, "#888888")))
            self.status_list.addItem(it)

    def _sync_edits(self) -> list[int]:
        """Confirm frames the user painted in the output layer since the last run."""
        layer = self._out_layer()
        if self.session is None or layer is None or self._last is None:
            return []
        if tuple(layer.data.shape) != tuple(self._last.shape):
            return []
        edited = sorted({t for t in range(self._last.shape[0])
                         if not np.array_equal(np.asarray(layer.data[t]), self._last[t])}
                        | self._painted_during_run)
        for t in edited:
            lab = np.array(layer.data[t], copy=True)
            self.session.confirm(t, lab)
            self._last[t] = lab
        self._painted_during_run.clear()
        return edited

    def _new_session(self):
        from ...propagate import Propagator

        img_layer = self.image.value
        if img_layer is None:
            raise InputError("no time-lapse selected")
        img = read_image(img_layer, self.viewer, current_slice=False, normalize=False, lazy=True)
        ann = read_labels(self.annotations.value, self.viewer, current_slice=False)
        instances = bool(self.instances.value)
        sess = Propagator(img.data, ann.data, device=self.device, instances=instances,
                          tau=float(self.tau.value), steps=int(self.steps.value),
                          init_steps=int(self.init_steps.value),
                          follow=bool(self.follow.value) if instances else None)
        self.session = sess
        self._source = (img_layer.name, self.annotations.value.name)
        self._last = np.array(sess.labels, copy=True)
        layer = write_layer(self.viewer, self.OUT_LABELS, self._last.copy(), "labels", source=img_layer)
        write_layer(self.viewer, self.OUT_CONF, np.array(sess.confidence, copy=True), "image",
                    source=img_layer, colormap="magma", opacity=0.5, contrast_limits=(0, 255),
                    visible=False)
        self.viewer.layers.selection.active = layer
        return sess

    def _session_for_run(self):
        src = (getattr(self.image.value, "name", None), getattr(self.annotations.value, "name", None))
        if self.session is None or self._out_layer() is None or src != self._source:
            return self._new_session()
        sess = self.session
        sess.params.tau = float(self.tau.value)
        sess.params.steps = int(self.steps.value)
        edited = self._sync_edits()
        if edited:
            notify_info(f"{self.title}: kept your edits; confirmed frame(s) {edited}")
        return sess

    # ------------------------------------------------------------- events
    def _on_event(self, ev):
        if ev.preview is None:
            return
        t, lab, conf = ev.preview
        layer = self._out_layer()
        if layer is not None and self._last is not None:
            if np.array_equal(np.asarray(layer.data[t]), self._last[t]):
                layer.data[t] = lab
                self._last[t] = lab
                layer.refresh()
            else:  # the user painted this frame while we ran: keep their version
                self._painted_during_run.add(t)
        if self.OUT_CONF in self.viewer.layers:
            cl = self.viewer.layers[self.OUT_CONF]
            cl.data[t] = conf
            cl.refresh()
        if self.session is not None and self.status_list.count() > t:
            s = self.session.status[t]
            it = self.status_list.item(t)
            it.setText(f"{t:4d}  {s}")
            it.setForeground(QColor(STATUS_COLORS.get(s, "#888888")))
        self.status.value = ev.message

    def _on_result(self, sess, cancelled):
        self._sync_edits()
        self.refresh_status()
        if sess is not None and self.instances.value and not cancelled:
            # cells keep the annotation's ids through time (tracked, touching cells kept apart)
            inst = sess.instances()
            write_layer(self.viewer, self.OUT_INST, inst, "labels", source=self.image.value)

    # ------------------------------------------------------------- actions
    def run(self, direction: str = "both") -> bool:
        if self.running:
            return self.start_job(lambda: iter(()))  # refused with a message by the runner
        sess = self.call_guarded(self._session_for_run)
        if sess is None:
            return False
        self.refresh_status()
        return self.start_job(lambda: sess.iter_run(direction), description=f"Propagate {direction}",
                              on_event=self._on_event, on_result=self._on_result)

    def resume(self, direction: str = "both") -> bool:
        if self.session is None:
            return self.run(direction)
        if self.running:
            return self.start_job(lambda: iter(()))
        t = self.call_guarded(self.current_frame)
        if t is None:
            return False
        sess = self.call_guarded(self._session_for_run)
        if sess is None:
            return False
        self.refresh_status()
        return self.start_job(lambda: sess.iter_resume(t, direction), description=f"Resume from frame {t}",
                              on_event=self._on_event, on_result=self._on_result)

    def confirm_current(self) -> Optional[int]:
        if self.session is None or self._out_layer() is None:
            notify_info(f"{self.title}: run a propagation first")
            return None
        if self.running:
            notify_info(f"{self.title}: press Stop before confirming frames")
            return None
        t = self.call_guarded(self.current_frame)
        if t is None:
            return None
        lab = np.array(self._out_layer().data[t], copy=True)
        if self.call_guarded(lambda: self.session.confirm(t, lab)) is None and self.session.status[t] in (
                "annotated", "confirmed"):
            self._last[t] = lab
        self.refresh_status()
        return t

    def suggest_next(self) -> Optional[int]:
        """Jump to the pseudo frame most worth checking (see ``Propagator.suggest``)."""
        if self.session is None:
            notify_info(f"{self.title}: run a propagation first")
            return None
        picks = self.session.suggest(1)
        if not picks:
            notify_info(f"{self.title}: no propagated frame left to check")
            return None
        t = picks[0]
        self.viewer.dims.set_current_step(0, t)
        self.status.value = (f"check frame {t}: {100 * self.session.uncertain[t]:.0f}% unsure, "
                             f"{100 * self.session.disagreement[t]:.0f}% changed from its neighbour")
        return t
