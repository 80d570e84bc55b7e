"""PropagateWidget flow under Xvfb: propagate, paint, confirm, resume, status list, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: not w.running, timeout=timeout)


def _setup(make_napari_viewer, n_frames: int, seed: int):
    """A synthetic time-lapse with frame 0 annotated, in a viewer, and a fast CPU PropagateWidget on it."""
    from napari_leakseg._napari.widgets.propagate import PropagateWidget
    from napari_leakseg.samples import timelapse

    torch.set_num_threads(1)
    stack, inst = timelapse(n_frames=n_frames, shape=(48, 48), n_cells=2, seed=seed)
    ann = np.zeros(inst.shape, np.uint8)
    ann[0] = inst[0] > 0
    viewer = make_napari_viewer()
    im = viewer.add_image(stack, name="cells")
    al = viewer.add_labels(ann, name="annotation")
    w = PropagateWidget(viewer)
    w.image.value, w.annotations.value = im, al
    w.init_steps.value, w.steps.value = 40, 1
    w.device_combo.value = "cpu"
    return viewer, w, stack, al


def test_widget_flow(make_napari_viewer, qtbot, tmp_path):
    viewer, w, stack, al = _setup(make_napari_viewer, n_frames=6, seed=0)
    user = al.data.copy()
    viewer.window.add_dock_widget(w)
    assert w.run("forward")
    _wait(qtbot, w)
    out = viewer.layers[w.OUT_LABELS]
    assert out.data.shape == stack.shape and out.data[1:].any()
    assert viewer.layers[w.OUT_CONF].data[3].max() > 0
    assert w.session.status == ["annotated"] + ["pseudo"] * 5
    assert w.status_list.count() == 6 and "pseudo" in w.status_list.item(2).text()
    np.testing.assert_array_equal(al.data, user)  # the user's layer is never modified
    # clicking a status row jumps the viewer to that frame
    w._jump(w.status_list.item(4))
    assert viewer.dims.current_step[0] == 4
    # the user paints frame 2 (no explicit confirm) and confirms frame 4
    painted = np.zeros(stack.shape[1:], np.uint8)
    painted[5:15, 5:15] = 1
    out.data[2] = painted
    assert w.confirm_current() == 4
    assert w.session.status[4] == "confirmed"
    viewer.dims.set_current_step(0, 4)
    assert w.resume()
    _wait(qtbot, w)
    # the painted frame was kept and confirmed, never overwritten
    np.testing.assert_array_equal(out.data[2], painted)
    assert w.session.status[2] == "confirmed" and w.session.status[4] == "confirmed"
    # frame 4 was confirmed as it was (nothing new from it): only the walk from the painted frame 2 ran
    assert w.session.history[-1]["frames"] == [3]
    # export labels + per-frame status through the shared export
    import zarr

    path = w.export_to(tmp_path / "prop.zarr")
    assert path is not None
    prov = zarr.open_group(str(path), mode="r").attrs["napari_leakseg"]
    assert prov["frame_status"][2] == "confirmed"


def test_widget_instance_mode_exports_ctc_tracks(make_napari_viewer, qtbot, tmp_path):
    """Instance mode: linked instances layer, and Export writes the CTC tracks beside the store."""
    viewer, w, stack, _ = _setup(make_napari_viewer, n_frames=4, seed=1)
    assert not w.follow.enabled  # following is an instance-mode setting
    w.instances.value = True
    assert w.follow.enabled
    assert w.run("forward")
    _wait(qtbot, w)
    lab = viewer.layers[w.OUT_INST].data
    assert lab.shape == stack.shape and lab[0].max() >= 1
    assert w.session.follows  # instance mode follows the annotated cells by default
    path = w.export_to(tmp_path / "cells.zarr")
    assert path is not None and path.exists()
    ctc = tmp_path / "cells_ctc"
    masks = sorted(ctc.glob("mask*.tif"))
    assert len(masks) == 4
    tracks = [list(map(int, line.split())) for line in (ctc / "res_track.txt").read_text().splitlines()]
    import tifffile

    assert {t[0] for t in tracks} == {int(i) for m in masks for i in np.unique(tifffile.imread(m)) if i}
    # a second export to the same name is refused (no silent overwrite), the first is kept
    before = (ctc / "res_track.txt").read_text()
    assert w.export_to(tmp_path / "cells.zarr") is None
    assert (ctc / "res_track.txt").read_text() == before
    w.follow.value = False  # the checkbox reaches the session
    assert not w._new_session().follows
