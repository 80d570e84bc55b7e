"""SEM restoration: an image-to-image U-Net with an SSIM loss, and a fabrication check.

Plain torch/numpy (no napari, no Qt). Training modes:

* ``paired``: low- and high-quality images of the same field. The instrument's
  data bar is cropped (detected or given), the pair is registered to sub-pixel
  accuracy with phase cross-correlation and cropped to the overlap.
* ``degrade``: high-quality images only; low-quality inputs are simulated with a
  parameterised :class:`Degradation` (Poisson–Gaussian noise, Gaussian blur PSF,
  scan-line jitter, downsampling). :func:`estimate_degradation` estimates the
  parameters from a low-quality example.
* ``self-supervised``: low-quality images only. SEM noise is correlated along
  the scan lines (rows) and independent between them; ``ss_method``:
  ``lines-ssim`` (default: the even lines predict the odd ones with a
  noise-corrected SSIM loss, and the restoration averages the four flips of
  the image along and across the scan lines), ``lines`` (the same pairs with an
  MSE loss, Noise2Noise-style, no flips), ``nb2nb`` (Neighbor2Neighbor with neighbours on different lines) or ``n2v``
  (structN2V: a blind spot along the scan line).
* ``noise2noise``: two fast scans of each field (``low`` and ``low2``),
  registered to each other.

Losses: ``ssim`` (default: 0.84·(1−SSIM) + 0.16·L1, SSIM from ``pytorch_msssim``),
``mse``, ``l1``, or ``pix2pix`` (a GAN with a PatchGAN discriminator, for
comparison: it can fabricate). Restorations are returned on the input's
intensity scale and dtype unless ``output`` asks otherwise.

The fabrication check detects blobs (LoG) in the restored image and in a
reference and counts fabricated and missed ones; without a reference,
:func:`fabrication_risk_map` shows where the restoration adds structure that
the input does not support beyond its noise level.

Entry points: :func:`train_restore` (job generator), :func:`train`,
:func:`iter_restore` / :func:`restore_image`, :func:`predictor_from_model`,
:func:`fabrication_check`, :func:`fabrication_risk_map`.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from .core.device import resolve_device, seed_everything
from .core.errors import InputError, JobCancelled, LeaksegError
from .core.jobs import Progress, Throttle, run_job
from .core.modelcheck import ModelSpec, Param, build_model as checked_model, unet_activation
from .core.normalize import check_image, normalize, percentile_range
from .core.predictor import Predictor
from .core.tiling import check_tile, iter_tiled
from .core.unet import UNet, numpy_fn

LOSSES = ("ssim", "mse", "l1")
#: adversarial (pix2pix) training: a comparison, it can fabricate structure
GAN_LOSS = "pix2pix"
MODES = ("paired", "degrade", "self-supervised", "noise2noise")
#: self-supervised methods for SEM noise correlated along the scan lines (rows)
SS_METHODS = ("lines-ssim", "lines", "nb2nb", "n2v")
#: self-supervised methods trained on :func:`line_pairs` (restored with :func:`lines_fn`)
LINE_METHODS = ("lines", "lines-ssim")
#: loss name of ``lines-ssim`` (SSIM against a noisy target, corrected for the target's noise)
NOISY_SSIM_LOSS = "ssim-noisy-target"
CAPABILITY = "restore"

__all__ = [
    "LOSSES", "MODES", "Degradation", "RestoreModel", "as_gray", "detect_data_bar",
    "crop_data_bar", "register_pair", "degrade", "estimate_noise", "estimate_degradation",
    "ssim", "restoration_loss", "train_restore", "train", "iter_restore", "restore_image",
    "predictor_from_model", "detect_blobs", "match_blobs", "fabrication_check",
    "fabrication_risk_map", "psnr", "ssim_np", "ssim_noisy_target", "SS_METHODS",
]


# --------------------------------------------------------------------------- input handling
def as_gray(img, name: str = "image", gray_tol: float = 0.02) -> np.ndarray:
    """Return a 2D float32 image from gray or RGB(A) data (never modifies the input).

    SEM files are often stored as RGB with equal channels (plus a coloured
    overlay in the data bar / frame): if at most ``gray_tol`` of the pixels have
    unequal channels, the per-pixel median of the channels is used. A truly
    coloured image is converted to luminance with a warning.
    """
    check_image(img, name)
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float32)
        unequal = (np.abs(rgb[..., 0] - rgb[..., 1]) > 0) | (np.abs(rgb[..., 0] - rgb[..., 2]) > 0)
        if unequal.mean() <= gray_tol:
            out = np.median(rgb, axis=-1)
        else:
            warnings.warn(f"{name} is a colour image ({100 * unequal.mean():.0f}% of pixels have "
                          "unequal channels); converting to grey luminance", UserWarning, stacklevel=2)
            out = rgb @ np.array([0.2125, 0.7154, 0.0721], np.float32)
    elif a.ndim == 2:
        out = a.astype(np.float32)
    else:
        raise InputError(f"{name} must be a 2D grey image (Y, X) or RGB (Y, X, 3); got shape {a.shape}")
    if min(out.shape) < 16:
        raise InputError(f"{name} is too small ({out.shape}); need at least 16×16 pixels")
    if float(out.max()) - float(out.min()) <= 0:
        raise InputError(f"{name} is constant (all pixels = {float(out.min()):g}); nothing to restore")
    return out


def _is_line(row: np.ndarray, frac: float = 0.9) -> bool:
    vals, counts = np.unique(row, return_counts=True)
    return counts.max() >= frac * row.size


def detect_data_bar(img, max_fraction: float = 0.25) -> int:
    """Number of rows at the bottom that belong to an instrument data bar (0 if none).

    A data bar is a band at the bottom, at most ``max_fraction`` of the height,
    that starts at a horizontal line (≥ 90 % of the row one value) and contains
    at least two more such lines and both very dark and very bright (text)
    pixels. Natural or noisy image content essentially never has such rows.
    """
    a = np.asarray(img, np.float32)
    if a.ndim != 2:
        a = as_gray(a)
    H = a.shape[0]
    lo, hi = float(a.min()), float(a.max())
    span = max(hi - lo, 1e-12)
    start = int(H * (1 - max_fraction))
    lines = [r for r in range(start, H) if _is_line(a[r])]
    for r in lines:
        below = [q for q in lines if q > r]
        if len(below) < 2:
            break
        band = a[r:]
        dark = np.mean(band <= lo + 0.05 * span)
        bright = np.mean(band >= hi - 0.05 * span)
        if dark >= 0.2 and bright >= 0.01:
            return H - r
    return 0


def _edge_lines(a: np.ndarray, max_px: int = 4) -> tuple[int, int, int, int]:
    """Constant rows/columns (a frame drawn by the instrument) at the four edges."""
    t = b = l = r = 0
    while t < max_px and _is_line(a[t], 0.95):
        t += 1
    while b < max_px and _is_line(a[a.shape[0] - 1 - b], 0.95):
        b += 1
    while l < max_px and _is_line(a[:, l], 0.95):
        l += 1
    while r < max_px and _is_line(a[:, a.shape[1] - 1 - r], 0.95):
        r += 1
    return t, b, l, r


def crop_data_bar(img, bar: int | str | None = "auto") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop the data bar (``"auto"``: detected; an int: that many bottom rows; None/0: none).

    With ``"auto"`` a one- or two-pixel frame drawn around the image is removed
    too. Returns the cropped 2D image and the crop ``(top, bottom, left, right)``.
    """
    a = np.asarray(img, np.float32) if np.asarray(img).ndim == 2 else as_gray(img)
    if bar == "auto":
        nb = detect_data_bar(a)
        t, b, l, r = _edge_lines(a[: a.shape[0] - nb] if nb else a)
        crop = (t, nb + b, l, r)
    else:
        nb = int(bar or 0)
        if nb < 0 or nb >= a.shape[0] - 16:
            raise InputError(f"data-bar margin {nb} rows is invalid for an image of {a.shape[0]} rows")
        crop = (0, nb, 0, 0)
    t, b, l, r = crop
    out = a[t:a.shape[0] - b, l:a.shape[1] - r]
    return out, crop


def _smooth_corr(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    a = ndi.gaussian_filter(a.astype(np.float32), sigma)
    b = ndi.gaussian_filter(b.astype(np.float32), sigma)
    a = a - a.mean()
    b = b - b.mean()
    d = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def register_pair(low, high, upsample: int = 20, min_corr: float = 0.3,
                  max_shift_fraction: float = 0.25):
    """Register ``high`` onto ``low`` (sub-pixel phase cross-correlation) and crop to the overlap.

    The clean image is the one interpolated, so the noise of the low-quality
    image is not smoothed. Returns ``(low_crop, high_crop, shift (dy, dx),
    correlation)``; raises ``InputError`` when shapes differ or the pair cannot
    be registered (correlation below ``min_corr`` after alignment, or a shift
    larger than ``max_shift_fraction`` of the image).
    """
    from skimage.registration import phase_cross_correlation

    check_image(low, "low-quality image")
    check_image(high, "high-quality image")
    low = np.asarray(low, np.float32)
    high = np.asarray(high, np.float32)
    if low.shape != high.shape:
        raise InputError(f"low- and high-quality images have different shapes {low.shape} and "
                         f"{high.shape}; they must show the same field at the same size")
    ln = normalize(low)
    hn = normalize(high)
    # register on a lightly smoothed low image: the noise would bias the peak
    shift, _, _ = phase_cross_correlation(ndi.gaussian_filter(ln, 1.0), hn,
                                          upsample_factor=upsample, normalization=None)
    shift = np.asarray(shift, float)
    H, W = low.shape
    if abs(shift[0]) > max_shift_fraction * H or abs(shift[1]) > max_shift_fraction * W:
        raise InputError(f"cannot register the pair: the estimated drift ({shift[0]:.1f}, {shift[1]:.1f}) px "
                         "is implausibly large; are these images of the same field?")
    moved = ndi.shift(high, shift, order=3, mode="nearest")
    y0, y1 = int(math.ceil(max(shift[0], 0))), H - int(math.ceil(max(-shift[0], 0)))
    x0, x1 = int(math.ceil(max(shift[1], 0))), W - int(math.ceil(max(-shift[1], 0)))
    low_c, high_c = low[y0:y1, x0:x1], moved[y0:y1, x0:x1]
    corr = _smooth_corr(low_c, high_c)
    if corr < min_corr:
        raise InputError(f"cannot register the pair: correlation after alignment is {corr:.2f} "
                         f"(< {min_corr}); are these images of the same field?")
    return low_c.copy(), high_c.copy(), (float(shift[0]), float(shift[1])), corr


# --------------------------------------------------------------------------- degradation model
@dataclass
class Degradation:
    """Parameterised low-quality SEM model, in units of a clean image scaled to [0, 1].

    poisson:    Poisson (shot) noise variance per unit intensity (var = poisson·x + gaussian²)
    gaussian:   Gaussian read-noise standard deviation
    blur:       Gaussian PSF sigma (pixels)
    jitter:     scan-line jitter: std of the per-row horizontal shift (pixels)
    downsample: acquisition at 1/downsample resolution, upsampled back (1 = none)
    scan_corr:  noise correlation along the scan direction (x): the noise is
                smoothed along rows with this Gaussian sigma (pixels), keeping
                its variance (SEM detector response; 0 = white noise)
    """

    poisson: float = 0.02
    gaussian: float = 0.05
    blur: float = 0.8
    jitter: float = 0.0
    downsample: int = 1
    scan_corr: float = 0.0

    def __post_init__(self):
        for f in ("poisson", "gaussian", "blur", "jitter", "scan_corr"):
            v = float(getattr(self, f))
            if not np.isfinite(v) or v < 0:
                raise InputError(f"degradation parameter {f}={v} must be a finite number ≥ 0")
            setattr(self, f, v)
        if int(self.downsample) != self.downsample or self.downsample < 1 or self.downsample > 8:
            raise InputError(f"degradation parameter downsample={self.downsample} must be an integer 1..8")
        self.downsample = int(self.downsample)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def given(cls, spec) -> dict:
        """Only the settings named in ``spec`` (validated), as a dict."""
        if isinstance(spec, Degradation):
            return spec.to_dict()
        if isinstance(spec, str):
            keys = [p.split("=", 1)[0] for p in spec.replace(" ", "").split(",") if p]
        else:
            keys = list(dict(spec))
        keys = ["gaussian" if k == "noise" else k for k in keys]
        full = cls.parse(spec).to_dict()
        return {k: full[k] for k in keys}

    @classmethod
    def parse(cls, spec: str | dict | "Degradation" | None) -> "Degradation":
        """From ``"noise=0.1,blur=1.2,poisson=0.02,jitter=0.5,downsample=2"`` or a dict.

        ``noise`` is an alias for ``gaussian``.
        """
        if spec is None:
            return cls()
        if isinstance(spec, Degradation):
            return copy.copy(spec)
        if isinstance(spec, str):
            d = {}
            for part in [p for p in spec.replace(" ", "").split(",") if p]:
                if "=" not in part:
                    raise InputError(f"degradation setting {part!r} must look like key=value")
                k, v = part.split("=", 1)
                try:
                    d[k] = float(v)
                except ValueError:
                    raise InputError(f"degradation setting {k}={v!r} is not a number") from None
            spec = d
        d = dict(spec)
        if "noise" in d:
            d["gaussian"] = d.pop("noise")
        names = {f.name for f in fields(cls)}
        bad = set(d) - names
        if bad:
            raise InputError(f"unknown degradation setting(s) {', '.join(sorted(bad))}; "
                             f"use noise, {', '.join(sorted(names))}")
        if "downsample" in d:
            d["downsample"] = int(round(float(d["downsample"])))
        return cls(**d)


def degrade(clean, params: Degradation | dict | str | None = None, seed=None) -> np.ndarray:
    """Simulate a low-quality acquisition of ``clean`` (float, ~[0, 1]); returns float32."""
    p = Degradation.parse(params)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = np.asarray(clean, np.float32)
    if x.ndim != 2:
        raise InputError(f"degrade expects a 2D image; got shape {x.shape}")
    if p.blur > 0:
        x = ndi.gaussian_filter(x, p.blur)
    if p.jitter > 0:
        off = rng.normal(0, p.jitter, x.shape[0])
        cols = np.arange(x.shape[1], dtype=np.float32)
        x = np.stack([np.interp(cols + o, cols, row) for row, o in zip(x, off)]).astype(np.float32)
    if p.downsample > 1:
        f = p.downsample
        H, W = x.shape
        Hc, Wc = H // f * f, W // f * f
        small = x[:Hc, :Wc].reshape(Hc // f, f, Wc // f, f).mean((1, 3))
        x = ndi.zoom(small, (H / small.shape[0], W / small.shape[1]), order=1).astype(np.float32)
    clean_x = x
    if p.poisson > 0:
        photons = 1.0 / p.poisson
        x = rng.poisson(np.clip(x, 0, None) * photons).astype(np.float32) / photons
    if p.gaussian > 0:
        x = x + rng.normal(0, p.gaussian, x.shape).astype(np.float32)
    if p.scan_corr > 0:
        n = x - clean_x
        k = np.exp(-0.5 * (np.arange(-4 * p.scan_corr - 1, 4 * p.scan_corr + 2) // 1 / p.scan_corr) ** 2)
        k /= k.sum()
        n = ndi.correlate1d(n, k, axis=1, mode="reflect") / np.sqrt((k * k).sum())
        x = clean_x + n
    return x.astype(np.float32)


def estimate_noise(img, win: int = 7, bins: int = 12) -> tuple[float, float]:
    """Poisson–Gaussian noise ``(poisson a, gaussian sigma)`` with var = a·mean + sigma².

    Works on the image as given (no normalisation): local mean/variance in
    ``win``×``win`` windows over the flattest 40 % of the image (edges inflate
    the variance), the median variance per intensity bin, then a non-negative
    linear fit (a single bin gives pure Gaussian noise).
    """
    from scipy.stats import chi2

    x = np.asarray(img, np.float64)
    m = ndi.uniform_filter(x, win)
    v = np.maximum(ndi.uniform_filter(x * x, win) - m * m, 0) * (win * win) / (win * win - 1)
    g = ndi.gaussian_gradient_magnitude(x, 2.0)
    flat = g <= np.percentile(g, 40)
    mf, vf = m[flat], v[flat]
    lo, hi = np.percentile(mf, [2, 98])
    edges = np.linspace(lo, hi + 1e-9, bins + 1)
    ms, vs, ns = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (mf >= a) & (mf < b)
        if sel.sum() < max(50, 0.01 * mf.size):
            continue
        ms.append(mf[sel].mean())
        vs.append(np.median(vf[sel]))
        ns.append(sel.sum())
    dof = win * win - 1
    corr = dof / chi2.ppf(0.5, dof)  # median of a chi-square variance estimate is biased low
    if len(ms) < 2 or (max(ms) - min(ms)) < 0.05 * (hi - lo + 1e-12):
        return 0.0, float(math.sqrt(np.median(vf) * corr))
    ms, vs, w = np.array(ms), np.array(vs), np.sqrt(np.array(ns, float))
    A = np.stack([ms, np.ones_like(ms)], 1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, vs * w, rcond=None)
    if a < 0:
        a, b = 0.0, float(np.average(vs, weights=w))
    if b < 0:
        a = float(np.sum(w * ms * vs) / np.sum(w * ms * ms))
        b = 0.0
    return float(a * corr), float(math.sqrt(b * corr))


def _radial_psd(x: np.ndarray, nbins: int = 40):
    x = x - x.mean()
    win = np.outer(np.hanning(x.shape[0]), np.hanning(x.shape[1]))
    P = np.abs(np.fft.fft2(x * win)) ** 2 / (win ** 2).sum()
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fx = np.fft.fftfreq(x.shape[1])[None, :]
    f = np.sqrt(fy ** 2 + fx ** 2)
    edges = np.linspace(0, 0.5, nbins + 1)
    idx = np.digitize(f.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < nbins)
    s = np.bincount(idx[ok], P.ravel()[ok], nbins)
    c = np.bincount(idx[ok], None, nbins)
    return 0.5 * (edges[1:] + edges[:-1]), s / np.maximum(c, 1)


def _clean_scale(low: np.ndarray) -> np.ndarray:
    """Normalise a noisy image so that its *smoothed* version spans [0, 1] like a clean one."""
    lohi = percentile_range(ndi.gaussian_filter(np.asarray(low, np.float32), 2.0))
    return normalize(low, lohi=lohi)


def estimate_degradation(low, high=None) -> Degradation:
    """Estimate :class:`Degradation` parameters from a low-quality example.

    Noise (Poisson–Gaussian) comes from the low image alone, in the units of a
    clean image scaled to [0, 1]. The blur is estimated when a high-quality
    image (same kind of sample, not necessarily the same field) is given: the
    sigma whose Gaussian makes the clean power spectrum fall off like the
    low image's (after subtracting its white-noise floor). Without one, the
    blur is set to 0.
    """
    low = as_gray(low, "low-quality example")
    ln = _clean_scale(low)
    a, s = estimate_noise(ln)
    c = estimate_scan_correlation(ln)
    hn = normalize(as_gray(high, "high-quality example")) if high is not None else None
    # self-calibration: simulate the estimated noise on a clean proxy, re-estimate,
    # and correct the estimator's bias (correlated noise biases local variances)
    proxy = hn if hn is not None else ndi.gaussian_filter(ln, 2.0)
    sim = degrade(proxy, Degradation(poisson=a, gaussian=s, blur=0, scan_corr=c), seed=0)
    sim = _clean_scale(sim)  # through the same pipeline as the real image (units included)
    a1, s1 = estimate_noise(sim)
    c1 = estimate_scan_correlation(sim)
    mu = float(np.median(proxy))
    v0, v1 = a * mu + s * s, a1 * mu + s1 * s1
    k = v0 / v1 if v1 > 0 else 1.0
    a, s = a * k, s * math.sqrt(k)
    c = c * c / c1 if c1 > 0 else c
    blur = 0.0
    if hn is not None:
        f, Pl = _radial_psd(ln)
        _, Ph = _radial_psd(hn)
        floor = np.median(Pl[f > 0.4])
        sig = Pl - floor
        ok = (f > 0.02) & (f < 0.35) & (sig > 3 * floor * 0.1) & (Ph > 0)
        if ok.sum() >= 4:
            best, best_err = 0.0, np.inf
            for sg in np.arange(0.0, 3.01, 0.1):
                H2 = np.exp(-(2 * np.pi * f * sg) ** 2)
                model = np.log(H2[ok] * Ph[ok] + 1e-20)
                d = np.log(np.maximum(sig[ok], 1e-20)) - model
                err = float(np.var(d))  # free gain: only the spectral shape matters
                if err < best_err:
                    best, best_err = float(sg), err
            blur = best
    return Degradation(poisson=max(a, 0.0), gaussian=max(s, 0.0), blur=round(blur, 2),
                       scan_corr=round(c, 2))


def estimate_degradation_many(lows, high=None) -> Degradation:
    """:func:`estimate_degradation` over several low-quality examples (median of each parameter)."""
    lows = _as_list(lows, "low")
    ests = [estimate_degradation(x, high).to_dict() for x in lows]
    if len(ests) == 1:
        return Degradation(**ests[0])
    med = {k: float(np.median([e[k] for e in ests])) for k in ests[0]}
    med["downsample"] = int(round(med["downsample"]))
    med["blur"], med["scan_corr"] = round(med["blur"], 2), round(med["scan_corr"], 2)
    return Degradation(**med)


def estimate_scan_correlation(img) -> float:
    """Sigma (pixels) of the noise smoothing along rows, from the lag-1 correlation of the
    high-pass residual in flat regions (for Gaussian-smoothed white noise
    rho = exp(-1 / (4 sigma^2))); the column-direction correlation (signal
    leakage) is subtracted. 0 when the noise is white."""
    x = np.asarray(img, np.float32)
    r = x - ndi.gaussian_filter(x, 3.0)
    g = ndi.gaussian_gradient_magnitude(ndi.gaussian_filter(x, 2.0), 1.0)
    flat = g <= np.percentile(g, 50)
    fh = flat[:, :-1] & flat[:, 1:]
    fv = flat[:-1] & flat[1:]
    if fh.sum() < 100 or fv.sum() < 100:
        return 0.0
    rh = np.corrcoef(r[:, :-1][fh], r[:, 1:][fh])[0, 1]
    rv = np.corrcoef(r[:-1][fv], r[1:][fv])[0, 1]
    rho = (rh - max(rv, 0)) / max(1 - max(rv, 0), 1e-6)
    if not np.isfinite(rho) or rho <= 0.05:
        return 0.0
    rho = min(rho, 0.95)
    return float(math.sqrt(-1.0 / (4 * math.log(rho))))


# --------------------------------------------------------------------------- losses and metrics
def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5) from ``pytorch_msssim``."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(x, y, data_range=data_range, size_average=True)


def restoration_loss(kind: str = "ssim", alpha: float = 0.84):
    """Loss ``f(pred, target)``: ``ssim`` = alpha·(1−SSIM) + (1−alpha)·L1, or ``mse``/``l1``."""
    if kind not in LOSSES:
        raise InputError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind == "mse":
        return F.mse_loss
    if kind == "l1":
        return F.l1_loss
    return _ssim_l1(ssim, alpha)


def _ssim_l1(ssim_fn, alpha: float):
    """``alpha``·(1 − ``ssim_fn``) + (1 − alpha)·L1 (Zhao et al.'s mix), as a loss ``f(pred, target)``."""

    def loss(p, t):
        return alpha * (1 - ssim_fn(p, t)) + (1 - alpha) * F.l1_loss(p, t)

    return loss


#: expected windowed variance of the noise / its pixel variance, for the 11-px SSIM window (sigma 1.5)
#: and noise correlated along the rows (lag-1 ≈ 0.55, lag-2 ≈ 0.2): 1 − Σw²·(1 + 2·(0.55 + 0.2)) ≈ 0.91
NOISE_WINDOW_FACTOR = 0.9


def _gauss_filter(x: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """Separable Gaussian window (valid convolution), as in SSIM."""
    g = torch.exp(-(torch.arange(size, dtype=x.dtype, device=x.device) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def ssim_noisy_target(p: torch.Tensor, t: torch.Tensor, poisson: float, gaussian: float,
                      factor: float = NOISE_WINDOW_FACTOR, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of ``p`` against a *noisy* target ``t``, corrected for the target's noise.

    The target's local mean and its covariance with ``p`` are unbiased when the
    target's noise is independent of ``p`` (another scan line), but its local
    variance carries the noise variance too, which would reward inflating the
    contrast. That part, ``factor``·(poisson·mean + gaussian²) (Poisson–Gaussian,
    from :func:`estimate_noise`), is subtracted from the target's local variance.
    """
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mp, mt = _gauss_filter(p), _gauss_filter(t)
    vp = _gauss_filter(p * p) - mp ** 2
    vt = _gauss_filter(t * t) - mt ** 2
    cpt = _gauss_filter(p * t) - mp * mt
    vt = (vt - factor * (poisson * mt.clamp(min=0) + gaussian ** 2)).clamp(min=0)
    # clamped: with normalised images near 0 a negative (inverted) output would otherwise make both
    # factors negative and their product positive, a degenerate optimum
    lum = ((2 * mp * mt + C1) / (mp ** 2 + mt ** 2 + C1)).clamp(min=0)
    cs = (2 * cpt + C2) / (vp + vt + C2)
    return (lum * cs).mean()


def noisy_ssim_loss(poisson: float, gaussian: float, alpha: float = 0.84):
    """``alpha``·(1 − :func:`ssim_noisy_target`) + (1 − alpha)·L1, for targets that are noisy scans."""
    return _ssim_l1(lambda p, t: ssim_noisy_target(p, t, poisson, gaussian), alpha)


def ssim_np(a, b, data_range: float = 1.0) -> float:
    """SSIM with scikit-image (Gaussian weights, as in Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def psnr(a, ref, data_range: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float(10 * np.log10(data_range ** 2 / max(mse, 1e-12)))


def match_intensity(x, ref) -> np.ndarray:
    """Least-squares affine intensity match of ``x`` to ``ref`` (for fair metrics)."""
    x = np.asarray(x, np.float64)
    r = np.asarray(ref, np.float64)
    A = np.stack([x.ravel(), np.ones(x.size)], 1)
    (g, o), *_ = np.linalg.lstsq(A, r.ravel(), rcond=None)
    return (g * x + o).astype(np.float32)


# --------------------------------------------------------------------------- model
class RestoreNet(nn.Module):
    """Shared U-Net with a residual connection: ``out = x + unet(x)``."""

    def __init__(self, base: int = 16, depth: int = 3, norm: str = "batch", residual: bool = True):
        super().__init__()
        self.arch = dict(base=base, depth=depth, norm=norm, residual=residual)
        self.unet = UNet(1, 1, base=base, depth=depth, norm=norm)
        self.residual = residual

    @property
    def multiple(self) -> int:
        return self.unet.multiple

    def forward(self, x):
        y = self.unet(x)
        return x + y if self.residual else y


@dataclass
class RestoreModel:
    """A trained restoration model with its metadata."""

    net: RestoreNet
    metadata: dict

    def save(self, path, overwrite: bool = False):
        from .core import store

        return store.save(self.net, path, self.metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path, device="cpu") -> "RestoreModel":
        from .core import store

        sd, meta = store.load(path, capability=CAPABILITY)
        return cls(_build(sd, meta, device, path), meta)

    def restore(self, image, **kw) -> np.ndarray:
        return restore_image(self, image, **kw)


#: what a saved restore model must look like (checked by ``core.modelcheck.build_model``)
MODEL_SPEC = ModelSpec(
    CAPABILITY,
    arch={"base": Param("int", 1, 512), "depth": Param("int", 1, 8),
          "norm": Param("str", choices=("batch", "group", "instance", "none")), "residual": Param("bool")},
    defaults={"base": 16, "depth": 3, "norm": "batch", "residual": True},
    build=lambda a: RestoreNet(**a),
    activation=lambda a: unet_activation(a["base"], a["depth"], 1))


def _build(sd, meta, device, source=None) -> RestoreNet:
    """The network of a saved restore model after the shared validation step."""
    net, _ = checked_model(MODEL_SPEC, sd, meta, source, resolve_device(device))
    return net


# --------------------------------------------------------------------------- training
def _prepare_pairs(low, high, bar, min_corr):
    lows = _as_list(low, "low")
    highs = _as_list(high, "high")
    if len(lows) != len(highs):
        raise InputError(f"got {len(lows)} low-quality and {len(highs)} high-quality images; "
                         "paired training needs one high image per low image")
    out = []
    for i, (l, h) in enumerate(zip(lows, highs)):
        lg, hg = as_gray(l, f"low image {i + 1}"), as_gray(h, f"high image {i + 1}")
        if lg.shape != hg.shape:
            raise InputError(f"pair {i + 1}: low- and high-quality images have different shapes "
                             f"{lg.shape} and {hg.shape}")
        lc, crop = crop_data_bar(lg, bar)
        t, b, le, r = crop
        hc = hg[t:hg.shape[0] - b, le:hg.shape[1] - r]
        try:
            lr, hr, shift, corr = register_pair(lc, hc, min_corr=min_corr)
        except InputError as e:
            raise InputError(f"pair {i + 1}: {e}") from None
        out.append((normalize(lr), normalize(hr)))
    return out


def _as_list(x, name) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        items = list(x)
    else:
        a = np.asarray(x)
        if a.ndim == 3 and a.shape[-1] not in (3, 4):
            items = list(a)  # a stack of 2D images
        else:
            items = [a]
    if not items:
        raise InputError(f"no {name}-quality images given")
    return items


def _val_split(img_pairs, crop, val_fraction):
    """Split every (input, target) image into a training part and a bottom validation strip."""
    train, val = [], []
    for x, y in img_pairs:
        H = x.shape[0]
        nv = int(round(H * val_fraction))
        if val_fraction > 0 and H - nv >= crop and nv >= 32:
            train.append((x[: H - nv], y[: H - nv]))
            val.append((x[H - nv:], y[H - nv:]))
        else:
            train.append((x, y))
    return train, val


def _random_crops(pairs, n, crop, rng, augment="full", multiple=16):
    """``n`` random (input, target) crops as two (n, 1, h, w) tensors.

    ``augment``: ``"full"`` (90° rotations and flips), ``"flips"`` (horizontal
    and vertical flips: keeps the scan direction horizontal, for methods that
    rely on it), ``"hflip"`` (horizontal flips only: keeps "the row below" below)
    or ``None``/``False``.
    """
    if augment is True:
        augment = "full"
    xs, ys = [], []
    cy = min([crop] + [p[0].shape[0] // multiple * multiple for p in pairs])
    cx = min([crop] + [p[0].shape[1] // multiple * multiple for p in pairs])
    if augment == "full" and cy != cx:
        cy = cx = min(cy, cx)
    for _ in range(n):
        x, y = pairs[rng.integers(len(pairs))]
        H, W = x.shape
        i, j = rng.integers(0, H - cy + 1), rng.integers(0, W - cx + 1)
        a, b = x[i:i + cy, j:j + cx], y[i:i + cy, j:j + cx]
        if augment == "full":
            k = rng.integers(4)
            a, b = np.rot90(a, k), np.rot90(b, k)
        if augment and rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if augment == "flips" and rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
        xs.append(np.ascontiguousarray(a))
        ys.append(np.ascontiguousarray(b))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


def _n2v_mask(x: np.ndarray, rng, frac: float, radius: int = 2, blind_x: int = 0):
    """Blind-spot masking; returns (masked input, mask of the pixels that carry the loss).

    ``blind_x == 0``: Noise2Void, each masked pixel gets a random neighbour's
    value. ``blind_x > 0`` (structN2V, for noise correlated along the scan
    lines = the rows of ``x``): the pixel and ``blind_x`` pixels either side of
    it in its row get values of random pixels elsewhere in the crop, so the
    network cannot read the correlated noise of the masked pixel from its row
    neighbours.
    """
    B, C, H, W = x.shape
    masked = x.copy()
    mask = np.zeros_like(x, dtype=np.float32)
    n = max(1, int(frac * H * W))
    for bi in range(B):
        ys = rng.integers(0, H, n)
        xs = rng.integers(0, W, n)
        if blind_x > 0:
            for d in range(-blind_x, blind_x + 1):
                cx = np.clip(xs + d, 0, W - 1)
                masked[bi, 0, ys, cx] = x[bi, 0, rng.integers(0, H, n), rng.integers(0, W, n)]
        else:
            dy = rng.integers(-radius, radius + 1, n)
            dx = rng.integers(-radius, radius + 1, n)
            dx[(dy == 0) & (dx == 0)] = 1  # never copy the pixel itself
            sy = np.clip(ys + dy, 0, H - 1)
            sx = np.clip(xs + dx, 0, W - 1)
            masked[bi, 0, ys, xs] = x[bi, 0, sy, sx]
        mask[bi, 0, ys, xs] = 1.0
    return masked, mask


# --------------------------------------------------------------------------- self-supervised pieces
def line_pairs(img: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interleaved scan lines of one noisy image as two Noise2Noise pairs.

    SEM noise is correlated along a scan line but independent between lines,
    so the even and the odd lines are two noisy scans of (almost) the same
    field, half a line apart. Pairs: even lines → odd lines (row 2k → 2k+1)
    and odd lines → the next even lines (2k+1 → 2k+2): always "the line below".
    """
    K = img.shape[0] // 2
    e, o = img[0:2 * K:2], img[1:2 * K:2]
    return [(e, o), (o[:-1], e[1:])]


def lines_fn(fn):
    """Wrap a (C, h, w) tile function trained on :func:`line_pairs` to restore full tiles.

    The even rows predict the odd rows and the odd rows the following even rows,
    so every output row is estimated from the other lines only (a blind scan
    line) at the resolution the network was trained at.
    """

    def run(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, np.float32)
        h = t.shape[1]
        if h < 3:
            return fn(t)
        pe = fn(np.ascontiguousarray(t[:, 0::2]))  # row k → original row 2k+1
        po = fn(np.ascontiguousarray(t[:, 1::2]))  # row k → original row 2k+2
        out = np.empty((pe.shape[0], h, t.shape[2]), np.float32)
        out[:, 1::2] = pe[:, :len(range(1, h, 2))]
        out[:, 2::2] = po[:, :len(range(2, h, 2))]
        out[:, 0] = pe[:, 0]
        return out

    return run


def flips_fn(fn):
    """Average a (C, h, w) tile function over the four flips along and across the scan lines.

    Rows stay rows (no 90° rotation), so the scan direction is kept; for a
    :func:`lines_fn` model the vertical flip predicts every line from the other
    side as well (the line above instead of the line below).
    """

    def run(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, np.float32)
        acc = None
        for fy in (False, True):
            for fx in (False, True):
                a = t[:, ::-1] if fy else t
                a = a[:, :, ::-1] if fx else a
                o = np.asarray(fn(np.ascontiguousarray(a)), np.float32)
                o = o[:, ::-1] if fy else o
                o = o[:, :, ::-1] if fx else o
                acc = o.copy() if acc is None else acc + o
        return acc / 4

    return run


def _nb2nb_indices(shape, gen: torch.Generator):
    """Neighbor2Neighbor sub-sampler restricted to neighbours on different scan lines.

    For every 2×2 cell: a random column and a random row order; the two
    sub-images take the upper/lower pixel of that column (never two pixels of
    the same line, whose noise is correlated). Returns two index tensors into
    the flattened cell (0..3) of shape (B, 1, H/2, W/2).
    """
    B, _, H, W = shape
    a = torch.randint(0, 2, (B, 1, H // 2, W // 2), generator=gen)
    b = torch.randint(0, 2, (B, 1, H // 2, W // 2), generator=gen)
    return 2 * a + b, 2 * (1 - a) + b


def _nb2nb_sub(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    cells = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)
    return torch.gather(cells, -1, idx.to(x.device)[..., None].expand(B, C, H // 2, W // 2, 1))[..., 0]


def nb2nb_loss(net, x: torch.Tensor, gen: torch.Generator, gamma: float = 1.0) -> torch.Tensor:
    """Neighbor2Neighbor loss (Huang et al., CVPR 2021) with the scan-line-aware sub-sampler."""
    i1, i2 = _nb2nb_indices(x.shape, gen)
    g1, g2 = _nb2nb_sub(x, i1), _nb2nb_sub(x, i2)
    with torch.no_grad():
        fx = net(x)
    out = net(g1)
    diff = out - g2
    reg = diff - (_nb2nb_sub(fx, i1) - _nb2nb_sub(fx, i2))
    return (diff ** 2).mean() + gamma * (reg ** 2).mean()


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN discriminator on (input, output) pairs: 70×70 receptive field with 3 layers."""

    def __init__(self, base: int = 32, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(2, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base
        for _ in range(1, layers):
            seq += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        seq += [nn.Conv2d(ch, ch * 2, 4, 1, 1), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ch * 2, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x, y):
        return self.net(torch.cat([x, y], 1))


class _Pix2Pix:
    """pix2pix training step (Isola et al. 2017): G loss = BCE(D(x, G(x)), real) + l1_weight·L1."""

    def __init__(self, net, dev, steps, l1_weight: float = 100.0, lr_d: float = 2e-4):
        self.net, self.l1_weight = net, l1_weight
        self.disc = PatchDiscriminator().to(dev).train()
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=lr_d, betas=(0.5, 0.999))
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, x, y, opt):
        fake = self.net(x)
        # discriminator
        d_real, d_fake = self.disc(x, y), self.disc(x, fake.detach())
        ld = 0.5 * (self.bce(d_real, torch.ones_like(d_real)) + self.bce(d_fake, torch.zeros_like(d_fake)))
        self.opt_d.zero_grad()
        ld.backward()
        self.opt_d.step()
        # generator
        d_fake = self.disc(x, fake)
        return self.bce(d_fake, torch.ones_like(d_fake)) + self.l1_weight * F.l1_loss(fake, y)


# --------------------------------------------------------------------------- training
def _self_supervised_method(method, lows):
    """Resolve ``ss_method`` and the structN2V blind-spot width from the data."""
    if method not in SS_METHODS:
        raise InputError(f"unknown self-supervised method {method!r}; choose one of {', '.join(SS_METHODS)}")
    sc = float(np.median([estimate_scan_correlation(x) for x in lows]))
    return method, sc


def _noise2noise_pairs(low, low2, bar, min_corr):
    a_list, b_list = _as_list(low, "first-scan"), _as_list(low2, "second-scan")
    if len(a_list) != len(b_list):
        raise InputError(f"got {len(a_list)} first and {len(b_list)} second scans; Noise2Noise needs "
                         "two scans of every field")
    out = []
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        ag, bg = as_gray(a, f"scan A {i + 1}"), as_gray(b, f"scan B {i + 1}")
        if ag.shape != bg.shape:
            raise InputError(f"field {i + 1}: the two scans have different shapes {ag.shape} and {bg.shape}")
        ac, crop = crop_data_bar(ag, bar)
        t, bt, le, r = crop
        bc = bg[t:bg.shape[0] - bt, le:bg.shape[1] - r]
        try:  # each scan is the input once; the other is moved onto it
            for x, y in ((ac, bc), (bc, ac)):
                xr, yr, _, _ = register_pair(x, y, min_corr=min_corr)
                lohi = percentile_range(xr)  # the input's own scale, as at inference
                out.append((normalize(xr, lohi=lohi), normalize(yr, lohi=lohi)))
        except InputError as e:
            raise InputError(f"field {i + 1}: {e}") from None
    return out


def _training_pairs(mode, low, high, low2, degradation, estimate_from, bar, min_corr, ss_method, rng):
    """(pairs, make_pairs or None, degradation or None, info dict) for a training mode."""
    info: dict = {}
    if mode == "paired":
        if low is None or high is None:
            raise InputError("paired training needs both low- and high-quality images")
        return _prepare_pairs(low, high, bar, min_corr), None, None, info
    if mode == "noise2noise":
        if low is None or low2 is None:
            raise InputError("Noise2Noise training needs two scans of every field (low and low2)")
        return _noise2noise_pairs(low, low2, bar, min_corr), None, None, info
    if mode == "degrade":
        if high is None:
            raise InputError("degradation training needs high-quality images")
        highs = [normalize(crop_data_bar(as_gray(h, f"high image {i + 1}"), bar)[0])
                 for i, h in enumerate(_as_list(high, "high"))]
        if estimate_from is not None:
            exs = [crop_data_bar(as_gray(e, "low-quality example"), bar)[0]
                   for e in _as_list(estimate_from, "low")]
            deg = estimate_degradation_many(exs, highs[0])
            if degradation is not None:  # explicit settings override estimated ones
                deg = Degradation(**{**deg.to_dict(), **Degradation.given(degradation)})
        else:
            deg = Degradation.parse(degradation)

        def make_pairs():
            return [(normalize(degrade(h, deg, rng)), h) for h in highs]

        return make_pairs(), make_pairs, deg, info
    if low is None:
        raise InputError("self-supervised training needs low-quality images")
    lows = [normalize(crop_data_bar(as_gray(x, f"low image {i + 1}"), bar)[0])
            for i, x in enumerate(_as_list(low, "low"))]
    method, sc = _self_supervised_method(ss_method, lows)
    info.update(method=method, scan_corr=sc)
    if method == "lines-ssim":  # the noise level of the targets, for the noise-corrected SSIM
        nz = [estimate_noise(x) for x in lows]
        info["noise"] = (float(np.median([n[0] for n in nz])), float(np.median([n[1] for n in nz])))
    if method in LINE_METHODS:
        pairs = [p for x in lows for p in line_pairs(x)]
    else:
        pairs = [(x, x) for x in lows]
    return pairs, None, None, info


def _check_train_args(mode, loss, steps, batch_size, crop):
    if mode not in MODES:
        raise InputError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
    if loss == GAN_LOSS:
        if mode not in ("paired", "degrade"):
            raise InputError("pix2pix (GAN) training needs clean targets: use it with paired or degrade mode")
    else:
        restoration_loss(loss)  # validate
    if steps < 1 or batch_size < 1:
        raise InputError("steps and batch size must be ≥ 1")
    if crop < 32 or crop % 8:
        raise InputError(f"crop {crop} must be a multiple of 8 and ≥ 32")


def train_restore(
    low=None,
    high=None,
    mode: str | None = None,
    loss: str = "ssim",
    degradation: Degradation | dict | str | None = None,
    estimate_from=None,
    steps: int = 300,
    batch_size: int = 4,
    crop: int = 128,
    lr: float = 2e-3,
    base: int = 16,
    depth: int = 3,
    norm: str = "batch",
    bar: int | str | None = "auto",
    min_corr: float = 0.3,
    val_fraction: float = 0.2,
    val_every: int = 25,
    n2v_fraction: float = 0.02,
    blind_x: int | str = "auto",
    ss_method: str = "lines-ssim",
    low2=None,
    seed: int | None = 0,
    device="auto",
    preview: bool = True,
):
    """Train a restoration U-Net; a job generator yielding loss and validation SSIM.

    ``mode``: ``paired`` (``low`` and ``high`` lists of images of the same
    fields), ``degrade`` (``high`` only, plus ``degradation`` settings or
    low-quality example(s) ``estimate_from`` to estimate them from),
    ``self-supervised`` (``low`` only; ``ss_method`` ``lines-ssim``, ``lines``,
    ``nb2nb`` or ``n2v``, see :data:`SS_METHODS`) or ``noise2noise`` (``low`` and ``low2``:
    two fast scans of every field). ``None`` picks from what is given.
    ``loss="pix2pix"`` trains a GAN (paired/degrade only; it can fabricate).
    Cancelling (``JobCancelled``) returns the best model so far (by validation
    SSIM, or validation loss when there is no clean target).
    """
    if mode is None:
        mode = ("paired" if (low is not None and high is not None) else
                "noise2noise" if (low is not None and low2 is not None) else
                "degrade" if high is not None else "self-supervised")
    _check_train_args(mode, loss, steps, batch_size, crop)
    rng = np.random.default_rng(seed)
    seed_everything(seed if seed is not None else int(rng.integers(1 << 31)))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    dev = resolve_device(device)

    pairs, make_pairs, deg, info = _training_pairs(mode, low, high, low2, degradation, estimate_from, bar,
                                                   min_corr, ss_method, rng)
    method = info.get("method")
    noisy_target = mode in ("self-supervised", "noise2noise")
    augment = {"lines": "hflip", "lines-ssim": "hflip", "nb2nb": "flips", "n2v": "flips"}.get(method, "full")
    if method == "n2v" and blind_x == "auto":  # structured blind spot when the noise is correlated along rows
        blind_x = int(math.ceil(2 * info["scan_corr"])) if info["scan_corr"] >= 0.3 else 0
    if method == "n2v" and blind_x == 0:
        augment = "full"  # white noise: rotations are harmless

    small = [p[0].shape for p in pairs if min(p[0].shape) < 32]
    if small:
        raise InputError(f"training images must be at least 32×32 pixels after cropping; got {small[0]}")
    crop = min(crop, *[min(p[0].shape) // 8 * 8 for p in pairs])
    train_pairs, val_pairs = _val_split(pairs, crop, val_fraction)

    net = RestoreNet(base=base, depth=depth, norm=norm).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999) if loss == GAN_LOSS else (0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = (_Pix2Pix(net, dev, steps) if loss == GAN_LOSS else
               noisy_ssim_loss(*info["noise"]) if method == "lines-ssim" else
               restoration_loss("mse" if noisy_target else loss))
    loss_name = (GAN_LOSS if loss == GAN_LOSS else NOISY_SSIM_LOSS if method == "lines-ssim" else
                 "mse" if noisy_target else loss)
    vrng = np.random.default_rng(12345)
    vmult = max(net.multiple, 2 * net.multiple if method == "nb2nb" else 0)
    val_batch = (_random_crops(val_pairs, 8, crop, vrng, augment=False, multiple=vmult) if val_pairs else
                 _random_crops(train_pairs, 4, crop, vrng, augment=False, multiple=vmult))
    if method == "n2v":
        vm, vmask = _n2v_mask(val_batch[0].numpy(), vrng, n2v_fraction, blind_x=blind_x)
        val_n2v = (torch.from_numpy(vm), torch.from_numpy(vmask))
    vgen = torch.Generator().manual_seed(4321)

    meta = {
        "capability": CAPABILITY,
        "arch": dict(net.arch),
        "train": dict(mode=mode, loss=loss_name,
                      steps=steps, batch_size=batch_size, crop=crop, lr=lr,
                      seed=seed, n_images=len(pairs), val_fraction=val_fraction,
                      ss_method=method,
                      n2v_fraction=n2v_fraction if method == "n2v" else None,
                      blind_x=blind_x if method == "n2v" else None,
                      degradation=deg.to_dict() if deg is not None else None,
                      noise=list(info["noise"]) if "noise" in info else None),
        "normalization": {"method": "percentile", "low": 1.0, "high": 99.8},
        "inference": "lines" if method in LINE_METHODS else "direct",
        "tta": "flips" if method == "lines-ssim" else None,
        "gan": loss == GAN_LOSS,
        "output": "image",
    }
    best = {"score": -np.inf, "state": copy.deepcopy(net.state_dict()), "step": 0, "val": None}
    throttle = Throttle(1.0)
    history = []

    def batch_loss(x, y, on_val=False):
        """Loss of one batch (input x, target y) for the chosen method."""
        if method == "n2v":
            if on_val:
                xm, mk = val_n2v
            else:
                xm, mk = (torch.from_numpy(a) for a in _n2v_mask(x.numpy(), rng, n2v_fraction, blind_x=blind_x))
            p = net(xm.to(dev))
            mk = mk.to(dev)
            return ((p - x.to(dev)) ** 2 * mk).sum() / mk.sum()
        if method == "nb2nb":
            return nb2nb_loss(net, x.to(dev), vgen if on_val else gen)
        if loss == GAN_LOSS and not on_val:
            return loss_fn(x.to(dev), y.to(dev), opt)
        if on_val and method != "lines-ssim":
            return F.mse_loss(net(x.to(dev)), y.to(dev))
        return loss_fn(net(x.to(dev)), y.to(dev))

    def validate():
        net.eval()
        with torch.no_grad():
            pred = net(val_batch[0].to(dev)).cpu()
            if noisy_target:  # no clean target: the self-supervised loss on held-out data
                if method == "nb2nb":
                    vgen.manual_seed(4321)
                score, vs = -float(batch_loss(val_batch[0], val_batch[1], on_val=True)), None
            else:
                vs = float(ssim(pred, val_batch[1]))
                score = vs
        net.train()
        return score, vs, pred

    def result():
        net.load_state_dict(best["state"])
        net.eval()
        m = dict(meta)
        m["train"] = dict(meta["train"], best_step=best["step"], val_ssim=best["val"],
                          steps_done=len(history))
        return RestoreModel(net, m)

    net.train()
    step = 0
    try:
        for step in range(1, steps + 1):
            if make_pairs is not None and step % 20 == 0:
                train_pairs, _ = _val_split(make_pairs(), crop, val_fraction)
            x, y = _random_crops(train_pairs, batch_size, crop, rng, augment=augment,
                                 multiple=2 * net.multiple if method == "nb2nb" else net.multiple)
            lval = batch_loss(x, y)
            opt.zero_grad()
            lval.backward()
            opt.step()
            sched.step()
            lv = float(lval.detach())
            if not np.isfinite(lv):
                raise LeaksegError("training diverged (loss is NaN); try a lower learning rate")
            history.append(lv)
            metrics = {"loss": lv}
            prev = None
            if step % val_every == 0 or step == steps:
                score, vs, pred = validate()
                if score > best["score"]:
                    best.update(score=score, state=copy.deepcopy(net.state_dict()), step=step, val=vs)
                metrics["val_ssim"] = vs
                if noisy_target:
                    metrics["val_loss"] = -score
                if preview and throttle():
                    prev = pred[0, 0].numpy()
            msg = f"step {step}/{steps} loss {lv:.4f}"
            if metrics.get("val_ssim") is not None:
                msg += f" val SSIM {metrics['val_ssim']:.3f}"
            yield Progress(step, steps, msg, preview=prev, metrics=metrics)
    except JobCancelled:
        if best["step"] == 0 and step > 1:  # no validation yet: keep the current weights
            best.update(state=copy.deepcopy(net.state_dict()), step=step)
        return result()
    return result()


def train(*args, callback=None, **kw) -> RestoreModel:
    """Run :func:`train_restore` to the end (or until ``callback`` returns False)."""
    return run_job(train_restore(*args, **kw), callback).value


# --------------------------------------------------------------------------- inference
#: output intensity scales: the input's dtype and range (default), the input's
#: scale as float32, or the normalised training scale (≈ 0–1, float32)
OUTPUTS = ("input", "float", "normalized")


def _tile_fn(net, dev, metadata):
    fn = numpy_fn(net, dev, multiple=net.multiple)
    fn = lines_fn(fn) if (metadata or {}).get("inference") == "lines" else fn
    return flips_fn(fn) if (metadata or {}).get("tta") == "flips" else fn


def predictor_from_model(state_dict, metadata, device="auto") -> Predictor:
    """A :class:`~napari_leakseg.core.predictor.Predictor` for ``leakseg apply`` (normalised output)."""
    net = _build(state_dict, metadata, device)
    dev = next(net.parameters()).device
    return Predictor(fn=_tile_fn(net, dev, metadata), in_channels=1, out_channels=1,
                     finalize=lambda b: np.asarray(b)[0].astype(np.float32), output="image",
                     halo=32, tile=512, capability=CAPABILITY, metadata=metadata)


def _get_model(model, device) -> RestoreModel:
    if isinstance(model, RestoreModel):
        net = model.net.to(resolve_device(device)).eval()
        return RestoreModel(net, model.metadata)
    return RestoreModel.load(model, device=device)


#: smallest tile restoration accepts (the U-Net pads to multiples of 2**depth by reflection)
MIN_TILE = 32


def _check_output(output):
    if output not in OUTPUTS:
        raise InputError(f"unknown output scale {output!r}; choose one of {', '.join(OUTPUTS)}")


def input_scale_fit(restored, image) -> tuple[float, float]:
    """Gain and offset that put a restoration on the input's intensity scale.

    Least squares of the input on the restoration: the input is the signal plus
    zero-mean noise, so the fit is unbiased by the noise (fitting the other way
    round would be). ``restored``/``image`` may be large or lazy (a strided
    subsample of both is used).
    """
    from .core.normalize import _subsample

    y = _subsample(restored).astype(np.float64).ravel()
    x = _subsample(image).astype(np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    y, x = y[ok], x[ok]
    vy = float(y.var())
    if y.size < 2 or vy <= 1e-20:
        return 1.0, 0.0
    g = float(((y - y.mean()) * (x - x.mean())).mean() / vy)
    return g, float(x.mean() - g * y.mean())


def _cast_like(y, dtype):
    """Round and clip to an integer dtype's range (kept as float32 when ``dtype`` is float)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max)
    return y


def _to_input_scale(y, g, nb, dtype, output):
    """Map a normalised restoration ``y`` onto the input ``g`` (2D float32), bar rows copied back."""
    gain, off = input_scale_fit(y[: y.shape[0] - nb] if nb else y, g[: g.shape[0] - nb] if nb else g)
    out = (gain * y.astype(np.float64) + off).astype(np.float32)
    if nb:  # the instrument's data bar is not restored: keep it as it was
        out[-nb:] = g[-nb:]
    if output == "input":
        out = _cast_like(out, dtype).astype(dtype if np.dtype(dtype).kind in "iu" else np.float32)
    return out


def _rescale_out(out, src, dtype, output, band: int = 1024):
    """In-place mapping of a (1, Y, X) zarr/numpy output onto the input scale, in row bands."""
    gain, off = input_scale_fit(out[0], src)
    for y0 in range(0, out.shape[1], band):
        v = gain * np.asarray(out[0, y0:y0 + band], np.float64) + off
        out[0, y0:y0 + band] = (_cast_like(v, dtype) if output == "input" else v).astype(np.float32)
    return out


def output_dtype(image, output="input"):
    """The dtype :func:`iter_restore` returns for ``image`` (bool/float → float32)."""
    dt = np.dtype(getattr(image, "dtype", np.float32))
    return dt if (output == "input" and dt.kind in "iu") else np.dtype(np.float32)


def iter_restore(model, image, tile: int = 512, overlap: int = 48, device="auto", out=None,
                 exclude_bar: bool = True, output: str = "input"):
    """Restore one 2D image (numpy, zarr or dask; gray or RGB); a job generator.

    The input is normalised with its own percentiles (computed without the data
    bar when one is detected) and processed in overlapping blended tiles, so
    memory is bounded for huge images (pass a zarr ``out`` of shape (1, Y, X)).

    ``output``: ``"input"`` (default) returns the restoration on the input's
    intensity scale *and dtype* (uint8 in → uint8 out, rounded and clipped to
    the dtype's range; float in → float32), placed there by a least-squares
    fit to the input (:func:`input_scale_fit`), with the detected data bar
    copied unchanged; ``"float"`` the same scale as float32 without rounding or
    clipping; ``"normalized"`` float32 in the normalised scale of the training
    target (≈ [0, 1]). A zarr ``out`` is float32: it holds the values, cast
    them with :func:`output_dtype`.
    """
    check_tile(tile, overlap, MIN_TILE)
    _check_output(output)
    rm = _get_model(model, device)
    net = rm.net
    dev = next(net.parameters()).device
    shape = tuple(getattr(image, "shape", ()))
    big = len(shape) == 2 and shape[0] * shape[1] > 4096 * 4096
    nb = 0
    if big:  # stay lazy: only a strided sample for the percentiles
        check_image(image, "image")
        src = image
        lohi = percentile_range(image)
    else:
        g = as_gray(image, "image")
        nb = detect_data_bar(g) if exclude_bar else 0
        lohi = percentile_range(g[: g.shape[0] - nb] if nb else g)
        src = g
    lo, hi = lohi
    scale = 1.0 / max(hi - lo, 1e-8)

    class _CYX:  # a lazy (1, Y, X) view for the tiler
        def __init__(self, a):
            self.a = a
            self.shape = (1,) + tuple(a.shape)
            self.ndim = 3

        def __getitem__(self, sl):
            return np.asarray(self.a[sl[1:]], np.float32)[None]

    fn = _tile_fn(net, dev, rm.metadata)
    res = yield from iter_tiled(fn, _CYX(src), tile=tile, overlap=overlap, out=out,
                                preprocess=lambda t: (t.astype(np.float32) - lo) * scale)
    dtype = output_dtype(image, output)
    if out is not None:
        return res if output == "normalized" else _rescale_out(res, src, dtype, output)
    if output == "normalized":
        return res[0]
    return _to_input_scale(res[0], src, nb, dtype, output)


def restore_image(model, image, tile: int = 512, overlap: int = 48, device="auto", out=None,
                  callback=None, output: str = "input") -> np.ndarray:
    """Restore a 2D image or a stack (N, Y, X); see :func:`iter_restore` (``output`` scale)."""
    check_tile(tile, overlap, MIN_TILE)
    rm = _get_model(model, device)
    a = image
    if getattr(a, "ndim", np.ndim(a)) == 3 and a.shape[-1] not in (3, 4):
        return np.stack([restore_image(rm, a[i], tile, overlap, device, output=output)
                         for i in range(a.shape[0])])
    return run_job(iter_restore(rm, a, tile, overlap, device, out, output=output), callback).value


# --------------------------------------------------------------------------- fabrication check
def detect_blobs(img, min_sigma: float = 1.5, max_sigma: float = 8.0, threshold: float = 0.05,
                 num_sigma: int = 7, min_contrast: float = 0.08) -> np.ndarray:
    """Bright blobs (particles) by Laplacian of Gaussian: array (N, 3) of (y, x, radius).

    The image is percentile-normalised first so that thresholds are comparable
    between a noisy input, a restoration and a reference. A LoG response is
    kept only if the blob is brighter than its surroundings all around: its
    core (0.6 r) exceeds the 75th percentile of the ring 1.5 r–2.5 r by
    ``min_contrast``; this rejects responses on the rims of large particles.
    """
    from skimage.feature import blob_log

    x = np.clip(normalize(np.asarray(img, np.float32)), 0, 1)
    b = blob_log(x, min_sigma=min_sigma, max_sigma=max_sigma, num_sigma=num_sigma,
                 threshold=threshold, exclude_border=int(max_sigma))
    if b.size == 0:
        return np.zeros((0, 3), np.float32)
    b = b.astype(np.float32)
    b[:, 2] *= math.sqrt(2)
    keep = []
    H, W = x.shape
    for y, xx, r in b:
        R2 = int(math.ceil(2.5 * r)) + 1
        y0, y1 = max(0, int(y) - R2), min(H, int(y) + R2 + 1)
        x0, x1 = max(0, int(xx) - R2), min(W, int(xx) + R2 + 1)
        patch = x[y0:y1, x0:x1]
        yy, xg = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(yy - y, xg - xx)
        core = patch[d <= max(0.6 * r, 1.0)]
        ring = patch[(d >= 1.5 * r) & (d <= 2.5 * r)]
        keep.append(core.size > 0 and ring.size > 0 and
                    float(core.mean()) - float(np.percentile(ring, 75)) >= min_contrast)
    return b[np.array(keep, bool)]


def match_blobs(found: np.ndarray, reference: np.ndarray, tol: float = 3.0):
    """Match blobs by position (Hungarian, distance ≤ max(tol, radius)).

    Returns ``(fabricated_idx, missed_idx, matched_pairs)``: indices into ``found``
    without a reference partner, indices into ``reference`` not found.
    """
    from scipy.optimize import linear_sum_assignment

    nf, nr = len(found), len(reference)
    if nf == 0 or nr == 0:
        return np.arange(nf), np.arange(nr), np.zeros((0, 2), int)
    d = np.hypot(found[:, None, 0] - reference[None, :, 0], found[:, None, 1] - reference[None, :, 1])
    lim = np.maximum(tol, 0.75 * np.maximum(found[:, None, 2], reference[None, :, 2]))
    cost = np.where(d <= lim, d, 1e6)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < 1e6
    pairs = np.stack([r[ok], c[ok]], 1)
    fab = np.setdiff1d(np.arange(nf), pairs[:, 0])
    mis = np.setdiff1d(np.arange(nr), pairs[:, 1])
    return fab, mis, pairs


def fabrication_check(restored, reference, tol: float = 3.0, **blob_kw) -> dict:
    """Count fabricated and missed particles of ``restored`` against ``reference``.

    Returns a dict with ``fabricated``, ``missed``, ``n_restored``, ``n_reference``
    and the blob arrays ``fabricated_blobs`` / ``missed_blobs`` (y, x, r).
    """
    a = np.asarray(restored, np.float32)
    b = np.asarray(reference, np.float32)
    if a.shape != b.shape:
        raise InputError(f"restored {a.shape} and reference {b.shape} images must have the same shape")
    fb, rb = detect_blobs(a, **blob_kw), detect_blobs(b, **blob_kw)
    fab, mis, pairs = match_blobs(fb, rb, tol)
    return {"fabricated": int(len(fab)), "missed": int(len(mis)), "n_restored": int(len(fb)),
            "n_reference": int(len(rb)), "fabricated_blobs": fb[fab], "missed_blobs": rb[mis]}


def fabrication_risk_map(noisy, restored, scales: Sequence[float] = (1.0, 2.0, 4.0)) -> np.ndarray:
    """No-reference fabrication risk: z-score of structure the restoration adds.

    If the restoration were the true signal, ``input − restored`` would be pure
    noise. Where the restoration invents (or removes) a structure, the residual
    has a local mean that is significantly non-zero. For each scale the
    residual is smoothed, divided by the local Poisson–Gaussian noise level
    (estimated from the input) and calibrated robustly (MAD over the image, so
    spatially correlated noise is handled); the map is the maximum |z| over
    scales. Values above ~4 mark unsupported structure. Returns float32 (Y, X).
    """
    x = as_gray(noisy, "input")
    r = np.asarray(restored, np.float32)
    if r.shape != x.shape:
        raise InputError(f"input {x.shape} and restored {r.shape} images must have the same shape")
    xn = _clean_scale(x)
    rm = match_intensity(r, xn)
    a, s = estimate_noise(xn)
    sigma = np.sqrt(np.maximum(a * np.clip(rm, 0, None) + s * s, 1e-8)).astype(np.float32)
    resid = (xn - rm) / sigma
    z = np.zeros_like(resid)
    for sc in scales:
        m = ndi.gaussian_filter(resid, sc)
        mad = float(np.median(np.abs(m - np.median(m)))) * 1.4826
        z = np.maximum(z, np.abs(m) / max(mad, 1e-8))
    return z.astype(np.float32)


def iter_apply(model, image, risk_map: bool = False, tile: int = 512, overlap: int = 48, device="auto",
               output: str = "input"):
    """Restore a 2D image (gray/RGB) or a stack (N, Y, X[, C]); a job generator.

    Returns ``{"restored": array, "risk": float32 or None, "done": n}``; the
    shape is the input's without a colour axis, the scale and dtype as chosen
    by ``output`` (see :func:`iter_restore`; default: the input's). Cancelling returns the slices
    done so far (the rest stay 0).
    """
    rm = _get_model(model, device)
    a = image
    rgb = getattr(a, "ndim", np.ndim(a)) >= 3 and a.shape[-1] in (3, 4) and a.shape[-2] > 4
    if getattr(a, "ndim", np.ndim(a)) - (1 if rgb else 0) == 2:
        slices = [a]
        stack = False
    else:
        if getattr(a, "ndim", np.ndim(a)) - (1 if rgb else 0) != 3:
            raise InputError(f"expected a 2D image or a stack of 2D images; got shape {tuple(a.shape)}")
        slices = [a[i] for i in range(a.shape[0])]
        stack = True
    outs, risks = [], []
    done = 0
    try:
        for i, s in enumerate(slices):
            s = np.asarray(s)
            y = yield from iter_restore(rm, s, tile=tile, overlap=overlap, device=device, output=output)
            outs.append(y)
            if risk_map:
                risks.append(fabrication_risk_map(s, y))
            done += 1
            yield Progress(i + 1, len(slices), f"restored {i + 1}/{len(slices)}",
                           metrics={"slice": i})
    except JobCancelled:
        if not outs:
            raise
    shape = outs[0].shape
    while len(outs) < len(slices):
        outs.append(np.zeros(shape, outs[0].dtype))
        if risk_map:
            risks.append(np.zeros(shape, np.float32))
    restored = np.stack(outs) if stack else outs[0]
    risk = (np.stack(risks) if stack else risks[0]) if risk_map else None
    return {"restored": restored, "risk": risk, "done": done}
