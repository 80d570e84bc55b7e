"""``JobWidget``: the base of every napari-leakseg dock widget.

A subclass only adds its controls and starts its job::

    class MyWidget(JobWidget):
        title = "My capability"

        def __init__(self, napari_viewer):
            super().__init__(napari_viewer)
            self.image = self.add_layer_picker("image", "Image")
            self.run_btn = self.add_button("Run", self._run)
            self.finish_layout()

        def _run(self):
            img = read_image(self.image.value, self.viewer)
            self.start_job(lambda: my_core.iter_job(img.data, device=self.device),
                           description="My job", on_event=..., on_result=...)

What the base provides, so that no widget writes it again:
* a device dropdown (``self.device``) with the devices available here;
* layer pickers that follow the viewer's layer list;
* a Stop button enabled only while a job runs (``JobRunner`` semantics:
  one job at a time, progress bar, error notifications, cancel keeps results);
* an "Export to zarr" button for the widget's output layers
  (``output_layer_names()``), which asks before overwriting;
* ``model_path_dialog`` helpers for Save/Load model buttons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from magicgui.widgets import ComboBox, Container, Label, PushButton
from qtpy.QtWidgets import QFileDialog, QMessageBox, QVBoxLayout, QWidget

from ...core.device import available_devices
from ...core.errors import LeaksegError
from ..workers import JobRunner, notify_error, notify_info


class JobWidget(QWidget):
    """Base dock widget: device choice, Stop, export, one job at a time."""

    title = "napari-leakseg"
    #: capability name used in export provenance
    capability = ""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = JobRunner(self.title)
        self.form = Container(labels=True)
        self.buttons = Container(layout="horizontal", labels=False)
        self.device_combo = ComboBox(choices=available_devices(), value="auto", label="device",
                                     tooltip="auto picks cuda, then mps, then cpu")
        self.stop_button = PushButton(text="Stop", tooltip="stop the running job; the last result is kept")
        self.stop_button.enabled = False
        self.stop_button.changed.connect(self.stop)
        self.export_button = PushButton(text="Export to zarr",
                                        tooltip="save this widget's output layers as OME-Zarr")
        self.export_button.changed.connect(self._export_clicked)
        self.status = Label(value="")
        self._pickers: list[ComboBox] = []
        self._run_buttons: list[PushButton] = []
        self.runner.on_state_changed(self._on_running_changed)
        self.setLayout(QVBoxLayout())
        self.layout().setContentsMargins(4, 4, 4, 4)
        self._finished_layout = False
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._reset_pickers)
        for e in (ev.inserted,):
            e.connect(self._watch_names)

    # ---------------------------------------------------------------- building
    def add(self, widget, to: str = "form"):
        (self.form if to == "form" else self.buttons).append(widget)
        return widget

    def add_layer_picker(self, name: str, label: str, kind: str = "image", optional: bool = False,
                         tooltip: str = "") -> ComboBox:
        """A dropdown of the viewer's layers of ``kind`` ('image' or 'labels') that follows the layer list."""
        from napari.layers import Image, Labels

        cls = {"image": Image, "labels": Labels}[kind]
        viewer = self.viewer

        def _choices(_w=None):
            items = [(ly.name, ly) for ly in viewer.layers if isinstance(ly, cls)]
            return ([("(none)", None)] if optional else []) + items

        w = ComboBox(name=name, label=label, choices=_choices, tooltip=tooltip or None)
        self._pickers.append(w)
        return self.add(w)

    def add_button(self, text: str, callback: Callable[[], Any], tooltip: str = "",
                   runs_job: bool = True) -> PushButton:
        b = PushButton(text=text, tooltip=tooltip or None)
        b.changed.connect(lambda *_: callback())
        if runs_job:
            self._run_buttons.append(b)
        return self.add(b, to="buttons")

    def finish_layout(self) -> None:
        """Add the shared controls and put everything in the dock widget."""
        if self._finished_layout:
            return
        self._finished_layout = True
        self.form.append(self.device_combo)
        self.buttons.append(self.stop_button)
        lay = self.layout()
        lay.addWidget(self.form.native)
        lay.addWidget(self.buttons.native)
        extra = Container(layout="horizontal", labels=False, widgets=[self.export_button])
        lay.addWidget(extra.native)
        lay.addWidget(self.status.native)
        lay.addStretch(1)

    def _reset_pickers(self, *_):
        for w in self._pickers:
            try:
                current = w.value
                w.reset_choices()
                if current is not None and current in w.choices:
                    w.value = current
            except (RuntimeError, ValueError):  # widget deleted or value gone
                pass

    def _watch_names(self, event=None):
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self._reset_pickers)

    # ---------------------------------------------------------------- jobs
    @property
    def device(self) -> str:
        return str(self.device_combo.value)

    def viewer_alive(self) -> bool:
        """False once the viewer window has been closed (results must not be written into it)."""
        try:
            return getattr(self.viewer.window, "_qt_window", None) is not None
        except Exception:  # pragma: no cover - viewer torn down
            return False

    def start_job(self, make_job: Callable[[], Any], *, description: str = "",
                  on_event=None, on_result=None, on_done=None) -> bool:
        """Start a job; its callbacks run only while the viewer is open.

        If the viewer is closed while the job runs, the job is cancelled at its
        next step and its result is dropped (writing layers into a closed viewer
        would fail).
        """
        def guard(fn, always: bool = False):
            if fn is None and not always:
                return None

            def wrapped(*a):
                if not self.viewer_alive():
                    self.runner.cancel()
                    return None
                return fn(*a) if fn is not None else None

            return wrapped

        return self.runner.start(make_job, description=description or self.title,
                                 on_event=guard(on_event, always=True), on_result=guard(on_result),
                                 on_done=on_done)

    def stop(self, *_):
        if self.runner.running:
            self.status.value = "stopping…"
            self.runner.cancel()

    @property
    def running(self) -> bool:
        return self.runner.running

    def _on_running_changed(self, running: bool) -> None:
        try:
            self.stop_button.enabled = running
            for b in self._run_buttons:
                b.enabled = True  # a second click is refused with a message, not silently
            if running:
                self.status.value = "running…"
            elif self.runner.last_error:
                self.status.value = "error (see notification)"
            elif self.runner.last_result is not None and self.runner.last_result.cancelled:
                self.status.value = "stopped"
            else:
                self.status.value = "done"
        except RuntimeError:  # Qt object deleted (viewer closed)
            pass

    def call_guarded(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the GUI thread; a ``LeaksegError`` becomes a notification."""
        try:
            return fn()
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return None

    # ---------------------------------------------------------------- export
    def output_layer_names(self) -> list[str]:
        """Names of this widget's output layers (subclasses override)."""
        return []

    def export_provenance(self) -> dict:
        return {"capability": self.capability}

    def _export_clicked(self, *_):
        names = [n for n in self.output_layer_names() if n in self.viewer.layers]
        if not names:
            notify_info(f"{self.title}: nothing to export yet; run it first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export to OME-Zarr", f"{names[0]}.zarr",
                                              "OME-Zarr (*.zarr)")
        if not path:
            return
        self.export_to(path, names, confirm=True)

    def may_replace(self, path, exists: bool, overwrite: bool, confirm: bool) -> Optional[bool]:
        """Whether an export may write ``path``: the ``overwrite`` flag to use, or None when it
        exists and is refused (with a message, or by the user when ``confirm`` asks)."""
        if not exists or overwrite:
            return overwrite
        if not confirm:
            notify_error(f"{self.title}: {path} exists; not overwritten")
            return None
        if QMessageBox.question(self, "Overwrite?", f"{path} exists. Replace it?") != QMessageBox.Yes:
            return None
        return True

    @staticmethod
    def zarr_path(path) -> Path:
        """The export target: ``path`` with ``.zarr`` appended unless it ends in it."""
        path = Path(path)
        return path if str(path).endswith(".zarr") else path.with_name(path.name + ".zarr")

    def export_to(self, path, names: Optional[list[str]] = None, *, overwrite: bool = False,
                  confirm: bool = False) -> Optional[Path]:
        """Export output layers to ``path``; asks before overwriting when ``confirm``."""
        from .. import export as _export

        path = self.zarr_path(path)
        names = names or [n for n in self.output_layer_names() if n in self.viewer.layers]
        overwrite = self.may_replace(path, path.exists(), overwrite, confirm)
        if overwrite is None:
            return None
        layers = [self.viewer.layers[n] for n in names]
        try:
            out = _export.export_layers(layers, path, overwrite=overwrite,
                                        provenance=self.export_provenance(),
                                        inputs=_export.layer_sources(self.viewer.layers))
        except LeaksegError as e:
            notify_error(f"{self.title}: {e}")
            return None
        notify_info(f"{self.title}: exported {', '.join(names)} to {path}")
        return out

    # ---------------------------------------------------------------- models
    def ask_save_path(self, default: str = "model.pt") -> Optional[str]:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", default, "napari-leakseg model (*.pt)")
        return path or None

    def ask_open_path(self) -> Optional[str]:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "napari-leakseg model (*.pt)")
        return path or None

    #: default file name offered by the Save model dialog
    model_file_name = "model.pt"

    def _save_clicked(self, *_):
        """Save model button (widgets with a model): ask for a path (the dialog confirms
        replacing a file), then the widget's ``save_model(path)``."""
        path = self.ask_save_path(self.model_file_name)
        if path:
            self.save_model(path)

    def _load_clicked(self, *_):
        """Load model button: ask for a file, then the widget's ``load_model(path)``."""
        path = self.ask_open_path()
        if path:
            self.load_model(path)
