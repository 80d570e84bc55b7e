"""Memory estimates: refuse a job up front instead of letting the process be killed.

Every entry point that loads a whole array into RAM (``core.io.imread`` with
``lazy=False``, ``_napari.layers.read_image``) or starts a job whose working set
scales with the image calls :func:`check_memory` first. When the estimate
exceeds the memory that is available, a :class:`~napari_leakseg.core.errors.MemoryEstimateError`
names the job, the estimate and what is available, and suggests tiling or
converting the input to ``.zarr`` (which every command reads lazily, tile by
tile).

* :func:`available_bytes` is psutil's *available* memory. The environment
  variable ``LEAKSEG_MEMORY_LIMIT`` (bytes, or a number with a ``K``/``M``/``G``
  suffix) caps it, e.g. to share a machine or to test the refusal.
* :func:`array_bytes` / :func:`estimate_job_bytes` turn shapes into byte counts.
* :func:`peek_file` reads only a file's header to get its shape and dtype, so a
  file far beyond memory is refused before a single pixel is read.

Plain numpy/psutil: no napari, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import MemoryEstimateError

#: fraction of the available memory a single job may plan to use
DEFAULT_FRACTION = 0.8
ENV_LIMIT = "LEAKSEG_MEMORY_LIMIT"

_SUFFIX = {"": 1, "B": 1, "K": 2 ** 10, "KB": 2 ** 10, "KIB": 2 ** 10, "M": 2 ** 20, "MB": 2 ** 20,
           "MIB": 2 ** 20, "G": 2 ** 30, "GB": 2 ** 30, "GIB": 2 ** 30, "T": 2 ** 40, "TB": 2 ** 40,
           "TIB": 2 ** 40}


def parse_bytes(text: str) -> int:
    """``"512M"`` → 536870912; a plain number is bytes. Raises ``ValueError`` when unreadable."""
    s = str(text).strip().upper().replace(" ", "")
    i = len(s)
    while i > 0 and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    num, suf = s[:i], s[i:]
    if not num or suf not in _SUFFIX:
        raise ValueError(f"cannot read a byte count from {text!r} (e.g. 4G, 512M, 1000000)")
    return int(float(num) * _SUFFIX[suf])


def available_bytes() -> int:
    """Memory available for new allocations now (psutil), capped by ``LEAKSEG_MEMORY_LIMIT``."""
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil missing or unsupported platform
        avail = 1 << 62
    env = os.environ.get(ENV_LIMIT)
    if env:
        try:
            avail = min(avail, parse_bytes(env))
        except ValueError:
            pass  # a malformed limit is ignored rather than blocking every job
    return avail


def array_bytes(shape: Sequence[int], dtype=np.float32) -> int:
    """Bytes of a dense array of ``shape`` and ``dtype`` (exact Python ints: no overflow)."""
    n = 1
    for s in shape:
        n *= max(int(s), 0)
    return n * np.dtype(dtype).itemsize


def estimate_job_bytes(shape: Sequence[int], dtype=np.float32, *, float_copies: float = 3.0,
                       extra: int = 0) -> int:
    """A job's working set: the input as stored plus ``float_copies`` float32 copies of it.

    Typical values: reading + normalising = 1; training/prediction on the whole
    image (input, features, output) = 3 to 6. ``extra`` adds fixed bytes (e.g.
    a model's activations on one tile).
    """
    n = array_bytes(shape, np.uint8)  # number of elements
    return int(array_bytes(shape, dtype) + float_copies * 4 * n + extra)


def _fmt(n: float) -> str:
    for unit, f in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def check_memory(n_bytes_estimate: int, what: str = "this job", *, fraction: float = DEFAULT_FRACTION,
                 hint: Optional[str] = None, available: Optional[int] = None) -> int:
    """Raise :class:`MemoryEstimateError` when ``n_bytes_estimate`` exceeds ``fraction`` of the
    available memory. Returns the estimate (so callers can log it).

    ``what`` names the job in the message ("reading big.tif", "membrane prediction").
    ``hint`` replaces the default advice (tile the work or convert the input to .zarr).
    """
    n = int(n_bytes_estimate)
    avail = available_bytes() if available is None else int(available)
    budget = fraction * avail
    if n > budget:
        advice = hint or ("process it in tiles or convert it to .zarr (OME-Zarr is read lazily, tile by "
                          "tile; `leakseg apply` runs a saved model over it), or crop/downsample it first")
        raise MemoryEstimateError(
            f"{what} needs about {_fmt(n)} of memory but only {_fmt(avail)} is available; {advice}"
        )
    return n


def check_array(shape: Sequence[int], dtype, what: str, *, float_copies: float = 0.0,
                hint: Optional[str] = None) -> int:
    """Shortcut: :func:`check_memory` for ``shape``/``dtype`` plus ``float_copies`` float32 copies."""
    return check_memory(estimate_job_bytes(shape, dtype, float_copies=float_copies), what, hint=hint)


# --------------------------------------------------------------------------- headers
def peek_file(path) -> Optional[tuple[tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` from a file's header without reading its pixels; None when unknown.

    Knows .npy, .tif/.tiff (first series) and .png/.jpg (via Pillow, decoded
    size × channels). Never raises: a file it cannot peek is left to the reader,
    which reports corrupt files itself.
    """
    p = Path(path)
    ext = p.name.lower()
    try:
        with quiet_logger("tifffile"):
            return _peek(p, ext)
    except Exception:
        return None


def _peek(p: Path, ext: str):
    if True:
        if ext.endswith(".npy"):
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            return tuple(int(s) for s in shape), np.dtype(dtype)
        if ext.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(p) as tf:
                s = tf.series[0]
                return tuple(int(v) for v in s.shape), np.dtype(s.dtype)
        if ext.endswith((".png", ".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(p) as im:
                w, h = im.size
                bands = len(im.getbands())
                dt = np.uint16 if im.mode.startswith("I;16") else (
                    np.int32 if im.mode == "I" else (np.float32 if im.mode == "F" else np.uint8))
                return ((h, w) if bands == 1 else (h, w, bands)), np.dtype(dt)
    return None


def check_file_read(path, what: Optional[str] = None, *, float_copies: float = 0.0) -> None:
    """Refuse to read ``path`` fully into memory when its header says it will not fit."""
    info = peek_file(path)
    if info is None:
        return
    shape, dtype = info
    check_array(shape, dtype, what or f"reading {Path(path).name} (shape {shape}, {dtype})",
                float_copies=float_copies)


class quiet_logger:
    """Context manager: silence a library's logger entirely (e.g. tifffile's warnings *and*
    errors about damaged files or headers that claim huge shapes, which would otherwise add
    lines to the CLI's one-line error; the caller reports the problem itself)."""

    def __init__(self, name: str):
        import logging

        self.log = logging.getLogger(name)

    def __enter__(self):
        import logging

        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL + 1)
        return self

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
        return False
