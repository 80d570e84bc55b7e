"""Scribble-guided (or unsupervised) segmentation by differentiable feature clustering.

The method of Kim, Kanezaki and Tanaka, "Unsupervised Learning of Image
Segmentation Based on Differentiable Feature Clustering", IEEE TIP 29 (2020).
A tiny fully-convolutional network is trained on the one image it segments:
its argmax pseudo-labels are the targets of a cross-entropy (feature
similarity) loss, an L1 penalty on the spatial gradient of the response map
keeps regions coherent (continuity), and optional scribbles add a supervised
cross-entropy term.

Two configurations live here:

``config="paper"``
    The reference: q = 100 channels, nConv = 2, zero padding, SGD (lr 0.1,
    momentum 0.9), full resolution, mu_sim = mu_con = 1, mu_scr = 0.5, stop
    when the number of labels is at most minLabels (3 or the number of
    scribble classes), up to 1000 iterations, no post-processing.

``config="fast"`` (default)
    Interactive on a CPU: q = 32, replicate padding (no 1-pixel border strips),
    Adam, training on a downsampled copy (about 40k pixels) and prediction at
    full resolution with frozen BatchNorm statistics, an early stop on the
    pseudo-label change rate, and post-processing that merges components
    smaller than ``min_size`` into their neighbours and relabels compactly.
    Without scribbles, adjacent regions whose mean colour differs by less than
    ``merge`` (CIELAB ΔE 12) are then merged, keeping cluster ids (issue 14).

Label conventions: scribbles use 0 = unlabeled and 1..K = classes (ids need not
be consecutive; class k is trained on channel k-1). In the output, scribbled
classes keep their ids and other clusters get ids above K (compact), or with
``classes_only`` every pixel gets the nearest class.

``iter_segment`` is the job generator (see ``core.jobs``); ``segment`` drives it.
Nothing here imports napari or Qt.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.device import resolve_device, seed_everything
from .core.errors import InputError, JobCancelled, LeaksegError, ModelFileError
from .core.filters import DEFAULT_SIGMAS
from .core.jobs import Progress, Throttle, run_job
from .core.labels import check_labels, smallest_uint
from .core.modelcheck import ModelSpec, Param, build_model as checked_model, check_value
from .core.normalize import check_image, percentile_range
from .core.regions import merge_similar_regions, merge_small_components, region_colour

__all__ = [
    "SegmentConfig",
    "CONFIGS",
    "FeatureNet",
    "SegmentResult",
    "iter_segment",
    "segment",
    "predictor_from_model",
    "prepare_image",
    "merge_small_components",
]

MAX_CLASS_ID = 255
COLOURS = ("rgb", "lab")  # colour spaces of the filter bank (RGB images): SegmentConfig.colour, arch


# --------------------------------------------------------------------------- config
@dataclass
class SegmentConfig:
    """All knobs of one configuration (see the module docstring)."""

    q: int = 32                      # feature channels (max number of clusters)
    n_conv: int = 2                  # number of 3x3 conv blocks
    padding_mode: str = "replicate"  # "zeros" is the reference
    optimizer: str = "adam"          # "sgd" (momentum 0.9) is the reference
    lr: float = 0.01
    mu_sim: float = 1.0
    mu_con: float = 5.0              # tuned on 15 BSDS images (docs/benchmarks.md); the reference uses 1
    mu_scr: float = 2.0
    train_pixels: Optional[int] = 40_000  # train on a copy downsampled to about this many pixels; None = full res
    max_iter: int = 150
    min_iter: int = 10
    stop_change: float = 0.02        # stop when the median fraction of changed pseudo-labels is below this ...
    stop_patience: int = 8           # ... over this many iterations (and the number of labels is constant)
    min_labels_stop: bool = False    # reference rule: stop when #labels <= minLabels
    min_labels: int = 3
    scribble_acc: float = 0.9        # no early stop before this accuracy on the scribbled pixels
    min_size: Optional[float] = 0.0001  # merge 4-connected components below this (fraction of area, or pixels if >= 1; at least 8 px)
    smooth: float = 0.0              # Gaussian sigma applied to the input (pixels, full res)
    coords: float = 0.0              # weight of (y, x) position channels added to the input (0 = none)
    input: str = "raw"               # "raw": the image itself (3x3 convs); "filters": a multiscale filter bank
    sigmas: tuple = DEFAULT_SIGMAS   # filter-bank scales (input="filters")
    hidden: int = 32                 # hidden width of the per-pixel network (input="filters")
    features: str = "full"           # filter-bank feature set (core.filters.FEATURE_SETS): "full" or "basic"
    guide_r: int = 0                 # filters: edge-preserving smoothing of the class probabilities (guided
    guide_pcs: int = 5               # filter, window radius in px; 0 = off), guided by this many principal
    guide_eps: float = 0.1           # components of the filter bank, with this ridge (larger = smoother)
    sharpen_iter: int = 0            # filters + scribbles: after training, this many iterations of stronger
    sharpen_sim: float = 3.0         # self-training (similarity weight) with each class's share of the image
                                     # held at the trained result's (see _sharpen)
    colour: str = "rgb"              # filters, RGB images: "lab" computes the filter bank on CIELAB
    balance: bool = False            # class-balanced scribble loss (weights 1 / pixels per class)
    adapt_con: float = 0.0           # > 0: multiply mu_con by this whenever a class's scribbles are not learned
    con_crop: int = 64               # filters + scribbles: continuity on 2 full-resolution crops of this size
    merge: float = 0.0               # unsupervised: merge adjacent regions whose mean colour differs by less
                                     # than this (CIELAB ΔE; 100 × intensity for grey); 0 = off

    def to_dict(self) -> dict:
        return asdict(self)


# Why the filters config sees sigma 1-4 only (stop 28, benchmarks/bench_scribble_forest.py): features at
# sigma 8 and 16 are nearly constant along a 30-60 px stroke, so the per-pixel network can learn *where*
# the strokes are instead of what they look like, and it then paints that decision over large areas.
# With sigma 1-4 (spatial coherence coming from the edge smoothing and the sharpening round instead)
# the mean IoU rose on photos, cells, ISBI, FIB-SEM gala and ovule walls and fell slightly on FIB-SEM
# medulla (tuning draws, then the benchmark).

SINGLE_CLASS_SIGMAS = DEFAULT_SIGMAS  # sigma 1-16: filters config with strokes of one class (or none)

CONFIGS = {
    # scribbles: a per-pixel network on an ilastik-style filter bank (issue 14), trained with the DFC
    # losses on a downsampled grid and the scribble loss on every scribbled pixel at full resolution
    "filters": SegmentConfig(input="filters", q=32, lr=0.01, mu_sim=0.1, mu_con=0.0, mu_scr=1.0,
                             train_pixels=20_000, max_iter=80, min_iter=40, scribble_acc=0.95,
                             min_size=None, guide_r=8, sharpen_iter=10, colour="lab",
                             sigmas=(1.0, 1.5, 2.0, 3.0, 4.0)),  # small scales only (see above)
    "fast": SegmentConfig(merge=12.0),  # merge: chosen on BSDS (benchmarks/bench_scribble.py, issue 14)
    "paper": SegmentConfig(
        q=100, n_conv=2, padding_mode="zeros", optimizer="sgd", lr=0.1, mu_con=1.0, mu_scr=0.5,
        train_pixels=None, max_iter=1000, min_iter=0, stop_change=0.0,
        min_labels_stop=True, min_labels=3, scribble_acc=0.0, min_size=None,
    ),
}


def get_config(config="fast", **overrides) -> SegmentConfig:
    if isinstance(config, SegmentConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = SegmentConfig(**config)
    else:
        if config not in CONFIGS:
            raise LeaksegError(f"unknown config {config!r}; choose one of auto, {', '.join(CONFIGS)}")
        cfg = copy.deepcopy(CONFIGS[config])
    for k, v in overrides.items():
        if v is None:
            continue
        if not hasattr(cfg, k):
            raise LeaksegError(f"unknown setting {k!r}")
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------- network
class FeatureNet(nn.Module):
    """conv3x3 → ReLU → BN, (nConv−1)×[conv3x3 → ReLU → BN], conv1x1 → BN (as the reference)."""

    def __init__(self, in_channels: int, q: int = 32, n_conv: int = 2, padding_mode: str = "replicate"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, q, 3, padding=1, padding_mode=padding_mode)
        self.bn1 = nn.BatchNorm2d(q)
        self.conv2 = nn.ModuleList(
            nn.Conv2d(q, q, 3, padding=1, padding_mode=padding_mode) for _ in range(n_conv - 1)
        )
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(q) for _ in range(n_conv - 1))
        self.conv3 = nn.Conv2d(q, q, 1)
        self.bn3 = nn.BatchNorm2d(q)

    def forward(self, x):
        x = self.bn1(F.relu(self.conv1(x)))
        for conv, bn in zip(self.conv2, self.bn2):
            x = bn(F.relu(conv(x)))
        return self.bn3(self.conv3(x))


class FilterNet(nn.Module):
    """A multiscale filter bank (``core.filters``, standardised by stored statistics) and a per-pixel
    network: conv1x1 → ReLU → conv1x1 → ReLU → conv1x1, giving the q-channel DFC response (no
    BatchNorm: it would force every class channel to zero mean over the image).

    ``forward(x)`` takes normalised image channels; ``head(f)`` takes standardised features (training
    computes the filter bank once and calls ``head``). Context comes from the filters (up to sigma 16).

    With ``guide_r`` > 0 the prediction (``respond``, ``forward``) is the class probabilities after
    an edge-preserving guided filter whose guide is the top ``guide_pcs`` principal components of
    the filter bank (the ``guide`` buffer, fitted on the training image): the spatial coherence that
    a per-pixel classifier lacks, without crossing the edges the features see.
    """

    def __init__(self, in_channels: int, q: int = 32, hidden: int = 32, sigmas=DEFAULT_SIGMAS,
                 features: str = "full", guide_r: int = 0, guide_pcs: int = 0, guide_eps: float = 0.1,
                 colour: str = "rgb"):
        super().__init__()
        self.colour = colour if in_channels == 3 else "rgb"
        from .core.filters import n_features

        self.sigmas = tuple(float(s) for s in sigmas)
        self.feature_set = features
        nf = n_features(in_channels, self.sigmas, features)
        self.register_buffer("mean", torch.zeros(1, nf, 1, 1))
        self.register_buffer("std", torch.ones(1, nf, 1, 1))
        self.head = nn.Sequential(nn.Conv2d(nf, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, q, 1))
        self.guide_r, self.guide_eps = int(guide_r), float(guide_eps)
        if self.guide_r > 0 and guide_pcs > 0:
            self.register_buffer("guide", torch.zeros(int(guide_pcs), nf))
        else:
            self.guide_r = 0

    def bank(self, x):
        """Raw (unstandardised) multiscale features of normalised image channels (N, C, Y, X)."""
        from .core.filters import multiscale_features, rgb_to_lab

        return multiscale_features(rgb_to_lab(x) if self.colour == "lab" else x, self.sigmas,
                                   features=self.feature_set)

    def features(self, x):
        return (self.bank(x) - self.mean) / self.std

    def fit_guide(self, f: torch.Tensor) -> None:
        """Fit the guide's projection to standardised features (N, F, Y, X) of the training image."""
        from .core.filters import principal_axes

        if self.guide_r > 0:
            self.guide.copy_(principal_axes(f, self.guide.shape[0]))

    def respond(self, f: torch.Tensor) -> torch.Tensor:
        """Prediction from standardised features: logits, or guided-filtered probabilities (guide_r > 0)."""
        out = self.head(f)
        if self.guide_r <= 0:
            return out
        from .core.filters import guided_filter

        g = torch.einsum("pf,nfyx->npyx", self.guide, f)
        prob = torch.softmax(out, 1)
        # only the channels that win somewhere are filtered (the others stay out of the argmax):
        # without scribble classes only, most of the q channels are unused
        win = torch.unique(prob.argmax(1))
        res = torch.zeros_like(prob)
        res[:, win] = guided_filter(g, prob[:, win], self.guide_r, self.guide_eps)
        return res

    def forward(self, x):
        return self.respond(self.features(x))


def _arch(in_channels, cfg: SegmentConfig) -> dict:
    if cfg.input == "filters":
        arch = {"kind": "filters", "in_channels": int(in_channels), "q": int(cfg.q), "hidden": int(cfg.hidden),
                "sigmas": [float(v) for v in cfg.sigmas], "features": cfg.features}
        if cfg.guide_r > 0 and cfg.guide_pcs > 0:
            arch.update(guide_r=int(cfg.guide_r), guide_pcs=int(cfg.guide_pcs), guide_eps=float(cfg.guide_eps))
        if cfg.colour == "lab" and int(in_channels) == 3:
            arch["colour"] = "lab"
        return arch
    return {"in_channels": int(in_channels), "q": int(cfg.q), "n_conv": int(cfg.n_conv),
            "padding_mode": cfg.padding_mode}


def build_model(arch: dict) -> nn.Module:
    if arch.get("kind", "conv") == "filters":
        return FilterNet(arch["in_channels"], arch["q"], arch["hidden"], arch["sigmas"], arch.get("features", "full"),
                         arch.get("guide_r", 0), arch.get("guide_pcs", 0), arch.get("guide_eps", 0.1),
                         arch.get("colour", "rgb"))
    return FeatureNet(arch["in_channels"], arch["q"], arch["n_conv"], arch.get("padding_mode", "replicate"))


def _halo(arch: dict) -> int:
    """Context a tile needs on each side for the same prediction as on the whole image."""
    if arch.get("kind", "conv") == "filters":
        return int(math.ceil(3 * max(arch["sigmas"]))) + 16 + 2 * int(arch.get("guide_r", 0))
    return 2 * (arch["n_conv"] + 1)


def _check_saved(arch: dict, meta: dict, sd: dict) -> None:
    need = ("hidden", "sigmas") if arch.get("kind", "conv") == "filters" else ("n_conv",)
    missing = [k for k in need if k not in arch]
    if missing:
        raise ModelFileError(f"the scribble model 'arch' lacks {', '.join(missing)}")
    lut = meta.get("channel_lut")
    if lut is not None and (not isinstance(lut, list) or len(lut) != arch["q"]
                            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 31
                                       for v in lut)):
        raise ModelFileError(f"scribble model 'channel_lut' must be {arch['q']} non-negative integers")
    lohi = (meta.get("normalization") or {}).get("lohi")
    if lohi is not None:
        if not isinstance(lohi, list) or len(lohi) != 2:
            raise ModelFileError("scribble model 'normalization.lohi' must be [low, high]")
        for v in lohi:
            check_value("normalization.lohi", v, Param("float"))
    cfg = (meta.get("train") or {}).get("config")
    if cfg is not None and not isinstance(cfg, dict):
        raise ModelFileError("scribble model 'train.config' must be a JSON object")


#: what a saved scribble model must look like (checked by ``core.modelcheck.build_model``)
MODEL_SPEC = ModelSpec(
    "scribble",
    arch={"kind": Param("str", choices=("conv", "filters")),
          "in_channels": Param("int", 1, 64), "q": Param("int", 2, 4096), "n_conv": Param("int", 1, 64),
          "padding_mode": Param("str", choices=("zeros", "reflect", "replicate", "circular")),
          "hidden": Param("int", 1, 4096), "sigmas": Param("floats", 0.1, 64),
          "features": Param("str", choices=("full", "basic")), "guide_r": Param("int", 0, 256),
          "guide_pcs": Param("int", 0, 64), "guide_eps": Param("float", 1e-6, 1e6),
          "colour": Param("str", choices=COLOURS)},
    required=("in_channels", "q"), defaults={"padding_mode": "replicate"},
    build=build_model, check=_check_saved,
    activation=lambda a: (6 * a["q"] + (a.get("hidden", 0) or 0) * 2
                          + (7 * len(a.get("sigmas") or []) + 1) * a["in_channels"] * 2) * 512 * 512 * 4)


# --------------------------------------------------------------------------- inputs
def prepare_image(image, rgb: Optional[bool] = None, stack: Optional[bool] = None):
    """Validate and normalise an image to float32 (N, C, Y, X) plus info.

    Accepted: (Y, X); (Y, X, C) with C in 1, 3, 4 (alpha dropped); a stack
    (Z, Y, X) when ``stack`` is true or the last axis is not 1/3/4; (Z, Y, X, C).
    Integer (uint8/uint16/...), bool and float data are percentile-normalised
    jointly over channels (colours keep their ratios).
    """
    check_image(image)
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.ndim == 2:
        x = a[None, None]
    elif a.ndim == 3:
        is_rgb = rgb if rgb is not None else (a.shape[-1] in (1, 3, 4) and not stack)
        if stack and rgb is None:
            is_rgb = False
        x = np.moveaxis(a, -1, 0)[None] if is_rgb else a[:, None]
    elif a.ndim == 4:
        if a.shape[-1] not in (1, 2, 3, 4):
            raise InputError(
                f"a 4D image must be (Z, Y, X, C) with C = 1, 3 or 4 channels; got shape {a.shape}")
        x = np.moveaxis(a, -1, 1)
    else:
        raise InputError(f"expected a 2D image, an RGB(A) image or a stack; got shape {a.shape}")
    if x.shape[1] == 4:
        x = x[:, :3]
    elif x.shape[1] == 2:
        x = x[:, :1]
    if min(x.shape[-2:]) < 4:
        raise InputError(f"image is too small to segment (spatial shape {x.shape[-2:]}); need at least 4×4")
    lo, hi = percentile_range(x, 1.0, 99.8)
    xf = x.astype(np.float32)
    if float(np.nanmax(xf)) - float(np.nanmin(xf)) <= 0:
        raise InputError(f"image is constant (every value is {float(xf.flat[0]):g}); there is nothing to segment")
    if hi - lo < 1e-12:
        lo, hi = float(xf.min()), float(xf.max())
    xf = (xf - lo) / (hi - lo)
    return np.ascontiguousarray(xf), {"low": lo, "high": hi, "stack": a.ndim == 4 or x.shape[0] > 1 or bool(stack),
                                      "spatial_shape": tuple(x.shape[-2:]), "n": x.shape[0]}


def prepare_scribbles(scribbles, spatial_shape, n: int, squeeze: bool):
    """Validate scribbles: same spatial shape as the image, integer ids 0..255. Returns (N, Y, X) int64."""
    if scribbles is None:
        return None
    target = spatial_shape if squeeze else (n,) + tuple(spatial_shape)
    s = np.asarray(scribbles)
    if s.shape != tuple(target):
        raise InputError(f"scribbles shape {s.shape} does not match the image's "
                         f"{'spatial ' if squeeze else ''}shape {tuple(target)}")
    s = check_labels(s, target, name="scribbles")
    if int(s.max()) > MAX_CLASS_ID:
        raise InputError(
            f"scribbles have ids up to {int(s.max())}; class ids must be 1..{MAX_CLASS_ID} (0 = unlabeled)")
    s = s.astype(np.int64)
    return s[None] if squeeze else s


# --------------------------------------------------------------------------- post-processing
def _min_size_px(min_size, area: int) -> int:
    if min_size is None:
        return 0
    return max(8, int(round(min_size * area))) if min_size < 1 else int(min_size)


# --------------------------------------------------------------------------- result
@dataclass
class SegmentResult:
    labels: np.ndarray                 # (Y, X) or (N, Y, X) compact uint ids
    state: dict                        # {"state_dict": ..., "metadata": {...}} for warm start / core.store.save
    n_iter: int = 0
    seconds: float = 0.0
    stopped: str = ""                  # "converged", "max_iter", "time_budget", "cancelled", "min_labels"
    history: list = field(default_factory=list)  # per-iteration dicts (iter, t, loss, n_labels, change)
    first_preview_s: Optional[float] = None

    @property
    def n_labels(self) -> int:
        return int(len(np.unique(self.labels)))


def _channel_lut(counts: np.ndarray, K: int, class_ids: list[int], allowed: np.ndarray, classes_only: bool):
    """Map channel index → output id: class channels keep their id, others get K+1.. by channel order."""
    q = counts.shape[0]
    lut = np.zeros(q, np.int64)
    for k in class_ids:
        lut[k - 1] = k
    nxt = K + 1
    for c in range(q):
        if c < K:
            if lut[c] == 0 and counts[c] > 0 and not classes_only:  # unscribbled id slot below K
                lut[c] = nxt
                nxt += 1
            continue
        if allowed[c] and counts[c] > 0:
            lut[c] = nxt
            nxt += 1
    return lut



# --------------------------------------------------------------------------- training data
_FEATURE_CACHE: dict = {}  # one entry: the last image's filter bank (Refine reuses it)


def _filter_bank(model: "FilterNet", x: torch.Tensor, dev) -> torch.Tensor:
    """Raw multiscale features of (N, C, Y, X) ``x`` on ``dev``, cached for the last image seen."""
    from .core.io import content_digest

    key = (content_digest(x.numpy()), model.sigmas, model.feature_set, model.colour, str(dev))
    if key not in _FEATURE_CACHE:
        _FEATURE_CACHE.clear()
        _FEATURE_CACHE[key] = torch.cat([model.bank(x[i:i + 1].to(dev)) for i in range(x.shape[0])])
    return _FEATURE_CACHE[key]


@dataclass
class _TrainData:
    """What one training iteration needs, for either network kind."""

    x_full: torch.Tensor                  # (N, C, Y, X) normalised image (CPU)
    grid: torch.Tensor                    # network input on the downsampled grid (device)
    hw: tuple
    scale: float
    tgt_scr: Optional[torch.Tensor] = None     # scribbles (N, h, w) on the grid, or (P,) at full res
    scr_target: Optional[torch.Tensor] = None  # channel index of each scribbled pixel
    scr_idx: Optional[torch.Tensor] = None     # grid positions of scribbles (raw net) or None
    sim_idx: Optional[torch.Tensor] = None     # grid positions in the similarity loss (None = all)
    scr_feats: Optional[torch.Tensor] = None   # (1, F, 1, P) features of the scribbled pixels (filters)
    raw_full: Optional[torch.Tensor] = None    # raw full-resolution features (filters) ...
    norm: Optional[tuple] = None               # ... and their (mean, std): standardised on demand
    _f_full: Optional[torch.Tensor] = None
    crop: int = 0                              # continuity on full-resolution crops of this size (filters)
    gen: Optional[torch.Generator] = None
    crop_out: Optional[torch.Tensor] = None    # the last iteration's response on the crops

    @property
    def f_full(self) -> torch.Tensor:
        """Standardised full-resolution features, computed on first use (not before the first preview)."""
        if self._f_full is None:
            mean, std = self.norm
            self._f_full = (self.raw_full - mean) / std
        return self._f_full

    def crops(self, n: int = 2) -> torch.Tensor:
        """``n`` random full-resolution crops of the features (continuity at the image's own scale)."""
        N, F_, Y, X = self.f_full.shape
        cy, cx = min(self.crop, Y), min(self.crop, X)
        r = torch.randint(0, 1 << 30, (n, 3), generator=self.gen)
        return torch.stack([self.f_full[int(a) % N, :, int(b) % (Y - cy + 1):int(b) % (Y - cy + 1) + cy,
                                        int(c) % (X - cx + 1):int(c) % (X - cx + 1) + cx] for a, b, c in r])

    def forward(self, model):
        """(grid response (N, q, h, w), logits of the scribbled pixels (P, q) or None)."""
        if self.raw_full is not None and self.scr_feats is None:  # filters, no scribbles: the grid holds features
            return model.head(self.grid), None
        if self.scr_feats is None:  # raw conv net: scribbles live on the grid
            out = model(self.grid)
            if self.scr_idx is None:
                return out, None
            return out, out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])[self.scr_idx]
        N, F_, h, w = self.grid.shape
        flat = self.grid.permute(1, 0, 2, 3).reshape(1, F_, 1, N * h * w)
        parts = [flat, self.scr_feats]
        if self.crop:
            cr = self.crops()
            parts.append(cr.permute(1, 0, 2, 3).reshape(1, F_, 1, -1))
        both = model.head(torch.cat(parts, 3))[0, :, 0]  # one batch: shared BN statistics
        n = N * h * w
        out = both[:, :n].reshape(-1, N, h, w).permute(1, 0, 2, 3)
        P = self.scr_feats.shape[3]
        self.crop_out = both[:, n + P:].reshape(-1, cr.shape[0], cr.shape[2], cr.shape[3]).permute(1, 0, 2, 3) \
            if self.crop else None
        return out, both[:, n:n + P].T

    def class_weights(self, q: int):
        counts = torch.bincount(self.scr_target, minlength=q).float()
        return torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), 1.0)


def _training_data(model, x_np, scr, cfg: SegmentConfig, dev, fit_stats: bool) -> _TrainData:
    N, _, Y, X = x_np.shape
    scale = min(1.0, math.sqrt(cfg.train_pixels / float(N * Y * X if cfg.input == "filters" else Y * X))) \
        if cfg.train_pixels else 1.0
    h, w = max(4, int(round(Y * scale))), max(4, int(round(X * scale)))
    xt = torch.from_numpy(x_np)
    if cfg.smooth > 0:
        from scipy.ndimage import gaussian_filter
        xt = torch.from_numpy(gaussian_filter(x_np, (0, 0, cfg.smooth, cfg.smooth)).astype(np.float32))
    if cfg.coords > 0:
        xt = _add_coords(xt, cfg.coords)

    def down(t):
        return F.interpolate(t, size=(h, w), mode="area" if cfg.input == "filters" else "bilinear",
                             **({} if cfg.input == "filters" else {"align_corners": False, "antialias": True})) \
            if (h, w) != (Y, X) else t

    if cfg.input == "filters":
        raw = _filter_bank(model, xt, dev)
        if fit_stats:  # statistics from a strided sample of about 40k pixels per channel: unbiased, cheap
            from .core.filters import standardize

            step = max(1, math.ceil(math.sqrt(N * Y * X / 40_000)))
            sample, (mean, std) = standardize(raw[:, :, ::step, ::step])
            model.mean.copy_(mean)
            model.std.copy_(std)
            model.fit_guide(sample)  # the standardised sample: the guide's principal axes
        norm = (model.mean, model.std)
        # crops only feed the continuity term: none are cut (or pushed through the network) when it is off
        data = _TrainData(xt, ((down(raw) - norm[0]) / norm[1]).contiguous(), (h, w), scale, raw_full=raw,
                          norm=norm, crop=cfg.con_crop if cfg.mu_con > 0 else 0,
                          gen=torch.Generator().manual_seed(0))
        if scr is None:
            data.crop = 0  # unsupervised: continuity on the grid, as the reference
        else:
            zz, yy, xx = np.nonzero(scr)
            data.tgt_scr = torch.from_numpy(scr[zz, yy, xx]).to(dev)
            data.scr_target = data.tgt_scr - 1
            data.scr_feats = ((raw[zz, :, yy, xx] - norm[0].reshape(1, -1)) / norm[1].reshape(1, -1)) \
                .T[None, :, None, :].contiguous()
        return data
    data = _TrainData(xt, down(xt).to(dev).contiguous(), (h, w), scale)
    if scr is not None:
        if (h, w) != (Y, X):
            small = np.zeros((N, h, w), np.int64)
            zz, yy, xx = np.nonzero(scr)
            small[zz, np.minimum((yy * h) // Y, h - 1), np.minimum((xx * w) // X, w - 1)] = scr[zz, yy, xx]
        else:
            small = scr
        data.tgt_scr = torch.from_numpy(small).to(dev)
        data.scr_idx = (data.tgt_scr > 0).reshape(-1)
        data.scr_target = data.tgt_scr.reshape(-1)[data.scr_idx] - 1
        data.sim_idx = ~data.scr_idx
    return data


# --------------------------------------------------------------------------- the job
def _check_settings(cfg: SegmentConfig, n_segments, time_budget) -> None:
    if n_segments is not None and int(n_segments) < 1:
        raise LeaksegError(f"n_segments must be at least 1, got {n_segments}")
    if time_budget is not None and time_budget <= 0:
        raise LeaksegError(f"time_budget must be positive, got {time_budget}")
    if cfg.max_iter < 1:
        raise LeaksegError(f"max_iter must be at least 1, got {cfg.max_iter}")
    if not cfg.merge >= 0:
        raise LeaksegError(f"merge must be 0 (off) or a positive colour distance, got {cfg.merge}")
    if not (isinstance(cfg.guide_r, (int, np.integer)) and cfg.guide_r >= 0):
        raise LeaksegError(f"edge smoothing (guide_r) must be 0 (off) or a radius in pixels, got {cfg.guide_r}")
    if not cfg.guide_eps > 0 or int(cfg.guide_pcs) < 1:
        raise LeaksegError(f"guide_eps must be positive and guide_pcs at least 1, got {cfg.guide_eps}, "
                           f"{cfg.guide_pcs}")
    if not (isinstance(cfg.sharpen_iter, (int, np.integer)) and cfg.sharpen_iter >= 0):
        raise LeaksegError(f"sharpening (sharpen_iter) must be 0 (off) or a number of iterations, "
                           f"got {cfg.sharpen_iter}")
    if cfg.colour not in COLOURS:
        raise LeaksegError(f"colour must be 'lab' (filter bank on CIELAB) or 'rgb', got {cfg.colour!r}")
    if not cfg.sharpen_sim > 0:
        raise LeaksegError(f"sharpen_sim must be positive, got {cfg.sharpen_sim}")


def iter_segment(
    image,
    scribbles=None,
    *,
    n_segments: Optional[int] = None,
    max_iter: Optional[int] = None,
    time_budget: Optional[float] = None,
    seed: Optional[int] = 0,
    device="auto",
    warm_start: Optional[dict] = None,
    classes_only: bool = False,
    config="auto",
    rgb: Optional[bool] = None,
    stack: Optional[bool] = None,
    preview_interval: float = 0.5,
    **overrides,
):
    """Job generator: yields ``Progress`` (with label-map previews) and returns a :class:`SegmentResult`.

    ``n_segments``: at most this many clusters in the output (unsupervised or
    the scribble classes plus extra clusters); with the paper config it is the
    minLabels stop rule. ``max_iter`` / ``time_budget`` (seconds) bound the
    training; with strokes the filters config then runs its ``sharpen_iter``
    iterations of share-matched self-training (:func:`_sharpen`), unless the
    time budget is spent. ``warm_start``: a previous result's ``state`` (continue training
    from its weights, e.g. after adding strokes). ``classes_only``: every pixel
    gets one of the scribbled classes. Cancelling (``JobCancelled``) returns the
    result of the current weights.
    """
    t_start = time.perf_counter()
    if isinstance(config, str) and config == "auto":  # filter bank with scribbles, raw image without
        config = "filters" if scribbles is not None and np.asarray(scribbles).any() else "fast"
    cfg = get_config(config, max_iter=max_iter, **overrides)
    _check_settings(cfg, n_segments, time_budget)

    x_np, info = prepare_image(image, rgb=rgb, stack=stack)
    N, C, Y, X = x_np.shape
    squeeze = not info["stack"]
    C_img = C
    C = C_img + (2 if cfg.coords > 0 else 0)  # network input channels
    scr = prepare_scribbles(scribbles, (Y, X), N, squeeze)
    if scr is not None and not scr.any():
        scr = None
    class_ids = sorted(int(v) for v in np.unique(scr) if v > 0) if scr is not None else []
    K = max(class_ids) if class_ids else 0
    if classes_only and not class_ids:
        raise LeaksegError("'classes only' needs scribbles: paint at least one class first")

    if cfg.input == "filters" and len(class_ids) < 2 and tuple(cfg.sigmas) == CONFIGS["filters"].sigmas:
        # one class against the rest, or no strokes: the clusters come from self-training alone, which
        # needs the large scales to tell regions apart (at sigma 1-4 one class takes the whole image)
        cfg.sigmas = SINGLE_CLASS_SIGMAS
    q = cfg.q
    if warm_start is not None:
        meta = warm_start.get("metadata", {})
        checked_model(MODEL_SPEC, {k: torch.as_tensor(v) for k, v in (warm_start.get("state_dict") or {}).items()},
                      meta, "warm-start model")  # one validation step
        arch = dict(meta.get("arch", {}))
        if arch.get("in_channels") != C:
            raise LeaksegError(
                f"cannot warm-start: the saved model takes {arch.get('in_channels')} channel(s), "
                f"this image needs {C}")
        if K > arch.get("q", 0):
            raise LeaksegError(f"cannot warm-start: class id {K} needs more than the model's {arch.get('q')} channels")
        q = arch["q"]
        if arch.get("kind", "conv") == "filters":
            cfg.input, cfg.q, cfg.hidden, cfg.sigmas = "filters", arch["q"], arch["hidden"], tuple(arch["sigmas"])
            cfg.features = arch.get("features", "full")
            want = overrides.get("guide_r")
            if want is not None and int(want) != int(arch.get("guide_r", 0)):
                raise LeaksegError(
                    f"cannot warm-start with edge smoothing {want}: the saved model was trained with "
                    f"{arch.get('guide_r', 0)} (its guide is part of the model); start a new model instead")
            cfg.guide_r, cfg.guide_pcs = arch.get("guide_r", 0), arch.get("guide_pcs", 0)
            cfg.guide_eps = arch.get("guide_eps", 0.1)
            cfg.colour = arch.get("colour", "rgb")  # the saved filter bank's colour space
        else:
            cfg.input, cfg.q, cfg.n_conv = "raw", arch["q"], arch["n_conv"]
            cfg.padding_mode = arch.get("padding_mode", cfg.padding_mode)
    else:
        if cfg.input == "filters" and classes_only and len(class_ids) > 1:
            q = cfg.q = K  # DFC over the scribbled classes only: self-training among them
        elif K >= q:
            q = cfg.q = K + max(8, cfg.q - K if cfg.q > K else 8)
        arch = _arch(C, cfg)

    dev = resolve_device(device)
    seed_everything(seed)

    # ---- the model, its training copy (downsampled grid) and the scribble targets
    model = build_model(arch).to(dev)
    if warm_start is not None:
        try:
            model.load_state_dict({k: torch.as_tensor(v) for k, v in warm_start["state_dict"].items()})
        except Exception as e:  # noqa: BLE001
            raise LeaksegError(f"cannot warm-start from this state: {str(e).splitlines()[0][:200]}") from None
    data = _training_data(model, x_np, scr, cfg, dev, fit_stats=warm_start is None)
    x_full, scale, (h, w) = data.x_full, data.scale, data.hw
    scr_target = data.scr_target
    model.train()
    opt = _make_optimizer(model, cfg, warm_start)
    mu_con = cfg.mu_con
    scr_ce = nn.CrossEntropyLoss(weight=data.class_weights(q) if cfg.balance else None)

    min_iter = cfg.min_iter if warm_start is None else min(cfg.min_iter, 3)
    min_labels = cfg.min_labels
    if class_ids:
        min_labels = len(class_ids)
    if n_segments is not None and cfg.min_labels_stop:
        min_labels = int(n_segments)

    throttle = Throttle(preview_interval)
    history: list[dict] = []
    prev = None
    window: list = []
    stopped = "max_iter"
    first_preview = None
    it = 0
    # filters + scribbles: a final round of self-training with the class shares held fixed (_sharpen)
    n_sharpen = cfg.sharpen_iter if cfg.input == "filters" and scr is not None else 0
    total = cfg.max_iter + n_sharpen

    def finish(reason):
        labels, lut, counts = _predict_full(model, data, dev, cfg, K, class_ids, n_segments, classes_only,
                                            (Y, X))
        md = {
            "capability": "scribble",
            "arch": arch,
            "train": {"config": cfg.to_dict(), "n_iter": it, "seed": seed, "scale": scale,
                      "n_segments": n_segments, "classes_only": bool(classes_only),
                      "class_ids": class_ids, "stopped": reason},
            "normalization": {"method": "percentile", "low": 1.0, "high": 99.8,
                              "lohi": [info["low"], info["high"]]},
            "channel_lut": [int(v) for v in lut],
        }
        sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        out = labels[0] if squeeze else labels
        # the optimizer state travels in memory only (Refine); core.store.save keeps weights + metadata
        state = {"state_dict": sd, "metadata": md, "optimizer": copy.deepcopy(opt.state_dict()),
                 "optimizer_kind": cfg.optimizer}
        return SegmentResult(out, state, it, time.perf_counter() - t_start,
                             reason, history, first_preview)

    try:
        for it in range(1, cfg.max_iter + 1):
            loss, out, target, scr_logits = _train_step(model, data, opt, cfg, scr_ce, cfg.mu_sim, mu_con)

            # bookkeeping on this iteration's pseudo-labels
            n_lab = int(torch.unique(target).numel())
            change = float((target != prev).float().mean()) if prev is not None else 1.0
            prev = target
            acc, worst = _scribble_agreement(scr_logits, scr_target)
            if cfg.adapt_con and worst < cfg.scribble_acc:
                mu_con *= cfg.adapt_con  # continuity only as strong as the scribbles allow
            elapsed = time.perf_counter() - t_start
            history.append({"iter": it, "t": elapsed, "loss": float(loss.detach()), "n_labels": n_lab,
                            "change": change, "scribble_acc": acc})

            window.append((change, n_lab))
            del window[:-cfg.stop_patience]
            # converged: over the last `stop_patience` iterations the median fraction of changed
            # pseudo-labels is below stop_change (robust to boundary flicker), the number of labels
            # is constant and the scribbled pixels are learned
            calm = (cfg.stop_change > 0 and len(window) == cfg.stop_patience
                    and float(np.median([c for c, _ in window])) < cfg.stop_change
                    and len({n for _, n in window}) == 1 and acc >= cfg.scribble_acc)
            reason = None
            if it >= min_iter:
                if cfg.min_labels_stop and n_lab <= min_labels:
                    reason = "min_labels"
                elif calm:
                    reason = "converged"
            if reason is None and time_budget is not None and elapsed >= time_budget:
                reason = "time_budget"

            lossv = float(loss.detach())
            msg = f"iter {it}: {n_lab} labels, loss {lossv:.3f}"
            metrics = {"loss": float(loss.detach()), "n_labels": n_lab, "change": change, "scribble_acc": acc}
            if reason is not None:
                stopped = reason
                break
            if throttle(force=(it == 1)):
                prev_lab = _preview(target, (N, h, w), (Y, X), K, class_ids, q, classes_only, out)
                if first_preview is None:
                    first_preview = time.perf_counter() - t_start
                yield Progress(it, total, msg, preview=prev_lab[0] if squeeze else prev_lab, metrics=metrics)
            else:
                yield Progress(it, total, msg, metrics=metrics)
        if n_sharpen and stopped != "time_budget":
            it = yield from _sharpen(model, data, opt, cfg, scr_ce, q, it, total, history, t_start)
    except JobCancelled:
        stopped = "cancelled"
    return finish(stopped)


def _make_optimizer(model, cfg: SegmentConfig, warm_start: Optional[dict]):
    """The configured optimizer; a warm start restores its state (else a gentler learning rate)."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        raise LeaksegError(f"unknown optimizer {cfg.optimizer!r} (use 'sgd' or 'adam')")
    if warm_start is not None:
        osd = warm_start.get("optimizer")
        restored = False
        if osd is not None and warm_start.get("optimizer_kind") == cfg.optimizer:
            try:
                opt.load_state_dict(osd)
                restored = True
            except Exception:  # noqa: BLE001 - different shapes: start the optimizer afresh
                restored = False
        if not restored:  # fresh Adam moments make large first steps: be gentle with trained weights
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 0.3
    return opt


def _train_step(model, data: _TrainData, opt, cfg: SegmentConfig, scr_ce, mu_sim: float, mu_con: float,
                shares: Optional[torch.Tensor] = None):
    """One DFC iteration: similarity to its own argmax (or to the share-matched argmax, ``shares``),
    continuity, scribble cross-entropy. Returns (loss, grid response, target, scribbled logits)."""
    opt.zero_grad(set_to_none=True)
    out, scr_logits = data.forward(model)  # (N, q, h, w) grid response, scribbled pixels' logits
    logits = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    target = logits.argmax(1).detach() if shares is None else _share_matched_target(logits.detach(), shares)
    con = out if data.crop_out is None else data.crop_out
    dy = (con[:, :, 1:, :] - con[:, :, :-1, :]).abs().mean()
    dx = (con[:, :, :, 1:] - con[:, :, :, :-1]).abs().mean()
    sim = logits if data.sim_idx is None else logits[data.sim_idx]
    loss = mu_sim * F.cross_entropy(sim, target if data.sim_idx is None else target[data.sim_idx])
    loss = loss + mu_con * (dy + dx)
    if data.tgt_scr is not None:
        loss = loss + cfg.mu_scr * scr_ce(scr_logits, data.scr_target)
    loss.backward()
    opt.step()
    return loss, out, target, scr_logits


def _share_bands(Y: int, X: int, max_px: int, band: int = 128) -> list:
    """Row ranges to count class shares on: the whole image up to ``max_px`` pixels, else evenly spaced
    bands of ``band`` rows covering about ``max_px`` pixels."""
    if Y * X <= max_px or Y <= band:
        return [(0, Y)]
    n = max(1, min(math.ceil(Y / band), max_px // (band * X)))
    return [(int(a), int(a) + band) for a in np.linspace(0, Y - band, n).round()]


def _class_shares(model: "FilterNet", data: _TrainData, q: int, max_px: int = 1 << 20) -> torch.Tensor:
    """(1, q): each channel's share of the full-resolution prediction (argmax of ``respond``). Images
    above ``max_px`` pixels are sampled in full-resolution row bands (each with the guided filter's
    2·r halo, so that a counted pixel sees the neighbourhood it has in the whole image), to bound the cost."""
    counts = torch.zeros(q, dtype=torch.float64)
    N, _, Y, X = data.f_full.shape
    halo = 2 * model.guide_r
    with torch.no_grad():
        for i in range(N):
            for a, b in _share_bands(Y, X, max_px):
                lo, hi = max(0, a - halo), min(Y, b + halo)
                am = model.respond(data.f_full[i:i + 1, :, lo:hi])[0].argmax(0)[a - lo:b - lo]
                counts += torch.bincount(am.reshape(-1), minlength=q).double().cpu()
    shares = (counts / counts.sum()).clamp_min(1e-4)
    return (shares / shares.sum()).float()[None].to(data.grid.device)


def _share_matched_target(logits: torch.Tensor, shares: torch.Tensor, n_iter: int = 3, probs: bool = False):
    """Argmax of the class probabilities rescaled per class (Sinkhorn: ``n_iter`` rounds of scaling each
    class, then each pixel) so that their mean approaches ``shares``; ``probs=True`` returns the
    rescaled probabilities. The argmax's shares follow the means only approximately."""
    p = torch.softmax(logits, 1)
    for _ in range(n_iter):
        p = p * (shares / p.mean(0, keepdim=True).clamp_min(1e-8))
        p = p / p.sum(1, keepdim=True)
    return p if probs else p.argmax(1)


def _sharpen(model, data: _TrainData, opt, cfg: SegmentConfig, scr_ce, q: int, it: int, total: int,
             history: list, t_start: float):
    """Self-training at ``sharpen_sim`` for ``sharpen_iter`` more iterations, its targets matched to the
    class shares of the trained result (so that no class can swallow another, as a strong similarity
    weight from the start lets it), with the scribble loss kept. Thin, low-contrast classes (EM
    membranes) gain, while the mean class probabilities stay at the trained result's shares
    (benchmarks/bench_scribble_forest.py). Returns the last iteration number."""
    shares = _class_shares(model, data, q)
    for it in range(it + 1, it + 1 + cfg.sharpen_iter):
        loss, _, target, scr_logits = _train_step(model, data, opt, cfg, scr_ce, cfg.sharpen_sim, cfg.mu_con,
                                                  shares)
        acc, _ = _scribble_agreement(scr_logits, data.scr_target)
        lossv = float(loss.detach())
        history.append({"iter": it, "t": time.perf_counter() - t_start, "loss": lossv,
                        "n_labels": int(torch.unique(target).numel()), "change": None, "scribble_acc": acc,
                        "stage": "sharpen"})
        yield Progress(it, total, f"iter {it}: sharpening, loss {lossv:.3f}", metrics={"loss": lossv,
                                                                                        "scribble_acc": acc})
    return it


def _scribble_agreement(scr_logits, scr_target) -> tuple[float, float]:
    """(accuracy on all scribbled pixels, accuracy of the worst class); (1, 1) without scribbles."""
    if scr_logits is None:
        return 1.0, 1.0
    hit = (scr_logits.argmax(1) == scr_target).float()
    per = [float(hit[scr_target == c].mean()) for c in torch.unique(scr_target)]
    return float(hit.mean()), min(per)


def _add_coords(x: torch.Tensor, weight: float, offset=(0, 0), full=None) -> torch.Tensor:
    """Append (y, x) position channels scaled to [0, weight] over the longer side of ``full``."""
    N, _, Y, X = x.shape
    FY, FX = full if full is not None else (Y, X)
    s = weight / max(FY, FX, 1)
    yy = (torch.arange(Y, dtype=torch.float32) + offset[0]) * s
    xx = (torch.arange(X, dtype=torch.float32) + offset[1]) * s
    g = torch.stack(torch.meshgrid(yy, xx, indexing="ij"))[None].expand(N, 2, Y, X)
    return torch.cat([x, g.to(x.dtype)], 1)


def _preview(target, nhw, YX, K, class_ids, q, classes_only, out):
    """Cheap label preview: training-resolution argmax, nearest-upsampled, mapped to output ids."""
    N, h, w = nhw
    with torch.no_grad():
        if classes_only:
            lab = out[:, [k - 1 for k in class_ids]].argmax(1)
            lut = torch.tensor(class_ids, dtype=torch.int64, device=lab.device)
            lab = lut[lab]
        else:
            t = target.reshape(N, h, w)
            counts = torch.bincount(t.reshape(-1), minlength=q).cpu().numpy()
            lut = torch.from_numpy(_channel_lut(counts, K, class_ids, np.ones(q, bool), False)).to(t.device)
            lab = lut[t]
        lab = F.interpolate(lab[:, None].float(), size=YX, mode="nearest")[:, 0]
    return smallest_uint(lab.to(torch.int64).cpu().numpy())


def _recalibrate_bn(model, x):
    """Freeze BatchNorm statistics to those of the (training) image, then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum,) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average = exact statistics of this pass
    model.train()
    with torch.no_grad():
        model(x)
    for m, (mom,) in zip(bns, saved):
        m.momentum = mom
    model.eval()


def _forward_full(model, x_full, dev, tile: int = 512):
    """Eval-mode response at full resolution for (N, C, Y, X) input; tiled for big images."""
    from .core.tiling import predict_tiled
    from .core.unet import numpy_fn

    N, C, Y, X = x_full.shape
    outs = []
    for i in range(N):
        if Y * X <= 1024 * 1024:
            with torch.no_grad():
                outs.append(model(x_full[i:i + 1].to(dev))[0].cpu())
        else:
            fn = numpy_fn(model, dev)
            outs.append(torch.from_numpy(predict_tiled(fn, x_full[i].numpy(), tile=tile, overlap=16)))
    return outs


def _predict_full(model, data: _TrainData, dev, cfg: SegmentConfig, K, class_ids, n_segments, classes_only, YX):
    """Final labels at full resolution (post-processed, compact) + the channel→id LUT."""
    x_full = data.x_full
    N = x_full.shape[0]
    q = cfg.q
    Y, X = YX
    paper = cfg.train_pixels is None and cfg.min_size is None
    if cfg.input == "filters":
        _recalibrate_bn(model.head, data.grid)
        with torch.no_grad():
            resp = [model.respond(data.f_full[i:i + 1])[0].cpu() for i in range(N)]
        model.train()
    elif paper:
        # the reference: the last training forward pass in train mode (batch statistics)
        model.train()
        with torch.no_grad():
            resp = [model(x_full[i:i + 1].to(dev))[0].cpu() for i in range(N)]
    else:
        x_small = None
        if cfg.train_pixels:
            s = min(1.0, math.sqrt(cfg.train_pixels / float(Y * X)))
            h, w = max(4, int(round(Y * s))), max(4, int(round(X * s)))
            x_small = F.interpolate(x_full, size=(h, w), mode="bilinear", align_corners=False,
                                    antialias=True) if (h, w) != (Y, X) else x_full
        _recalibrate_bn(model, (x_small if x_small is not None else x_full).to(dev))
        resp = _forward_full(model, x_full, dev)
        model.train()
    # which channels may appear
    am = [r.argmax(0) for r in resp]
    counts = np.zeros(q, np.int64)
    for a in am:
        counts += torch.bincount(a.reshape(-1), minlength=q).numpy()
    allowed = np.ones(q, bool)
    if classes_only:
        allowed[:] = False
        allowed[[k - 1 for k in class_ids]] = True
    elif n_segments is not None and not cfg.min_labels_stop:
        allowed[:] = False
        allowed[[k - 1 for k in class_ids]] = True
        n_free = max(0, int(n_segments) - len(class_ids))
        order = [c for c in np.argsort(-counts, kind="stable") if not allowed[c] and counts[c] > 0]
        allowed[order[:n_free]] = True
        if not allowed.any():
            allowed[int(np.argmax(counts))] = True
    if not allowed.all():
        mask = torch.from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32))[:, None, None]
        am = [(r + mask).argmax(0) for r in resp]
        counts = np.zeros(q, np.int64)
        for a in am:
            counts += torch.bincount(a.reshape(-1), minlength=q).numpy()
    lut = _channel_lut(counts, K, class_ids, allowed, classes_only)
    # single-class "classes only": that class against the rest (0)
    if classes_only and len(class_ids) == 1:
        k = class_ids[0]
        labs = []
        for r in resp:
            # class k against its best competitor among all channels
            others = torch.cat([r[:k - 1], r[k:]], 0).max(0).values
            labs.append(np.where((r[k - 1] >= others).numpy(), k, 0))
        lut = np.zeros(q, np.int64)
        lut[k - 1] = k
    else:
        labs = [lut[a.numpy()] for a in am]
    labels = _postprocess(labs, x_full, cfg, merge=cfg.merge if not class_ids else 0.0)
    # compact: ids 1..K kept, others renumbered K+1.. (consecutive), in the result and in the
    # saved channel→id table alike, so a saved model numbers segments as this result does
    lut, labels = _compact_ids(lut, labels, K)
    return labels, lut, counts


def _postprocess(labs, x_full: torch.Tensor, cfg: SegmentConfig, merge: float) -> np.ndarray:
    """Per slice: small components into their neighbours, then (``merge`` > 0) regions of similar colour."""
    Y, X = labs[0].shape
    msize = _min_size_px(cfg.min_size, Y * X)
    n_img = x_full.shape[1] - (2 if cfg.coords > 0 else 0)  # the image's channels, without position ones
    out = []
    for i, lab in enumerate(labs):
        if msize > 1:
            lab = merge_small_components(lab, msize)
        if merge > 0:
            lab = merge_similar_regions(lab, region_colour(x_full[i, :n_img].numpy()), merge)
        out.append(lab)
    return np.stack(out)


def _compact_ids(lut: np.ndarray, labels: np.ndarray, K: int):
    """Renumber ids > K to K+1.. consecutively in ``labels`` and, by the same map, in ``lut``.

    Ids of ``lut`` that ``labels`` lacks (segments merged away as small components) follow the
    kept ones. Returns ``(lut int64, labels as the smallest unsigned dtype)``.
    """
    lut = np.asarray(lut, np.int64)
    labels = np.asarray(labels, np.int64)
    kept = [int(v) for v in np.unique(labels) if v > K]
    gone = sorted({int(v) for v in lut if v > K} - set(kept))
    new = np.arange(max(int(labels.max(initial=0)), int(lut.max(initial=0))) + 1)
    new[kept + gone] = K + 1 + np.arange(len(kept) + len(gone))
    return new[lut], smallest_uint(new[labels])


def segment(image, scribbles=None, *, n_segments=None, max_iter=None, time_budget=None, seed=0,
            device="auto", warm_start=None, classes_only=False, callback: Optional[Callable] = None,
            config="auto", **kw) -> SegmentResult:
    """Run :func:`iter_segment` to the end and return its :class:`SegmentResult`.

    ``callback(progress)`` sees every ``Progress`` event; returning ``False``
    stops training (the result of the current weights is returned).
    """
    res = run_job(iter_segment(image, scribbles, n_segments=n_segments, max_iter=max_iter,
                               time_budget=time_budget, seed=seed, device=device, warm_start=warm_start,
                               classes_only=classes_only, config=config, **kw), callback)
    return res.value


# --------------------------------------------------------------------------- saved models
def predictor_from_model(state_dict, metadata, device="auto"):
    """A :class:`core.predictor.Predictor` for a saved scribble model (per-pixel labels, no merging)."""
    from .core.predictor import Predictor
    from .core.unet import numpy_fn

    dev = resolve_device(device)
    # one validation step (types, known keys, size, weights): BatchNorm statistics were frozen
    # to the training image before saving; eval mode uses them
    model, arch = checked_model(MODEL_SPEC, state_dict, metadata, None, dev)
    if ((metadata.get("train") or {}).get("config") or {}).get("coords", 0):
        raise LeaksegError("this scribble model uses position channels (coords > 0); it can only be applied "
                           "to the whole image it was trained on, not tile by tile")
    lut = np.asarray(metadata.get("channel_lut") or np.arange(1, arch["q"] + 1), np.int64)
    # channels that never won on the training image get fresh ids after the used ones
    free = lut == 0
    if free.any():
        lut = lut.copy()
        lut[free] = lut.max() + 1 + np.arange(int(free.sum()))
    lohi = metadata.get("normalization", {}).get("lohi")

    def finalize(block):
        return smallest_uint(lut[np.asarray(block).argmax(0)])

    def preprocess(raw):
        x = np.asarray(raw, np.float32)
        if lohi is not None:
            lo, hi = lohi
            x = (x - lo) / max(hi - lo, 1e-12)
        return x

    return Predictor(fn=numpy_fn(model, dev), in_channels=arch["in_channels"], out_channels=arch["q"],
                     finalize=finalize, output="labels", halo=_halo(arch), tile=512,
                     capability="scribble", metadata=metadata, preprocess=preprocess)
