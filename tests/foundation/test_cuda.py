"""GPU checks: a model trained on CUDA is saved, loaded on the CPU and predicts the same.

Skipped where there is no CUDA GPU (CI). Run on a GPU machine with the core tests:
``LEAKSEG_TEST_DEVICE=cuda pytest tests/*/test_*_core.py tests/foundation/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_leakseg import membrane as M
from napari_leakseg import restore as R
from napari_leakseg.core import device, store
from napari_leakseg.core.predictor import load_predictor
from napari_leakseg.samples import membranes, sem_particles
from napari_leakseg.scribble import segment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_auto_picks_cuda_and_lists_it():
    assert device.resolve_device("auto").type == "cuda"
    assert "cuda" in device.available_devices()


def test_membrane_trained_on_cuda_predicts_the_same_on_cpu(tmp_path):
    img, lab = membranes((128, 128), seed=0)
    tm = M.train_membrane([img], [lab], membrane_value=1, epochs=2, steps_per_epoch=10, batch_size=2, crop=64,
                          base=8, depth=2, emb_dim=8, keys_per_ref=32, device="cuda", seed=0)
    assert all(p.device.type == "cpu" for p in tm.model.parameters())  # handed back on the CPU
    path = tm.save(tmp_path / "m.pt")
    gpu = M.predict_membrane(str(path), img, device="cuda")["probability"]
    cpu = M.predict_membrane(str(path), img, device="cpu")["probability"]
    assert np.isfinite(gpu).all()
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)


def test_restore_trained_on_cuda_predicts_the_same_on_cpu(tmp_path):
    clean, low, _ = sem_particles((128, 128), seed=3)
    m = R.train(low=[low], high=[clean], loss="ssim", steps=20, batch_size=2, crop=32, base=8, depth=2,
                seed=0, device="cuda")
    p = m.save(tmp_path / "r.pt")
    gpu = R.restore_image(R.RestoreModel.load(p), low, device="cuda", output="normalized")
    cpu = R.restore_image(R.RestoreModel.load(p), low, device="cpu", output="normalized")
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)


def test_scribble_segments_on_cuda_and_its_model_predicts_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, 32:] = 200
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    scr = np.zeros((48, 64), np.uint8)
    scr[10:12, 5:25] = 1
    scr[30:32, 40:60] = 2
    r = segment(img, scr, device="cuda", max_iter=40)
    assert r.labels.shape == (48, 64)
    assert (r.labels[:, :32] == 1).mean() > 0.9 and (r.labels[:, 32:] == 2).mean() > 0.9
    p = store.save(r.state["state_dict"], tmp_path / "s.pt", r.state["metadata"])
    outs = []
    for dev in ("cuda", "cpu"):
        pred = load_predictor(p, device=dev, capability="scribble")
        x = np.moveaxis(img, -1, 0)
        outs.append(pred.finalize(pred.fn(pred.preprocess(x) if pred.preprocess else x)))
    assert (outs[0] == outs[1]).mean() > 0.999
