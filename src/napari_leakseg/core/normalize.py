"""Image validation and percentile normalisation (plain numpy)."""

from __future__ import annotations

import numpy as np

from .errors import InputError

#: dtypes we accept as images
_OK_KINDS = "biuf"
#: largest magnitude normalised outputs saturate at (keeps float32 output finite)
_F32_BIG = float(np.finfo(np.float32).max) / 2


def _subsample(a, max_elems: int = 4_000_000) -> np.ndarray:
    """A strided subsample of a (possibly lazy) array, for statistics in bounded memory."""
    size = int(np.prod(a.shape)) if len(a.shape) else 1
    if size <= max_elems:
        return np.asarray(a)
    step = int(np.ceil((size / max_elems) ** (1.0 / max(1, a.ndim))))
    sl = tuple(slice(None, None, step) for _ in a.shape)
    return np.asarray(a[sl])


def check_image(a, name: str = "image", allow_nan: bool = False) -> None:
    """Raise ``InputError`` naming the problem for unusable image data."""
    shape = tuple(getattr(a, "shape", ()))
    dtype = np.dtype(getattr(a, "dtype", np.float32))
    if len(shape) == 0:
        raise InputError(f"{name} is a scalar, not an image")
    if any(s == 0 for s in shape):
        raise InputError(f"{name} is empty (shape {shape})")
    if dtype.kind not in _OK_KINDS:
        raise InputError(f"{name} has unsupported dtype {dtype} (use integer, float or bool data)")
    if dtype.kind == "c":
        raise InputError(f"{name} is complex-valued; take abs() or real part first")
    if not allow_nan and dtype.kind == "f":
        sample = _subsample(a)
        if not np.isfinite(sample).all():
            raise InputError(
                f"{name} contains NaN or Inf values; replace them (e.g. np.nan_to_num) first"
            )


def percentile_range(a, low: float = 1.0, high: float = 99.8) -> tuple[float, float]:
    """Robust (low, high) intensity percentiles, from a subsample for large/lazy arrays."""
    sample = _subsample(a)
    # 8-byte data may exceed float32's range (1e308, 2**63): keep float64 for the statistics
    sample = sample.astype(np.float64 if sample.dtype.itemsize >= 8 else np.float32, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [low, high])
    if hi - lo < 1e-8:  # near-constant: fall back to the full range
        lo, hi = float(sample.min()), float(sample.max())
    return float(lo), float(hi)


def normalize(a, low: float = 1.0, high: float = 99.8, clip: bool = False,
              lohi: tuple[float, float] | None = None) -> np.ndarray:
    """Percentile-normalise to float32 so that ``low``→0 and ``high``→1.

    A constant image becomes all zeros (not NaN). ``lohi`` reuses given
    percentiles (for tiles of a larger image, so all tiles share one scale).
    """
    x = np.asarray(a)
    if x.dtype == bool:
        x = x.astype(np.float32)
    lo, hi = lohi if lohi is not None else percentile_range(x, low, high)
    lo, hi = float(lo), float(hi)
    if hi - lo < 1e-8:
        return np.zeros(x.shape, np.float32)
    if x.dtype.itemsize >= 8 or max(abs(lo), abs(hi)) > 1e30:
        # float64/int64 data, possibly beyond float32's range: scale in float64, then cast
        s = max(abs(lo), abs(hi), 1.0)
        y = x.astype(np.float64) / s
        y -= lo / s
        y /= (hi / s - lo / s)
        if clip:
            np.clip(y, 0.0, 1.0, out=y)
        else:  # far outliers would overflow float32: saturate instead of becoming inf
            np.clip(y, -_F32_BIG, _F32_BIG, out=y)
        return y.astype(np.float32)
    kind = x.dtype.kind
    x = x.astype(np.float32, copy=True)
    x -= lo
    x /= (hi - lo)
    if clip:
        np.clip(x, 0.0, 1.0, out=x)
    elif kind == "f":  # huge float32 values over a tiny percentile range may overflow
        np.clip(x, -_F32_BIG, _F32_BIG, out=x)
    return x


def to_channels_first(a, rgb: bool | None = None) -> np.ndarray:
    """Return a 2D image as (C, Y, X). ``rgb`` None guesses: last axis of size 3/4 is channels."""
    x = np.asarray(a)
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3:
        if rgb is None:
            rgb = x.shape[-1] in (3, 4)
        if rgb:
            return np.moveaxis(x, -1, 0)
        raise InputError(
            f"expected a 2D image (Y, X) or an RGB(A) image (Y, X, 3|4); got shape {x.shape}"
        )
    raise InputError(f"expected a 2D image; got {x.ndim} dims with shape {x.shape}")


def drop_alpha(x: np.ndarray) -> np.ndarray:
    """(C, Y, X) with C=4 → RGB; C=2 (gray+alpha) → gray."""
    if x.shape[0] == 4:
        return x[:3]
    if x.shape[0] == 2:
        return x[:1]
    return x


def rgb_is_gray(x: np.ndarray, tol: float = 0.0) -> bool:
    """True if a (Y, X, 3) array has equal channels (e.g. SEM files stored as RGB)."""
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] < 3:
        return False
    a = x[..., 0].astype(np.float32)
    return bool(
        np.abs(a - x[..., 1]).max() <= tol and np.abs(a - x[..., 2]).max() <= tol
    )
