"""``leakseg demo``: open napari with every widget docked and the sample data loaded."""

from __future__ import annotations

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


def register(sub) -> None:
    p = sub.add_parser("demo", help="open napari with all widgets docked and sample data loaded")
    p.add_argument("--sample", choices=SAMPLES, default="scribbles",
                   help="which sample to show first (all are loaded)")
    p.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the window (PNG)")
    p.add_argument("--quit", action="store_true", help="close after loading (and the screenshot)")
    p.set_defaults(func=run)


def build_viewer(sample: str = "scribbles", show: bool = True):
    """Create the demo viewer; returns ``(viewer, {title: widget})``. Used by tests too."""
    import importlib

    import napari

    viewer = napari.Viewer(title="napari-leakseg demo", show=show)
    try:
        viewer.window._qt_window.resize(1500, 950)
    except Exception:  # pragma: no cover - headless without a Qt window
        pass
    order = [s for s in SAMPLES if s != sample] + [sample]
    for key in order:
        viewer.open_sample("napari-leakseg", key)
    # show only the chosen sample's layers (each sample adds two layers, added last)
    chosen = {ly.name for ly in list(viewer.layers)[-2:]}
    for ly in viewer.layers:
        ly.visible = ly.name in chosen
    widgets, docks = {}, {}
    for title, mod, cls in WIDGETS:
        try:
            w = getattr(importlib.import_module(mod), cls)(viewer)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        docks[title] = viewer.window.add_dock_widget(w, name=title, area="right", tabify=True)
        widgets[title] = w
    _preset_pickers(viewer, widgets)
    front = PRESETS[sample][0]
    if front in docks:  # bring the chosen sample's widget to the front once the window is shown
        from qtpy.QtCore import QTimer

        docks[front].raise_()
        QTimer.singleShot(0, docks[front].raise_)
    viewer.reset_view()
    return viewer, widgets


def _preset_pickers(viewer, widgets) -> None:
    """Point each widget's layer pickers at its own sample's layers."""
    names = {ly.name: ly for ly in viewer.layers}
    for title, picks in PRESETS.values():
        w = widgets.get(title)
        for attr, layer_name in picks.items():
            picker = getattr(w, attr, None)
            if picker is not None and layer_name in names and names[layer_name] in picker.choices:
                picker.value = names[layer_name]


def run(args) -> int:
    import napari
    from qtpy.QtCore import QTimer

    viewer, _ = build_viewer(args.sample)
    if args.screenshot or args.quit:
        def _finish():
            if args.screenshot:
                viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
                print(f"screenshot saved to {args.screenshot}")
            if args.quit:
                viewer.close()

        QTimer.singleShot(1500, _finish)
    napari.run()
    return 0
