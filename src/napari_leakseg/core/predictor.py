"""A saved model, as something that maps image tiles to outputs.

Every capability module exposes ``predictor_from_model(state_dict, metadata,
device="auto") -> Predictor``. ``leakseg apply`` (dask), the tiler and the
widgets all use it, so any saved model runs the same way everywhere.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import store
from .errors import ModelFileError

#: capability name -> "module:function" building a Predictor from a saved model
PREDICTOR_FACTORIES = {
    "scribble": "napari_leakseg.scribble:predictor_from_model",
    "membrane": "napari_leakseg.membrane:predictor_from_model",
    "restore": "napari_leakseg.restore:predictor_from_model",
    "propagate": "napari_leakseg.propagate:predictor_from_model",
}


@dataclass
class Predictor:
    """How to run a trained model on (C, h, w) float32 tiles.

    fn:        normalised tile (C_in, h, w) -> (C_out, h, w) float32 (logits,
               probabilities or an image); blended across tile overlaps.
    finalize:  blended (C_out, Y, X) block -> final output (e.g. argmax labels
               (Y, X) uint, or the restored image (Y, X)). Must be pointwise so
               blocks can be finalised independently.
    halo:      overlap (pixels) a tile needs on each side for exact results.
    output:    "labels" or "image" (decides layer type and zarr layout).
    normalize: raw (C, h, w) tile -> normalised float32 tile, using fixed
               percentiles ``lohi`` when given (set per image by the caller).
    """

    fn: Callable[[np.ndarray], np.ndarray]
    in_channels: int
    out_channels: int
    finalize: Callable[[np.ndarray], np.ndarray]
    output: str = "labels"
    halo: int = 32
    tile: int = 256
    capability: str = ""
    metadata: dict = field(default_factory=dict)
    preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None


def load_predictor(path, device="auto", capability: str | None = None) -> Predictor:
    """Load any saved model file as a :class:`Predictor`."""
    sd, meta = store.load(path, capability=capability)
    cap = meta.get("capability")
    target = PREDICTOR_FACTORIES.get(cap)
    if target is None:
        raise ModelFileError(f"{path}: unknown capability {cap!r}")
    mod, fn = target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)(sd, meta, device=device)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
