"""One validation step for saved models, shared by every loader.

A model file is untrusted input: its metadata is JSON that anyone can edit. Each
capability declares a :class:`ModelSpec` (the architecture keys it knows, their
types and sane ranges, how to build the network); :func:`build_model` then

1. checks the metadata is a JSON object of the right capability
   (:func:`check_metadata`), and the arch: known keys only, required keys
   present, each value of the right type and in range (:func:`check_arch`);
2. builds the network on PyTorch's ``meta`` device (no memory), and checks its
   size — the weights plus one tile's activations — against the memory guard
   (``core.memory``), so ``base=16384`` is refused up front instead of
   allocating tens of GB;
3. checks that the file's weights are exactly the network's (names, shapes,
   floating dtypes), then builds it for real and loads them.

Every failure raises :class:`~napari_leakseg.core.errors.ModelFileError` with one
line naming the file and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import MemoryEstimateError, ModelFileError


@dataclass(frozen=True)
class Param:
    """One metadata value: ``kind`` is "int", "float", "bool", "str" or "floats" (a list of 1-16
    numbers); ``lo``/``hi`` bound numbers; ``choices`` lists the allowed values."""

    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Optional[tuple] = None


@dataclass
class ModelSpec:
    """What a capability's saved model must look like.

    build:      validated arch (defaults filled in) → ``nn.Module`` (called once on the
                ``meta`` device for the size and weight checks, once for real)
    weights:    the state-dict entries that belong to the network (default: all)
    activation: validated arch → bytes one tile's forward pass needs (rough)
    check:      extra checks ``(arch, metadata, state_dict) -> None`` raising ModelFileError
    """

    capability: str
    arch: Mapping[str, Param]
    build: Callable[[dict], Any]
    required: tuple = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    weights: Optional[Callable[[dict], dict]] = None
    activation: Optional[Callable[[dict], int]] = None
    check: Optional[Callable[[dict, dict, dict], None]] = None


def _fail(source, msg: str):
    raise ModelFileError(f"{source}: {msg}" if source else msg)


def check_value(name: str, v, p: Param, source=None):
    """``v`` must match ``p`` (JSON types: a bool is not a number, a number not a string)."""
    if p.kind == "floats":
        if not isinstance(v, list) or not 1 <= len(v) <= 16:
            _fail(source, f"{name} must be a list of 1 to 16 numbers, got {v!r:.60}")
        for x in v:
            check_value(name, x, Param("float", p.lo, p.hi), source)
        return v
    if p.kind == "bool":
        if not isinstance(v, bool):
            _fail(source, f"{name} must be true or false, got {v!r:.60}")
    elif p.kind == "str":
        if not isinstance(v, str):
            _fail(source, f"{name} must be a string, got {v!r:.60}")
    elif p.kind in ("int", "float"):
        ok = isinstance(v, int) and not isinstance(v, bool)
        if p.kind == "float":
            ok = ok or (isinstance(v, float) and math.isfinite(v))
        if not ok:
            _fail(source, f"{name} must be {'an integer' if p.kind == 'int' else 'a number'}, got {v!r:.60}")
        if (p.lo is not None and v < p.lo) or (p.hi is not None and v > p.hi):
            lo = "-inf" if p.lo is None else f"{p.lo:g}"
            hi = "inf" if p.hi is None else f"{p.hi:g}"
            _fail(source, f"{name} = {v!r:.40} is out of range [{lo}, {hi}]")
    else:  # pragma: no cover - a spec bug
        raise ValueError(f"unknown Param kind {p.kind!r}")
    if p.choices is not None and v not in p.choices:
        _fail(source, f"{name} must be one of {', '.join(map(repr, p.choices))}, got {v!r:.60}")
    return v


def check_metadata(meta, source=None, capability: Optional[str] = None) -> dict:
    """The metadata is a JSON object; ``capability`` (if given) matches; ``arch``, ``train`` and
    ``normalization`` are objects when present."""
    if not isinstance(meta, dict):
        _fail(source, f"model metadata must be a JSON object, got a {type(meta).__name__}; "
                      "not a napari-leakseg model file")
    cap = meta.get("capability")
    if not isinstance(cap, str):
        _fail(source, f"model metadata has no capability name (got {cap!r:.60})")
    if capability is not None and cap != capability:
        _fail(source, f"this is a {cap!r} model, not a {capability!r} model")
    for key in ("arch", "train", "normalization"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            _fail(source, f"model metadata {key!r} must be a JSON object, got a {type(meta[key]).__name__}")
    return meta


def check_arch(spec: ModelSpec, arch, source=None) -> dict:
    """Known keys, required keys, types and ranges; returns the arch with defaults filled in."""
    if arch is None:
        arch = {}
    if not isinstance(arch, dict):
        _fail(source, f"model 'arch' must be a JSON object, got a {type(arch).__name__}")
    unknown = sorted(str(k) for k in arch if k not in spec.arch)
    if unknown:
        _fail(source, f"unknown key(s) in the {spec.capability} model 'arch': {', '.join(unknown)[:200]} "
                      f"(known: {', '.join(spec.arch)})")
    missing = [k for k in spec.required if k not in arch]
    if missing:
        _fail(source, f"the {spec.capability} model 'arch' lacks {', '.join(missing)}")
    for k, v in arch.items():
        check_value(f"arch.{k}", v, spec.arch[k], source)
    return {**dict(spec.defaults), **arch}


def _fmt(n: float) -> str:
    for unit, f in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def build_model(spec: ModelSpec, state_dict, metadata, source=None, device=None):
    """Validate ``(state_dict, metadata)`` against ``spec`` and return ``(module, arch)`` with the
    weights loaded (eval mode, on ``device`` when given). See the module docstring."""
    import torch

    from .memory import check_memory

    meta = check_metadata(metadata, source, spec.capability)
    arch = check_arch(spec, meta.get("arch"), source)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        _fail(source, "the model weights are not a dict of tensors")
    if spec.check is not None:
        spec.check(arch, meta, dict(state_dict))
    try:
        with torch.device("meta"):
            skeleton = spec.build(arch)
    except ModelFileError:
        raise
    except Exception as e:
        _fail(source, f"the {spec.capability} model 'arch' {arch} cannot be built: "
                      f"{' '.join(str(e).split())[:160] or type(e).__name__}")
    want = skeleton.state_dict()
    n_weights = sum(t.numel() * t.element_size() for t in want.values())
    act = int(spec.activation(arch)) if spec.activation is not None else 0
    try:
        check_memory(2 * n_weights + act, f"the {spec.capability} model (arch {arch})")
    except MemoryEstimateError as e:
        _fail(source, f"architecture too large to load, refused before allocating it: {e}")
    have = dict(spec.weights(dict(state_dict)) if spec.weights is not None else state_dict)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"] if extra else [])
        _fail(source, f"model weights do not match the {spec.capability} architecture: {'; '.join(parts)}")
    for k, t in want.items():
        v = have[k]
        if tuple(v.shape) != tuple(t.shape):
            _fail(source, f"model weights do not match the {spec.capability} architecture: {k} has shape "
                          f"{tuple(v.shape)}, the arch needs {tuple(t.shape)}")
        if t.is_floating_point() != v.is_floating_point():
            _fail(source, f"model weights do not match the {spec.capability} architecture: {k} has dtype "
                          f"{v.dtype}, expected {t.dtype}")
    del skeleton
    model = spec.build(arch)
    try:
        model.load_state_dict(have)
    except RuntimeError as e:  # pragma: no cover - the checks above match load_state_dict's
        _fail(source, f"model weights do not match the {spec.capability} architecture: "
                      f"{' '.join(str(e).split())[:200]}")
    if device is not None:
        model = model.to(device)
    return model.eval(), arch


def unet_activation(base: int, depth: int, in_channels: int = 1, tile: int = 512) -> int:
    """Rough bytes of a U-Net forward pass on one ``tile``² tile (float32): the widest
    full-resolution feature maps, a few at a time, plus the skips."""
    px = tile * tile
    full = base * px * 4
    return int(6 * full + 2 * in_channels * px * 4 + 2 * full * max(1, depth))
