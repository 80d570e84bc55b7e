"""napari: save Labels/Image layers through our npe2 writer and read them back lazily."""

from __future__ import annotations

import numpy as np
import pytest

from napari_leakseg.core.errors import InputError, OutputExistsError
from napari_leakseg.zarr_io import open_ome_zarr, write_ome_zarr


def _labels():
    lab = np.zeros((3, 64, 80), np.uint16)
    lab[:, 10:30, 10:40] = 1
    lab[1:, 40:60, 20:70] = 300
    return lab


def test_get_reader_only_for_zarr_stores(tmp_path):
    from napari_leakseg._napari.reader import get_reader

    assert get_reader(str(tmp_path / "x.tif")) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    p = write_ome_zarr(tmp_path / "a.zarr", _labels(), scale=(2, 0.5, 0.5))
    reader = get_reader(str(p))
    assert callable(reader)
    (data, meta, kind), = reader(str(p))
    import dask.array as da

    assert kind == "labels" and isinstance(data, da.Array)  # lazy
    assert meta["scale"] == [2.0, 0.5, 0.5]


def test_writer_functions_keep_metadata_and_refuse_existing(tmp_path):
    from napari_leakseg._napari.writer import write_image, write_labels

    lab = _labels()
    meta = {"name": "cells", "scale": [3.0, 0.5, 0.25], "translate": [0, 4, 8],
            "metadata": {}, "features": {"index": [0, 1, 300], "kind": ["bg", "a", "b"]}}
    out = write_labels(str(tmp_path / "l.zarr"), lab, meta)
    assert out == [str(tmp_path / "l.zarr")]
    (arr, m, kind), = open_ome_zarr(out[0])
    assert np.array_equal(arr.compute(), lab) and m["scale"] == [3.0, 0.5, 0.25]
    assert m["translate"] == [0.0, 4.0, 8.0] and m["name"] == "cells"
    assert m["features"] == {"index": [0, 1, 300], "kind": ["bg", "a", "b"]}
    assert m["metadata"]["napari_leakseg"]["source_layer"] == "cells"
    with pytest.raises(OutputExistsError):
        write_labels(str(tmp_path / "l.zarr"), lab, meta)
    with pytest.raises(InputError, match=".zarr"):
        write_labels(str(tmp_path / "l.tif"), lab, meta)
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    out = write_image(str(tmp_path / "rgb.zarr"), rgb, {"name": "photo", "rgb": True, "scale": [2, 2]})
    from napari_leakseg._napari.reader import read_zarr_layers

    (arr, m, kind), = read_zarr_layers(out[0])
    assert kind == "image" and m["rgb"] and np.array_equal(np.asarray(arr), rgb) and m["scale"] == [2.0, 2.0]


@pytest.mark.gui
def test_napari_save_and_open_labels_roundtrip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    lab = _labels()
    layer = viewer.add_labels(lab, name="cells", scale=(2.0, 0.5, 0.5), translate=(0, 3, 4),
                              features={"index": [0, 1, 300], "area": [0.0, 600.0, 1000.0]})
    path = tmp_path / "saved.zarr"
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(path), selected=True, plugin="napari-leakseg")
    assert [str(w) for w in written] == [str(path)]
    assert path.is_dir()
    new = viewer.open(str(path), plugin="napari-leakseg")
    assert len(new) == 1
    back = new[0]
    assert back._type_string == "labels" and back.name.startswith("cells")  # napari dedups names
    import dask.array as da

    assert isinstance(back.data, da.Array)  # opened lazily, not loaded whole
    assert np.array_equal(np.asarray(back.data), lab) and np.asarray(back.data).dtype == lab.dtype
    assert tuple(back.scale) == (2.0, 0.5, 0.5) and tuple(back.translate) == (0.0, 3.0, 4.0)
    assert list(back.features["index"]) == [0, 1, 300] and list(back.features["area"]) == [0.0, 600.0, 1000.0]
    # the colours the user saw are stored
    il = back.metadata["image-label"]
    colors = {c["label-value"]: c["rgba"] for c in il["colors"]}
    exp = np.round(np.asarray(layer.colormap.map(np.array([300])))[0] * 255).astype(int).tolist()
    assert colors[300] == exp


@pytest.mark.gui
def test_export_layers_image_plus_labels(make_napari_viewer, tmp_path):
    from napari_leakseg._napari.export import export_layers

    viewer = make_napari_viewer()
    img = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    im = viewer.add_image(img, name="raw", scale=(0.5, 0.5))
    l1 = viewer.add_labels((img > 0.5).astype(np.uint8), name="mask", scale=(0.5, 0.5))
    l2 = viewer.add_labels((img > 0.9).astype(np.uint8) * 2, name="spots", scale=(0.5, 0.5))
    out = export_layers([im, l1, l2], tmp_path / "e.zarr",
                        provenance={"capability": "scribble", "params": {"n_segments": 3}})
    items = {m["name"]: (a, m, k) for a, m, k in open_ome_zarr(out)}
    assert set(items) == {"raw", "mask", "spots"}
    assert np.array_equal(items["raw"][0].compute(), img)
    assert np.array_equal(items["spots"][0].compute(), l2.data)
    prov = items["mask"][1]["metadata"]["napari_leakseg"]
    assert prov["capability"] == "scribble" and prov["params"] == {"n_segments": 3}
    assert prov["source_layer"] == ["raw", "mask", "spots"] and prov["version"] and prov["date"]
    with pytest.raises(OutputExistsError):
        export_layers(viewer, tmp_path / "e.zarr")
    viewer.layers.selection = {l1}
    out2 = export_layers(viewer, tmp_path / "e.zarr", overwrite=True)  # selected layer only
    assert [m["name"] for _, m, _ in open_ome_zarr(out2)] == ["mask"]
    with pytest.raises(InputError, match="one image"):
        export_layers([im, viewer.add_image(img, name="raw2")], tmp_path / "two.zarr")
