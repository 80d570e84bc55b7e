"""One model store: weights plus JSON metadata in a single ``.pt`` file.

File layout (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "napari-leakseg-model", "format_version": 1,
     "metadata": "<json string>", "state_dict": {name: tensor, ...}}

Metadata always has ``capability``, ``version`` (package), ``arch`` (architecture
parameters), ``train`` (training parameters) and ``normalization``; capabilities
add their own keys. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from .errors import ModelFileError, OutputExistsError

FORMAT = "napari-leakseg-model"
FORMAT_VERSION = 1
CAPABILITIES = ("scribble", "membrane", "restore", "propagate")


def _state_dict(model_or_state) -> dict:
    if isinstance(model_or_state, torch.nn.Module):
        sd = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        sd = dict(model_or_state)
    else:
        raise TypeError("save() needs an nn.Module or a state dict")
    return {k: v.detach().to("cpu").clone() for k, v in sd.items()}


def save(model_or_state, path, metadata: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Save weights + metadata atomically. Refuses to overwrite unless asked."""
    path = Path(path)
    meta = dict(metadata)
    cap = meta.get("capability")
    if cap not in CAPABILITIES:
        raise ValueError(f"metadata['capability'] must be one of {CAPABILITIES}, got {cap!r}")
    meta.setdefault("arch", {})
    meta.setdefault("train", {})
    meta.setdefault("normalization", {"method": "percentile", "low": 1.0, "high": 99.8})
    meta["version"] = __version__
    meta.setdefault("saved", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        meta_json = json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"model metadata must be JSON-serialisable: {e}") from e
    if path.exists() and not overwrite:
        raise OutputExistsError(f"model file {path} exists; choose another name or allow overwrite")
    if not path.parent.exists():
        raise OutputExistsError(f"folder {path.parent} does not exist")
    if not path.parent.is_dir():
        raise OutputExistsError(f"folder {path.parent} is a file, not a folder")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": meta_json,
        "state_dict": _state_dict(model_or_state),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch reports an unwritable folder as RuntimeError
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise OutputExistsError(f"cannot write model file {path}: {first}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path, capability: str | None = None, map_location="cpu") -> tuple[dict, dict]:
    """Load ``(state_dict, metadata)``; checks format, version and capability.

    Uses ``torch.load(weights_only=True)``, so a malicious pickle cannot run code.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelFileError(f"model path {path} is a directory, not a model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle with disallowed globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{path} is not a valid napari-leakseg model file (corrupt, truncated or unsafe): {first[:200]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a napari-leakseg model file")
    fv = payload.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer napari-leakseg (model format {fv}); "
            f"this version reads format {FORMAT_VERSION}. Upgrade napari-leakseg."
        )
    try:
        meta = json.loads(payload["metadata"])
        sd = payload["state_dict"]
    except Exception:
        raise ModelFileError(f"{path} has unreadable metadata") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{path} has no valid weights")
    if capability is not None and meta.get("capability") != capability:
        raise ModelFileError(
            f"{path} is a {meta.get('capability')!r} model, not a {capability!r} model"
        )
    return sd, meta


def read_metadata(path) -> dict:
    """Only the metadata (still a safe load)."""
    return load(path)[1]
