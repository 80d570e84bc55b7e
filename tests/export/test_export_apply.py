"""``leakseg apply`` (dask, map_overlap) vs single-process prediction, and its failure modes."""

from __future__ import annotations

import time

import numpy as np
import pytest

import leakseg_tinycap as tc
from napari_leakseg.cli.main import main
from napari_leakseg.core import predictor as P
from napari_leakseg.core.errors import InputError, LeaksegError, OutputExistsError
from napari_leakseg.distributed import apply_model, plan_blocks, predict_array
from napari_leakseg.zarr_io import open_ome_zarr, read_zarr, write_ome_zarr


@pytest.fixture
def tinycap(monkeypatch):
    monkeypatch.setitem(P.PREDICTOR_FACTORIES, "restore", tc.FACTORY)
    return tc


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 800).astype(np.uint16)
    img[..., shape[-2] // 3: shape[-2] // 2, :] += 1500
    img[..., :, shape[-1] // 4: shape[-1] // 3] += 700
    return img


@pytest.fixture
def stack_zarr(tmp_path):
    img = _image((2, 300, 333))
    p = write_ome_zarr(tmp_path / "in.zarr", img, kind="image", scale=(4.0, 0.5, 0.5),
                       chunks=(1, 100, 100))
    return p, img


@pytest.mark.parametrize("output", ["labels", "image"])
def test_apply_in_process_bit_identical_to_single_process(tmp_path, tinycap, stack_zarr, output):
    inp, img = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt", output=output)
    pred = P.load_predictor(model)
    ref = predict_array(pred, img)
    # several blocks per axis, a merged short tail block, halo < block
    plan = plan_blocks(img.shape, pred, block=128, chunk=64)
    assert len(plan.y.chunks) > 1 and len(plan.x.chunks) > 1 and plan.n_blocks == 2 * 2 * 3
    out = apply_model(model, inp, tmp_path / "out.zarr", block=128, chunk=64)
    (arr, meta, kind), = open_ome_zarr(out)
    got = arr.compute()
    assert kind == output and got.dtype == ref.dtype
    assert np.array_equal(got, ref)  # bit-identical, floats included
    if output == "labels":
        assert len(np.unique(ref)) >= 2  # a non-trivial label map
    assert meta["scale"] == [4.0, 0.5, 0.5] and meta["metadata"]["axes"] == ["z", "y", "x"]
    prov = meta["metadata"]["napari_leakseg"]
    assert prov["capability"] == "restore" and prov["operation"] == "leakseg apply"
    assert prov["params"]["tile"] == 64 and prov["source"].endswith("in.zarr")


def test_apply_local_cluster_threads_bit_identical(tmp_path, tinycap, stack_zarr):
    inp, img = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt", output="image")
    ref = predict_array(P.load_predictor(model), img)
    out = apply_model(model, inp, tmp_path / "out.zarr", scheduler="local", n_workers=2,
                      processes=False, block=128, chunk=64)
    assert np.array_equal(read_zarr(out).compute(), ref)


def test_apply_real_restore_model(tmp_path):
    """A real capability's ``predictor_from_model`` (restore: tile 512, halo 32)."""
    restore = pytest.importorskip("napari_leakseg.restore")
    import torch

    from napari_leakseg.core import store

    torch.manual_seed(0)
    net = restore.RestoreNet(base=4, depth=2, norm="batch")
    model = store.save(net, tmp_path / "r.pt", {"capability": "restore", "arch": dict(net.arch)})
    img = _image((1100, 1030), seed=3)
    inp = write_ome_zarr(tmp_path / "in.zarr", img, kind="image")
    pred = P.load_predictor(model)
    assert plan_blocks(img.shape, pred, block=512, chunk=256).n_blocks == 4
    out = apply_model(model, inp, tmp_path / "out.zarr", block=512, chunk=256, n_workers=2)
    assert np.array_equal(read_zarr(out, prefer="image").compute(), predict_array(pred, img))


@pytest.mark.slow
def test_apply_worker_process_dies_once_is_retried(tmp_path, tinycap, stack_zarr, monkeypatch):
    """LocalCluster worker *processes*: a worker that dies mid-run (os._exit) is replaced, its
    block is retried and the output is still bit-identical."""
    inp, img = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt", output="labels")
    ref = predict_array(P.load_predictor(model), img)
    monkeypatch.setitem(P.PREDICTOR_FACTORIES, "restore", "leakseg_tinycap:fault_predictor_from_model")
    monkeypatch.setenv("LEAKSEG_TEST_DIE", str(tmp_path / "died-once"))
    out = apply_model(model, inp, tmp_path / "ok.zarr", scheduler="local", n_workers=1,
                      allowed_failures=1, block=160, chunk=80)
    assert (tmp_path / "died-once").exists()  # a worker really died
    assert np.array_equal(read_zarr(out).compute(), ref)


@pytest.mark.slow
def test_apply_worker_process_always_dies_fails_clearly(tmp_path, tinycap, stack_zarr, monkeypatch):
    """A worker that dies on every attempt fails the run with a clear message and leaves no store
    (not even a hidden partial one)."""
    inp, _ = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt", output="labels")
    monkeypatch.setitem(P.PREDICTOR_FACTORIES, "restore", "leakseg_tinycap:fault_predictor_from_model")
    monkeypatch.setenv("LEAKSEG_TEST_DIE", "always")
    with pytest.raises(LeaksegError, match="worker died.*No output was written"):
        apply_model(model, inp, tmp_path / "bad.zarr", scheduler="local", n_workers=1,
                    allowed_failures=0, block=160, chunk=80)
    assert not any(p.name.startswith((".bad.zarr", "bad.zarr")) for p in tmp_path.iterdir())


def test_unreachable_scheduler_fails_fast_with_address(tmp_path, tinycap, stack_zarr):
    inp, _ = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt")
    t0 = time.perf_counter()
    with pytest.raises(LeaksegError, match=r"tcp://127\.0\.0\.1:9"):
        apply_model(model, inp, tmp_path / "o.zarr", scheduler="tcp://127.0.0.1:9", connect_timeout=1)
    assert time.perf_counter() - t0 < 15
    assert list(p.name for p in tmp_path.iterdir() if "o.zarr" in p.name) == []


def test_bad_inputs(tmp_path, tinycap, stack_zarr):
    inp, img = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt")
    with pytest.raises(InputError, match="does not exist"):
        apply_model(model, tmp_path / "missing.zarr", tmp_path / "o.zarr")
    (tmp_path / "corrupt.zarr").mkdir()
    (tmp_path / "corrupt.zarr" / ".zgroup").write_text("{{{")
    with pytest.raises(InputError, match="corrupt|not a readable"):
        apply_model(model, tmp_path / "corrupt.zarr", tmp_path / "o.zarr")
    one_d = write_ome_zarr(tmp_path / "1d.zarr", np.zeros((1, 5, 7), np.uint8), kind="image")
    two_ch = tinycap.save_tiny_model(tmp_path / "m2.pt", in_channels=2)
    with pytest.raises(InputError, match="expects 2 input channels"):
        apply_model(two_ch, one_d, tmp_path / "o.zarr")
    (tmp_path / "taken.zarr").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(OutputExistsError, match="exists"):
        apply_model(model, inp, tmp_path / "taken.zarr", scheduler="local")
    assert time.perf_counter() - t0 < 5  # refused before any cluster starts
    assert not (tmp_path / "o.zarr").exists()


def test_two_channel_model_with_channel_axis(tmp_path, tinycap):
    img = _image((2, 96, 80))
    inp = write_ome_zarr(tmp_path / "c.zarr", img, kind="image", axes="cyx")
    model = tinycap.save_tiny_model(tmp_path / "m2.pt", in_channels=2, output="image")
    out = apply_model(model, inp, tmp_path / "o.zarr", block=32, chunk=16)
    ref = predict_array(P.load_predictor(model), img, has_channels=True)
    assert np.array_equal(read_zarr(out, prefer="image").compute(), ref)


def test_cli_apply_and_errors(tmp_path, tinycap, stack_zarr, capsys):
    inp, img = stack_zarr
    model = tinycap.save_tiny_model(tmp_path / "m.pt")
    out = tmp_path / "cli.zarr"
    assert main(["apply", "--model", str(model), "--input", str(inp), "--output", str(out),
                 "--block", "128", "-q"]) == 0
    assert np.array_equal(read_zarr(out).compute(), predict_array(P.load_predictor(model), img))
    assert main(["apply", "--model", str(model), "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["apply", "--model", str(model), "--input", str(inp), "--output", str(out),
                 "--block", "128", "--overwrite", "-q"]) == 0
    assert main(["apply", "--model", str(tmp_path / "nope.pt"), "--input", str(inp),
                 "--output", str(tmp_path / "x.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
