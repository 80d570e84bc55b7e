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
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from .errors import ModelFileError, OutputExistsError
from .paths import check_input_file, check_target

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
    check_target(path, overwrite)  # only a plain file is ever replaced; the folder must be writable
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
    check_input_file(path, "model file", ModelFileError)  # a FIFO/device would block torch.load
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line only in the CLI
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle with disallowed globals
        raise ModelFileError(_load_error(path, e)) from None
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
    from .modelcheck import check_metadata

    check_metadata(meta, path)  # a JSON object with a capability name (list/string metadata: refused)
    if capability is not None and meta.get("capability") != capability:
        raise ModelFileError(
            f"{path} is a {meta.get('capability')!r} model, not a {capability!r} model"
        )
    return sd, meta


def _load_error(path, e: BaseException) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused. Never repeats torch's advice
    to retry with ``weights_only=False``: that would run whatever code the file holds."""
    import pickle
    import re

    text = " ".join(str(e).split())
    weights_only = "weights only" in text.lower() or "weights_only" in text
    if isinstance(e, pickle.UnpicklingError) and weights_only:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            return (f"{path} is not a safe model file: it refers to Python code ({m.group(1)}), which "
                    "napari-leakseg never loads; nothing in it was run")
        return (f"{path} is not a valid napari-leakseg model file (corrupt, or not a safe model file: a pickle "
                "of other objects); nothing in it was run")
    if weights_only:
        text = ""  # torch's hints about weights_only are unsafe advice
    first = text[:200] or type(e).__name__
    return f"{path} is not a valid napari-leakseg model file (corrupt or truncated): {first}"


def read_metadata(path) -> dict:
    """Only the metadata (still a safe load)."""
    return load(path)[1]
