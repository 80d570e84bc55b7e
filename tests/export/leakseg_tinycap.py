"""A tiny test capability for ``leakseg apply`` tests: a random-weight U-Net.

Registered at test time through ``core.predictor.PREDICTOR_FACTORIES`` (as
"leakseg_tinycap:predictor_from_model"); worker processes import this module by
name (the test folder is on their sys.path).
"""

from __future__ import annotations

import numpy as np
import torch

from napari_leakseg.core import store
from napari_leakseg.core.predictor import Predictor
from napari_leakseg.core.unet import UNet, numpy_fn

FACTORY = "leakseg_tinycap:predictor_from_model"


def save_tiny_model(path, *, out_channels=3, in_channels=1, output="labels", tile=64, halo=8,
                    base=4, depth=2, seed=0, capability="restore"):
    torch.manual_seed(seed)
    model = UNet(in_channels=in_channels, out_channels=out_channels, base=base, depth=depth, norm="none")
    with torch.no_grad():  # balance the classes so argmax labels are varied
        x = torch.rand(1, in_channels, 64, 64, generator=torch.Generator().manual_seed(seed))
        y = model(x)
        model.head.bias -= y.mean((0, 2, 3))
        model.head.weight *= 1.0 / (float(y.std()) + 1e-6)
    meta = {"capability": capability, "arch": model.arch,
            "train": {"note": "random weights for tests"},
            "tiny": {"output": output, "tile": tile, "halo": halo}}
    return store.save(model, path, meta)


def predictor_from_model(state_dict, metadata, device="auto"):
    arch = metadata["arch"]
    model = UNet(**arch)
    model.load_state_dict(state_dict)
    model.eval()
    t = metadata["tiny"]
    fn = numpy_fn(model, torch.device("cpu"), multiple=model.multiple)
    if t["output"] == "labels":
        def finalize(b):
            return (np.asarray(b).argmax(0) + 1).astype(np.uint8)
    else:
        def finalize(b):
            return np.asarray(b, np.float32)[0]
    return Predictor(fn=fn, in_channels=arch["in_channels"], out_channels=arch["out_channels"],
                     finalize=finalize, output=t["output"], halo=t["halo"], tile=t["tile"],
                     capability=metadata["capability"], metadata=metadata)


def fault_predictor_from_model(state_dict, metadata, device="auto"):
    """Same model; the worker process dies (os._exit) whenever it loads the model and
    LEAKSEG_TEST_DIE names a marker file that does not exist yet (die once) or is "always"."""
    import os

    try:  # only inside a dask worker process, never in the client
        from distributed import get_worker

        get_worker()
    except ValueError:
        return predictor_from_model(state_dict, metadata, device)
    how = os.environ.get("LEAKSEG_TEST_DIE", "")
    if how == "always":
        os._exit(1)
    if how:
        try:
            fd = os.open(how, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os._exit(1)
        except FileExistsError:
            pass
    return predictor_from_model(state_dict, metadata, device)
