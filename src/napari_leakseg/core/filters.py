"""A multiscale filter bank in torch (ilastik-style pixel features), on any device.

For each input channel and each scale sigma it computes the Gaussian-smoothed
intensity, the gradient magnitude, the Laplacian of Gaussian, the two Hessian
eigenvalues and the two structure-tensor eigenvalues (derivatives
scale-normalised by sigma), plus the raw channel: ``1 + 7 * len(sigmas)``
features per channel. Large scales are computed on a downsampled copy and
upsampled bilinearly, so the cost stays nearly flat in sigma.

Plain torch; nothing here imports a capability module, napari or Qt.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_SIGMAS", "FEATURES_PER_SCALE", "FEATURE_SETS", "n_features", "gaussian_blur",
           "multiscale_features", "standardize", "rgb_to_lab"]

DEFAULT_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
FEATURES_PER_SCALE = ("gaussian", "gradient", "log", "hessian_1", "hessian_2", "structure_1", "structure_2")
#: named feature sets: (kinds per scale, raw channel included)
FEATURE_SETS = {
    "full": (FEATURES_PER_SCALE, True),
    # the kinds of skimage's multiscale_basic_features (intensity, edges, texture), no raw channel
    "basic": (("gaussian", "gradient", "hessian_1", "hessian_2"), False),
}


def n_features(in_channels: int, sigmas: Sequence[float] = DEFAULT_SIGMAS, features: str = "full") -> int:
    kinds, raw = FEATURE_SETS[features]
    return int(in_channels) * (int(raw) + len(kinds) * len(sigmas))


def _kernel(sigma: float, size_limit: int, dtype, device) -> torch.Tensor:
    r = max(1, min(int(math.ceil(3.0 * sigma)), size_limit))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _pad(x: torch.Tensor, py: int, px: int) -> torch.Tensor:
    Y, X = x.shape[-2:]
    mode = "reflect" if (py < Y and px < X) else "replicate"
    return F.pad(x, (px, px, py, py), mode=mode)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, Y, X), reflect padding (replicate for tiny images)."""
    if sigma <= 0:
        return x
    N, C, Y, X = x.shape
    k = _kernel(sigma, max(Y, X) - 1, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    ry, rx = min(r, Y - 1) if Y > 1 else 0, min(r, X - 1) if X > 1 else 0
    ky = k[r - ry: r + ry + 1] / k[r - ry: r + ry + 1].sum()
    kx = k[r - rx: r + rx + 1] / k[r - rx: r + rx + 1].sum()
    z = x.reshape(N * C, 1, Y, X)
    z = F.conv2d(_pad(z, ry, 0), ky.view(1, 1, -1, 1))
    z = F.conv2d(_pad(z, 0, rx), kx.view(1, 1, 1, -1))
    return z.reshape(N, C, Y, X)


def _d(z: torch.Tensor, axis: int) -> torch.Tensor:
    """Central difference along y (axis=-2) or x (axis=-1), replicate at the border."""
    if axis == -2:
        p = F.pad(z, (0, 0, 1, 1), mode="replicate")
        return 0.5 * (p[..., 2:, :] - p[..., :-2, :])
    p = F.pad(z, (1, 1, 0, 0), mode="replicate")
    return 0.5 * (p[..., :, 2:] - p[..., :, :-2])


def _eig2(a, b, c):
    """Eigenvalues (larger, smaller) of the symmetric 2x2 [[a, b], [b, c]]."""
    m = 0.5 * (a + c)
    d = torch.sqrt(0.25 * (a - c) ** 2 + b * b + 1e-12)
    return m + d, m - d


def _scale_features(g: torch.Tensor, sigma: float, step: float) -> list[torch.Tensor]:
    """The per-scale features of a smoothed image ``g`` (sampled every ``step`` pixels)."""
    s = sigma / step  # sigma in the pixels of this (possibly downsampled) grid
    gy, gx = _d(g, -2), _d(g, -1)
    gyy, gxx, gxy = _d(gy, -2), _d(gx, -1), _d(gy, -1)
    h1, h2 = _eig2(gyy, gxy, gxx)
    integ = max(0.5, 0.5 * s)
    txx = gaussian_blur(gx * gx, integ)
    txy = gaussian_blur(gx * gy, integ)
    tyy = gaussian_blur(gy * gy, integ)
    t1, t2 = _eig2(tyy, txy, txx)
    n1, n2 = s, s * s  # scale normalisation of first and second derivatives
    return [g, torch.sqrt(gx * gx + gy * gy + 1e-12) * n1, (gxx + gyy) * n2, h1 * n2, h2 * n2,
            torch.sqrt(t1.clamp_min(0)) * n1, torch.sqrt(t2.clamp_min(0)) * n1]


@torch.no_grad()
def multiscale_features(x: torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS, kinds=None,
                        raw: bool = True, downsample: bool = True, features: str | None = None) -> torch.Tensor:
    """(N, C, Y, X) float → (N, C * (1 + 7 * len(sigmas)), Y, X) float features, same device.

    ``features`` names a set of ``FEATURE_SETS`` (it overrides ``kinds`` and ``raw``).

    Scales of 4 and more are computed on a grid downsampled by sigma / 2 (so each blur
    is at most a few pixels wide there) and upsampled bilinearly to full resolution.
    """
    if features is not None:
        kinds, raw = FEATURE_SETS[features]
    x = x.float()
    N, C, Y, X = x.shape
    sel = [FEATURES_PER_SCALE.index(k) for k in (kinds or FEATURES_PER_SCALE)]
    out = [x] if raw else []
    for sigma in sigmas:
        step = max(1.0, min(sigma / 2.0, min(Y, X) / 16.0)) if downsample else 1.0
        if step > 1.0:
            h, w = max(2, int(round(Y / step))), max(2, int(round(X / step)))
            step = 0.5 * (Y / h + X / w)
            pre = math.sqrt(max(sigma ** 2 - (0.5 * step) ** 2, 0.0))  # blur before sampling
            xs = F.interpolate(gaussian_blur(x, min(pre, 0.5 * sigma)), size=(h, w), mode="area")
            rest = math.sqrt(max(sigma ** 2 - min(pre, 0.5 * sigma) ** 2, 0.0)) / step
            g = gaussian_blur(xs, rest)
            feats = _scale_features(g, sigma, step)
            out += [F.interpolate(feats[i], size=(Y, X), mode="bilinear", align_corners=False) for i in sel]
        else:
            feats = _scale_features(gaussian_blur(x, sigma), sigma, 1.0)
            out += [feats[i] for i in sel]
    # order: channel-major within each feature kind is not needed; keep (kind, channel) blocks
    return torch.cat(out, 1)


#: sRGB (linear) → CIE XYZ, D65 white point
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, Y, X) sRGB in [0, 1] (clipped) → CIELAB (D65) divided by 100, so L is in [0, 1].

    The same conversion as ``skimage.color.rgb2lab`` (to float32 precision), on any device.
    Colour differences in Lab follow perception, so regions that look alike are close in it.
    """
    c = x.float().clamp(0.0, 1.0)
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB2XYZ, dtype=lin.dtype, device=lin.device)
    xyz = torch.einsum("kc,ncyx->nkyx", m, lin) / torch.tensor(_WHITE, dtype=lin.dtype, device=lin.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return torch.stack([1.16 * f[:, 1] - 0.16, 5.0 * (f[:, 0] - f[:, 1]), 2.0 * (f[:, 1] - f[:, 2])], 1)


def standardize(f: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Zero-mean unit-variance per feature channel over (N, Y, X); returns (features, (mean, std)).

    Pass the ``stats`` of a training image to apply the same transform to another image.
    """
    if stats is None:
        mean = f.mean(dim=(0, 2, 3), keepdim=True)
        std = f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        mean, std = (s.to(f.device, f.dtype) for s in stats)
    return (f - mean) / std, (mean, std)


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean of (N, C, Y, X) over (2r+1)² windows, replicate padding.

    Running sums in float64 (O(1) per pixel, exact to float32); on MPS, which has no float64,
    separable average pooling (4× slower on a CPU, same result to 1e-6).
    """
    if r <= 0:
        return x
    k = 2 * r + 1
    if x.device.type == "mps":
        return _box_mean_pooled(x, r)
    c = F.pad(x.double(), (r + 1, r, r + 1, r), mode="replicate").cumsum(-2)
    c = (c[..., k:, :] - c[..., :-k, :]).cumsum(-1)
    return ((c[..., k:] - c[..., :-k]) / (k * k)).to(x.dtype)


def _box_mean_pooled(x: torch.Tensor, r: int) -> torch.Tensor:
    k = 2 * r + 1
    z = F.pad(x, (r, r, r, r), mode="replicate")
    return F.avg_pool2d(F.avg_pool2d(z, (k, 1), stride=1), (1, k), stride=1)


def guided_filter(guide: torch.Tensor, p: torch.Tensor, r: int, eps: float, band: int = 512) -> torch.Tensor:
    """Edge-preserving smoothing of ``p`` (N, K, Y, X) by a multi-channel ``guide`` (N, C, Y, X).

    He, Sun and Tang, "Guided image filtering" (TPAMI 2013): in each (2r+1)² window ``p`` is
    modelled as a linear function of the guide's channels (ridge ``eps``), and the window models
    are averaged. Where the guide has an edge the output keeps it; elsewhere ``p`` is smoothed.
    Each output pixel depends on inputs within 2r; big images run in bands of ``band`` rows.
    """
    N, C, Y, X = guide.shape
    if r <= 0:
        return p
    if Y > band + 4 * r and Y * X > 1024 * 1024:  # bounded memory: bands with a 2r halo
        out, h = [], 2 * r
        for y0 in range(0, Y, band):
            a, b = max(0, y0 - h), min(Y, y0 + band + h)
            out.append(guided_filter(guide[:, :, a:b], p[:, :, a:b], r, eps, band)[:, :, y0 - a:y0 - a + min(band, Y - y0)])
        return torch.cat(out, 2)
    K = p.shape[1]
    mI = box_mean(guide, r)
    iu = torch.triu_indices(C, C)
    prod = guide[:, iu[0]] * guide[:, iu[1]]
    cov_u = box_mean(prod, r) - mI[:, iu[0]] * mI[:, iu[1]]
    S = torch.empty(N, Y, X, C, C, dtype=guide.dtype, device=guide.device)
    S[..., iu[0], iu[1]] = cov_u.permute(0, 2, 3, 1)
    S[..., iu[1], iu[0]] = cov_u.permute(0, 2, 3, 1)
    S = S + eps * torch.eye(C, dtype=guide.dtype, device=guide.device)
    Sinv = torch.linalg.inv(S)                                          # (N, Y, X, C, C)
    mp = box_mean(p, r)
    Ip = box_mean((guide[:, None] * p[:, :, None]).reshape(N, K * C, Y, X), r).reshape(N, K, C, Y, X)
    cov_p = Ip - mp[:, :, None] * mI[:, None]
    a = torch.einsum("nyxcd,nkdyx->nkcyx", Sinv, cov_p)
    b = mp - torch.einsum("nkcyx,ncyx->nkyx", a, mI)
    ma = box_mean(a.reshape(N, K * C, Y, X), r).reshape(N, K, C, Y, X)
    return torch.einsum("nkcyx,ncyx->nkyx", ma, guide) + box_mean(b, r)


def principal_axes(f: torch.Tensor, n: int, max_samples: int = 20_000) -> torch.Tensor:
    """(n, F) projection onto the top ``n`` principal components of standardised features
    (N, F, Y, X), each scaled to unit variance; estimated on a strided sample."""
    N, F_, Y, X = f.shape
    v = f.permute(1, 0, 2, 3).reshape(F_, -1)
    v = v[:, ::max(1, v.shape[1] // max_samples)].double()
    v = v - v.mean(1, keepdim=True)
    evals, evecs = torch.linalg.eigh(v @ v.T / max(1, v.shape[1] - 1))
    order = torch.argsort(evals, descending=True)[:n]
    return (evecs[:, order] / evals[order].clamp_min(1e-12).sqrt()).T.to(f.dtype)
