"""Layer helpers in a real viewer: current slice from viewer.dims, dtypes, output layers."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_leakseg._napari.layers import OUTPUT_FLAG, read_image, read_labels, write_layer
from napari_leakseg.core.errors import InputError

pytestmark = pytest.mark.gui


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_read_gray_and_rgb(make_napari_viewer, dtype):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    gray = (rng.random((30, 40)) * 200).astype(dtype)
    rgb = (rng.random((30, 40, 3)) * 200).astype(dtype)
    lg = viewer.add_image(gray)
    lr = viewer.add_image(rgb, rgb=True) if dtype != np.float32 else viewer.add_image(rgb / 200, rgb=True)
    g = read_image(lg, viewer)
    c = read_image(lr, viewer)
    assert g.data.dtype == np.float32 and g.data.shape == (30, 40) and not g.rgb
    assert c.data.shape == (30, 40, 3) and c.rgb and c.spatial_shape == (30, 40)
    assert 0.9 < np.percentile(g.data, 99.8) < 1.1


def test_current_slice_follows_dims_and_stays_lazy(make_napari_viewer):
    viewer = make_napari_viewer()
    stack = np.stack([np.full((20, 25), i, np.uint16) for i in range(6)])
    stack[:, 0, 0] = 1000  # so each slice is not constant
    lazy = da.from_array(stack, chunks=(1, 20, 25))
    layer = viewer.add_image(lazy)
    viewer.dims.set_current_step(0, 4)
    s = read_image(layer, viewer, normalize=False)
    assert s.index == (4,) and s.data.shape == (20, 25) and s.data[5, 5] == 4
    whole = read_image(layer, viewer, current_slice=False, lazy=True)
    assert isinstance(whole.data, da.Array)  # not loaded whole
    lab = viewer.add_labels(np.zeros((6, 20, 25), np.uint8))
    assert read_labels(lab, viewer).index == (4,)


def test_read_rejects_nan(make_napari_viewer):
    viewer = make_napari_viewer()
    a = np.ones((10, 10), np.float32)
    a[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        read_image(viewer.add_image(a, name="bad"), viewer)


def test_write_layer_creates_updates_and_never_touches_user_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    user = viewer.add_labels(np.full((10, 10), 3, np.uint8), name="segmentation")
    before = user.data.copy()
    out = write_layer(viewer, "segmentation", np.ones((10, 10), np.uint8), "labels")
    assert out is not user and out.name != "segmentation" and out.metadata[OUTPUT_FLAG]
    np.testing.assert_array_equal(user.data, before)
    again = write_layer(viewer, "segmentation", np.full((10, 10), 2, np.uint8), "labels")
    assert again is out and (again.data == 2).all()  # updated in place, same layer
    # a slice of a stack output
    st = write_layer(viewer, "stack out", np.ones((10, 10), np.uint8), "labels", index=(2,),
                     full_shape=(4, 10, 10))
    assert st.data.shape == (4, 10, 10) and st.data[2].all() and not st.data[1].any()
    write_layer(viewer, "stack out", np.full((10, 10), 5, np.uint8), "labels", index=(0,),
                full_shape=(4, 10, 10))
    assert st.data[0, 0, 0] == 5 and st.data[2, 0, 0] == 1


def test_write_layer_updates_a_precreated_output_in_place(make_napari_viewer):
    """The demo creates its output layers empty and styled; results then only replace their data
    (no layer is added: adding one costs 0.2-0.7 s in the GUI thread)."""
    viewer = make_napari_viewer()
    pre = write_layer(viewer, "probability", np.zeros((3, 8, 8), np.float32), "image",
                      colormap="magma", opacity=0.6, contrast_limits=(0.0, 1.0))
    n = len(viewer.layers)
    # a slice in a new dtype: converted, the other slices kept, the look and contrast limits kept
    pre.data[0] = 0.25
    out = write_layer(viewer, "probability", np.full((8, 8), 0.5, np.float64), "image", index=(1,),
                      full_shape=(3, 8, 8), colormap="gray")
    assert out is pre and len(viewer.layers) == n
    assert out.data.dtype == np.float64 and out.data[1, 0, 0] == 0.5 and out.data[0, 0, 0] == 0.25
    assert out.colormap.name == "magma" and out.opacity == 0.6
    assert tuple(out.contrast_limits) == (0.0, 1.0)
    # passed contrast limits are honoured on update; without them they follow the new data
    out = write_layer(viewer, "probability", np.full((3, 8, 8), 200, np.uint8), "image", contrast_limits=(0, 255))
    assert out is pre and tuple(out.contrast_limits) == (0, 255)
    data = np.zeros((3, 8, 8), np.float32)
    data[:, 0, 0] = 4.0  # (contrast limits come from the slice shown)
    out = write_layer(viewer, "probability", data, "image")
    assert out is pre and tuple(out.contrast_limits) == (0.0, 4.0)
    # a labels slice that fits the existing dtype is written in place
    lab = write_layer(viewer, "cells", np.zeros((3, 8, 8), np.uint32), "labels", opacity=0.35)
    arr = lab.data
    write_layer(viewer, "cells", np.full((8, 8), 7, np.uint8), "labels", index=(2,), full_shape=(3, 8, 8))
    assert lab.data is arr and (lab.data[2] == 7).all() and not lab.data[:2].any()
    assert len(viewer.layers) == n + 1 and lab.opacity == 0.35
