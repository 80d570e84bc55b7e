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
