"""Model store (incl. a malicious pickle), tiling equality, file IO by extension."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from napari_leakseg.core import io, store, tiling
from napari_leakseg.core.errors import InputError, ModelFileError, OutputExistsError
from napari_leakseg.core.unet import UNet, numpy_fn


# ------------------------------------------------------------------ store
def _meta(cap="restore"):
    return {"capability": cap, "arch": {"base": 4}, "train": {"steps": 1}}


def test_store_round_trip(tmp_path):
    m = UNet(1, 2, base=4, depth=2)
    p = store.save(m, tmp_path / "m.pt", _meta())
    sd, meta = store.load(p, capability="restore")
    assert meta["capability"] == "restore" and meta["arch"] == {"base": 4}
    assert "version" in meta and "normalization" in meta
    m2 = UNet(1, 2, base=4, depth=2)
    m2.load_state_dict(sd)
    x = torch.rand(1, 1, 16, 16)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def test_store_never_overwrites(tmp_path):
    p = store.save({"w": torch.ones(2)}, tmp_path / "m.pt", _meta())
    with pytest.raises(OutputExistsError):
        store.save({"w": torch.zeros(2)}, p, _meta())
    assert torch.equal(store.load(p)[0]["w"], torch.ones(2))
    store.save({"w": torch.zeros(2)}, p, _meta(), overwrite=True)
    assert torch.equal(store.load(p)[0]["w"], torch.zeros(2))


def test_store_wrong_capability(tmp_path):
    p = store.save({"w": torch.ones(2)}, tmp_path / "m.pt", _meta("scribble"))
    with pytest.raises(ModelFileError, match="'scribble' model, not a 'restore'"):
        store.load(p, capability="restore")


def test_store_corrupt_truncated_dir_future(tmp_path):
    p = store.save({"w": torch.ones(1000)}, tmp_path / "m.pt", _meta())
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    for bad in ("trunc.pt", "garbage.pt"):
        with pytest.raises(ModelFileError, match="not a valid"):
            store.load(tmp_path / bad)
    with pytest.raises(ModelFileError, match="directory"):
        store.load(tmp_path)
    with pytest.raises(ModelFileError, match="does not exist"):
        store.load(tmp_path / "nope.pt")
    torch.save({"format": store.FORMAT, "format_version": 99, "metadata": "{}", "state_dict": {}},
               tmp_path / "future.pt")
    with pytest.raises(ModelFileError, match="newer"):
        store.load(tmp_path / "future.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": store.FORMAT, "format_version": 1, "metadata": "{}",
                "state_dict": {"w": torch.ones(1)}, "x": _Evil()}, path)
    # sanity: a plain unpickle of this file WOULD run the payload
    with zipfile.ZipFile(path) as z:
        name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        raw = z.read(name)
    assert b"system" in raw
    with pytest.raises(ModelFileError, match="not a safe model file") as e:
        store.load(path)
    assert "weights_only" not in str(e.value)  # never the unsafe advice to retry without it
    assert not marker.exists()
    _ = pickle  # the unsafe path is never taken


# ------------------------------------------------------------------ tiling
def test_tiled_equals_untiled_for_a_conv_net():
    torch.manual_seed(0)
    net = UNet(1, 2, base=4, depth=2)
    with torch.no_grad():  # non-trivial running statistics
        net.train()
        for _ in range(3):
            net(torch.rand(2, 1, 32, 32))
    net.eval()
    fn = numpy_fn(net, "cpu", multiple=4)
    img = np.random.default_rng(0).random((1, 150, 211)).astype(np.float32)
    full = fn(img)
    tiled = tiling.predict_tiled(fn, img, tile=96, overlap=32)
    # the receptive field exceeds the overlap a little: equal within tolerance
    assert np.abs(tiled - full).mean() < 2e-3
    assert np.abs(tiled - full).max() < 0.1


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.integers(8, 40), ov=st.integers(0, 12),
       c=st.integers(1, 3))
def test_tiling_pointwise_is_exact(h, w, tile, ov, c):
    img = np.random.default_rng(h * 100 + w).random((c, h, w)).astype(np.float32)
    out = tiling.predict_tiled(lambda t: t * 3 + 1, img, tile=tile, overlap=ov)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, img * 3 + 1, rtol=1e-5, atol=1e-5)


def test_tiling_writes_into_zarr_in_bands(tmp_path):
    import zarr

    img = np.random.default_rng(1).random((1, 300, 257)).astype(np.float32)
    out = zarr.open_array(str(tmp_path / "o.zarr"), mode="w", shape=(1, 300, 257), chunks=(1, 64, 64),
                          dtype="f4")
    tiling.predict_tiled(lambda t: t - 0.5, img, tile=64, overlap=16, out=out)
    np.testing.assert_allclose(out[:], img - 0.5, atol=1e-6)


# ------------------------------------------------------------------ io
@pytest.mark.parametrize("ext", [".tif", ".npy", ".png", ".zarr"])
def test_io_round_trip(tmp_path, ext):
    lab = np.random.default_rng(0).integers(0, 200, (33, 47)).astype(np.uint8)
    p = io.imwrite(tmp_path / f"l{ext}", lab)
    back = np.asarray(io.imread(p))
    np.testing.assert_array_equal(back, lab)
    with pytest.raises(OutputExistsError):
        io.imwrite(p, lab)


def test_io_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.imread(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="cannot read"):
        io.imread(tmp_path / "bad.tif")
    with pytest.raises(OutputExistsError, match="does not exist"):
        io.imwrite(tmp_path / "no" / "dir" / "x.tif", np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match="unsupported extension"):
        io.imwrite(tmp_path / "x.bmp", np.zeros((2, 2), np.uint8))
    (tmp_path / "adir.tif").mkdir()
    with pytest.raises(InputError, match="directory"):
        io.imread(tmp_path / "adir.tif")


def test_groupnorm_breaks_tiling_which_is_why_batchnorm_is_default():
    assert UNet().arch["norm"] == "batch"
