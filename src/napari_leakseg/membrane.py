"""Reference-annotation-assisted membrane segmentation (plain torch/numpy).

The idea (Kato & Hotta, "One-shot and Partially-Supervised Cell Image
Segmentation Using Small Visual Prompt", CVPRW 2023): annotated images are not
forgotten after training; they are *references* at prediction time.

* A shared U-Net (``core.unet.UNet``) embeds the target and the reference crops.
* Every target pixel attends (softmax of scaled cosine similarity of the
  embeddings) over sampled pixels of a reference crop; the attention-weighted
  average of the reference's membrane labels is a membrane probability.
* This is fused with a plain segmentation head::

      logit = seg_head(features) + w * logit(p_attention)

  ``w`` and the softmax temperature are learned. The *baseline* is the same
  network with ``use_reference=False``: encoder + seg head only, trained with
  the same budget (crops, batches, steps).
* Training is episodic: the target crop and its reference crop come from
  different images (or different crops of one image), each augmented
  independently (flips, rot90, elastic deformation, intensity changes).
* At prediction, the reference images are cut into crops; for each target tile
  the ``n_refs`` most similar crops (cosine similarity of mean embeddings) are
  retrieved and their attention outputs averaged. A compact *reference bank*
  (sampled key embeddings + labels of every crop) of the training images is
  saved with the model, so a saved model predicts without extra inputs.
* The user's references are also read pixel by pixel (``ref_head``, on by default):
  a small per-pixel head (``core.pixel_head``) is fitted in about a second to the
  references' labels, on a multiscale filter bank of the image plus the network's
  membrane probability, and gives the final probability. On stacks the network
  never saw, this is what makes the references pay off (the attention alone adds
  little there; see docs/benchmarks.md, membrane cross-stack).
* Optional feedback refinement (``feedback=True``): the membrane probability is
  fed back as a second input channel and the network runs again.

Outputs: probability map, binary membrane mask and cell instances (watershed of
the probability seeded by non-membrane components, with a minimum size).

Label convention: pixels equal to ``membrane_value`` are membrane. A binary
mask ``{0, membrane_value}`` (0/1, 0/255) is membrane vs not membrane; with a
third value (napari style, e.g. 1 = membrane, 2 = cell) 0 is *unlabeled* and
ignored; with ``membrane_value == 0`` (ISBI 2012 style, 0 = membrane, 255 =
cell) every pixel is labelled. Other label maps (instance ids, a membrane
value that does not occur) are refused with the values found.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from .core import store
from .core.device import resolve_device, seed_everything
from .core.errors import InputError, JobCancelled, LeaksegError, ModelFileError
from .core.filters import multiscale_features
from .core.jobs import Progress, Throttle, run_job
from .core.labels import check_labels
from .core.modelcheck import ModelSpec, Param, build_model as checked_model, unet_activation
from .core.normalize import check_image, normalize, percentile_range
from .core.pixel_head import PixelHead
from .core.predictor import Predictor
from .core.tiling import iter_tiled, pad_to_multiple
from .core.unet import UNet

CAPABILITY = "membrane"

DEFAULT_ARCH = dict(base=16, depth=3, norm="group", use_reference=True, feedback=False,
                    emb_dim=16, keys_per_ref=128, attn_stride=2)

_EPS = 1e-4
_MAX_SCALE = 40.0
HEAD_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # filter bank of the reference head

__all__ = [
    "MembraneNet",
    "ReferenceBank",
    "MembranePredictor",
    "TrainedMembrane",
    "membrane_mask_from_labels",
    "prepare_references",
    "iter_train_membrane",
    "train_membrane",
    "iter_finetune_membrane",
    "finetune_membrane",
    "membrane_width",
    "iter_predict_membrane",
    "predict_membrane",
    "cells_from_probability",
    "predictor_from_model",
    "load_model",
]


# --------------------------------------------------------------------------- model


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, scale: torch.Tensor,
           chunk: int = 16384) -> torch.Tensor:
    """Attention-averaged reference labels.

    q:    (B, N, E) L2-normalised target embeddings (N pixels)
    keys: (B, R, K, E) L2-normalised reference embeddings (R references, K pixels each)
    vals: (B, R, K) reference membrane labels in [0, 1] (NaN-free)
    Returns (B, N): for each target pixel, the mean over the R references of the
    softmax(scale * q·k)-weighted average of that reference's labels.
    """
    B, N, E = q.shape
    R, K = keys.shape[1], keys.shape[2]
    kf = keys.reshape(B, R * K, E).transpose(1, 2)
    scale = scale.clamp(max=_MAX_SCALE)
    # block-diagonal [labels | ones] so numerator and denominator per reference are one matmul
    eye = torch.eye(R, dtype=q.dtype, device=q.device)
    vblk = (vals[:, :, :, None] * eye[None, :, None, :]).reshape(B, R * K, R)
    oblk = eye[:, None, :].expand(R, K, R).reshape(1, R * K, R).expand(B, -1, -1)
    W = torch.cat([vblk, oblk], -1)  # B, R*K, 2R
    out = []
    grad = torch.is_grad_enabled()
    for s in range(0, N, chunk):
        sim = torch.bmm(q[:, s:s + chunk], kf)  # B, n, R*K; cosine in [-1, 1]
        # exp(scale * (cos - 1)) never overflows and (scale <= 40) never underflows to 0
        if grad:
            ex = torch.exp((sim - 1) * scale)
        else:
            ex = sim.sub_(1).mul_(scale).exp_()
        nd = torch.bmm(ex, W)
        out.append((nd[..., :R] / nd[..., R:].clamp_min(1e-30)).mean(-1))
    return torch.cat(out, 1)


class MembraneNet(nn.Module):
    """Shared U-Net encoder + seg head, optionally fused with reference attention.

    ``use_reference=False`` is the no-reference baseline (identical U-Net and
    head). ``feedback=True`` adds an input channel holding a previous
    membrane probability (zeros on the first pass).
    """

    def __init__(self, base: int = 16, depth: int = 3, norm: str = "group",
                 use_reference: bool = True, feedback: bool = False, emb_dim: int = 16,
                 keys_per_ref: int = 128, attn_stride: int = 2):
        super().__init__()
        self.arch = dict(base=base, depth=depth, norm=norm, use_reference=bool(use_reference),
                         feedback=bool(feedback), emb_dim=emb_dim, keys_per_ref=keys_per_ref,
                         attn_stride=int(attn_stride))
        self.attn_stride = int(attn_stride)
        self.use_reference = bool(use_reference)
        self.feedback = bool(feedback)
        self.keys_per_ref = int(keys_per_ref)
        self.unet = UNet(in_channels=2 if feedback else 1, out_channels=1, base=base,
                         depth=depth, norm=norm)
        if self.use_reference:
            self.proj = nn.Conv2d(base, emb_dim, 1)
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.fuse = nn.Parameter(torch.tensor(0.0))  # starts as the baseline; learns how much to trust references

    @property
    def multiple(self) -> int:
        return self.unet.multiple

    @property
    def in_channels(self) -> int:
        return 2 if self.feedback else 1

    def _input(self, x: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.feedback:
            return x
        if prev is None:
            prev = torch.zeros_like(x)
        return torch.cat([x, prev], 1)

    def encode(self, x: torch.Tensor, prev: Optional[torch.Tensor] = None):
        """(B,1,H,W) → features (B,base,H,W) and normalised embeddings (B,E,H,W) or None."""
        f = self.unet.features(self._input(x, prev))
        e = F.normalize(self.proj(f), dim=1) if self.use_reference else None
        return f, e

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.unet.head(f)

    def fuse_logits(self, f: torch.Tensor, e: Optional[torch.Tensor], keys=None, vals=None):
        """Fused logits (B,1,H,W) and the attention probability (B,1,H,W) or None."""
        logit = self.head(f)
        if not self.use_reference or keys is None:
            return logit, None
        B, E, H, W = e.shape
        st = self.attn_stride
        # queries on a stride-`st` grid (pooled embeddings), keys are full-resolution pixels
        eq = F.normalize(F.avg_pool2d(e, st), dim=1) if st > 1 else e
        h, w = eq.shape[-2:]
        q = eq.flatten(2).transpose(1, 2)
        p = attend(q, keys, vals, self.log_scale.exp()).view(B, 1, h, w)
        if st > 1:
            p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
        pc = p.clamp(_EPS, 1 - _EPS)
        return logit + self.fuse * (torch.log(pc) - torch.log1p(-pc)), p

    def forward(self, x, keys=None, vals=None, prev=None):
        f, e = self.encode(x, prev)
        return self.fuse_logits(f, e, keys, vals)[0]


def sample_keys(emb: torch.Tensor, lab: torch.Tensor, k: int, generator=None):
    """Class-balanced key sampling from one reference.

    emb: (E, H, W); lab: (H, W) float with 1 = membrane, 0 = cell, NaN = unlabeled.
    Returns keys (k, E), vals (k,). Half the keys are membrane pixels, half cell.
    """
    E = emb.shape[0]
    flat = emb.reshape(E, -1)
    lf = lab.reshape(-1)
    mem = torch.nonzero(lf == 1).flatten()
    cel = torch.nonzero(lf == 0).flatten()
    idx = []
    for pool, n in ((mem, k // 2), (cel, k - k // 2)):
        if pool.numel() == 0:
            pool = torch.nonzero(torch.isfinite(lf)).flatten()
        if pool.numel() == 0:  # a crop with no labelled pixel at all (sparse labels): uninformative keys
            pool = torch.arange(lf.numel(), device=lf.device)
            lf = torch.where(torch.isfinite(lf), lf, torch.full_like(lf, 0.5))
        sel = torch.randint(0, pool.numel(), (n,), generator=generator)
        idx.append(pool[sel])
    idx = torch.cat(idx)
    return flat[:, idx].t().contiguous(), lf[idx].contiguous()


# --------------------------------------------------------------------------- labels / inputs


def _values_text(vals: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in vals[:limit])
    return shown + (f", ... ({vals.size} distinct values)" if vals.size > limit else "")


def membrane_mask_from_labels(lab, membrane_value: int = 1, name: str = "labels") -> np.ndarray:
    """float32 map: 1 = membrane, 0 = cell, NaN = unlabeled.

    Accepted label maps (anything else is refused, naming the values found):

    * ``membrane_value == 0`` (ISBI style): 0 = membrane and one other value = cell.
    * a binary mask ``{0, membrane_value}`` (e.g. 0/1 or 0/255): membrane_value = membrane,
      0 = not membrane (cell); every pixel is labelled.
    * ``{0, membrane_value, c}`` (napari style, e.g. 1 = membrane, 2 = cell): 0 = unlabeled.
    * ``{membrane_value, c}``: c = cell.
    """
    a = check_labels(lab, name=name)
    mv = int(membrane_value)
    vals = np.unique(a)
    if mv not in vals:
        raise InputError(
            f"{name} has no membrane pixels (no pixel equals the membrane value {mv}); values found: "
            f"{_values_text(vals)}. Set the membrane value to the label of membrane "
            "(e.g. 0 for ISBI-style 0/255 labels, 255 for 0/255 membrane masks, 1 for 0/1 masks)")
    cell_vals = vals[(vals != mv) & (vals != 0)] if mv != 0 else vals[vals != 0]
    if cell_vals.size > 1:
        raise InputError(
            f"{name} has {vals.size} distinct values ({_values_text(vals)}) but membrane labels hold the "
            f"membrane value {mv}, at most one cell value and 0 (unlabeled); instance labels must be "
            "converted to a membrane mask first")
    out = np.where(a == mv, 1.0, 0.0).astype(np.float32)
    if mv != 0 and cell_vals.size == 1:
        out[a == 0] = np.nan  # {0, membrane, cell}: 0 = unlabeled
    return out


def _check_fractions(m: np.ndarray, name: str, raw, membrane_value: int) -> None:
    labelled = np.isfinite(m)
    n = int(labelled.sum())
    if n == 0:
        raise InputError(f"{name} has no labelled pixels (all 0 = unlabeled)")
    nm = int(np.nansum(m))
    if nm == 0:
        vals = np.unique(np.asarray(raw))
        raise InputError(
            f"{name} has no membrane pixels (value {membrane_value}); values found: {_values_text(vals)}. "
            "Set the membrane value (e.g. 0 for ISBI-style 0/255 labels)"
        )
    if nm == n:
        raise InputError(
            f"{name} is only membrane (every labelled pixel is {membrane_value}); "
            "references need both membrane and cell pixels"
        )


def _as_slices(images, labels, what: str):
    """Turn lists of 2D arrays / 3D stacks into matched lists of 2D (image, label) slices.

    In a stack, slices whose labels are constant (unannotated) are skipped.
    """
    if images is None or labels is None:
        raise InputError(f"no {what} given: at least 1 image with its labels is needed")
    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        images = [images]
    if isinstance(labels, np.ndarray) or hasattr(labels, "shape"):
        labels = [labels]
    images, labels = list(images), list(labels)
    if len(images) == 0:
        raise InputError(f"fewer than 1 {what} image: at least one annotated image is needed")
    if len(images) != len(labels):
        raise InputError(f"{len(images)} {what} images but {len(labels)} label images; they must pair up")
    out = []
    for i, (im, lb) in enumerate(zip(images, labels)):
        check_image(im, name=f"{what} image {i}")
        im = np.asarray(im)
        lb = np.asarray(lb)
        if im.ndim == 3 and im.shape[-1] in (3, 4) and lb.ndim == 2:
            im = im[..., :3].mean(-1)
        if im.shape != lb.shape:
            raise InputError(
                f"{what} image {i} has shape {im.shape} but its labels have shape {lb.shape}; they must match"
            )
        if im.ndim == 2:
            out.append((im, lb, f"{what} labels {i}"))
        elif im.ndim == 3:
            kept = 0
            for z in range(im.shape[0]):
                if lb[z].min() == lb[z].max():
                    continue
                out.append((im[z], lb[z], f"{what} labels {i} slice {z}"))
                kept += 1
            if kept == 0:
                raise InputError(f"{what} stack {i} has no annotated slice (every slice's labels are constant)")
        else:
            raise InputError(f"{what} image {i} must be 2D or a 3D stack; got shape {im.shape}")
    return out


def prepare_references(images, labels, membrane_value: int = 1, what: str = "reference"):
    """Validate and normalise annotated images.

    Returns a list of (normalised float32 image (Y, X), mask float32 with NaN = unlabeled)
    and a list of per-image raw intensity ranges (for scale warnings).
    """
    pairs = []
    ranges = []
    for im, lb, name in _as_slices(images, labels, what):
        m = membrane_mask_from_labels(lb, membrane_value, name=name)
        _check_fractions(m, name, lb, membrane_value)
        ranges.append(percentile_range(im))
        pairs.append((normalize(im), m))
    return pairs, ranges


def intensity_scale_warning(target_range, ref_ranges, factor: float = 4.0) -> Optional[str]:
    """A warning text when the target's intensity range differs a lot from the references'."""
    if not ref_ranges:
        return None
    t = max(target_range[1] - target_range[0], 1e-8)
    r = float(np.median([max(h - lo, 1e-8) for lo, h in ref_ranges]))
    if t / r > factor or r / t > factor:
        return (f"the target's intensity range ({t:.3g}) differs from the references' ({r:.3g}) "
                f"by more than {factor:g}x; both are percentile-normalised, but check they are the same kind of image")
    return None


# --------------------------------------------------------------------------- scale / polarity


def membrane_width(masks) -> float:
    """Mean membrane width in pixels of annotated masks: membrane area / skeleton length.

    ``masks``: float maps (1 = membrane, 0 = cell, NaN = unlabeled), as from
    :func:`membrane_mask_from_labels`. A 1-px line gives 1, a 6-px band about 6.
    """
    from skimage.morphology import skeletonize

    area = length = 0
    for m in masks:
        mem = np.nan_to_num(np.asarray(m, np.float32), nan=0.0) > 0.5
        area += int(mem.sum())
        length += int(skeletonize(mem).sum())
    if length == 0:
        raise InputError("the labels have no membrane pixels to measure the membrane width from")
    return max(1.0, area / length)


def membrane_polarity(pairs) -> float:
    """Mean normalised intensity of membrane minus cell pixels: < 0 dark membranes (EM), > 0 bright walls."""
    mem, cel = [], []
    for img, m in pairs:
        mem.append(float(np.mean(img[m == 1])))
        cel.append(float(np.mean(img[m == 0])))
    return float(np.mean(mem) - np.mean(cel))


def rescale_pair(img: np.ndarray, m: np.ndarray, factor: float):
    """Zoom an image (linear) and its mask (nearest, NaN kept) by ``factor``."""
    if abs(factor - 1) < 0.02:
        return img, m
    zi = ndi.zoom(np.asarray(img, np.float32), factor, order=1)
    zm = ndi.zoom(np.nan_to_num(m, nan=-1.0), factor, order=0)
    return zi.astype(np.float32), np.where(zm < 0, np.nan, zm).astype(np.float32)


def _resize_to(a: np.ndarray, shape) -> np.ndarray:
    """Linear resize of a 2D float map to ``shape`` (exact output shape)."""
    a = np.asarray(a, np.float32)
    if a.shape == tuple(shape):
        return a
    out = ndi.zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1)
    if out.shape != tuple(shape):  # zoom rounding: pad/crop by at most a pixel
        out = np.pad(out, [(0, max(0, s - o)) for s, o in zip(shape, out.shape)], mode="edge")
        out = out[: shape[0], : shape[1]]
    return out.astype(np.float32)


def training_sets(images=None, labels=None, membrane_value: int = 1, sets=None):
    """Normalise the training inputs to a list of (images, labels, membrane_value) sets."""
    out = []
    if images is not None or labels is not None:
        out.append((images, labels, int(membrane_value)))
    for i, st in enumerate(sets or []):
        if isinstance(st, dict):
            st = (st.get("images"), st.get("labels"), st.get("membrane_value", membrane_value))
        if len(st) != 3:
            raise InputError(f"training set {i} must be (images, labels, membrane_value)")
        out.append((st[0], st[1], int(st[2])))
    if not out:
        raise InputError("no training images given: at least 1 image with its labels is needed")
    return out


def _prepare_stacks(sets, width: Optional[float] = None, scale: Optional[float] = None):
    """Per set: validated pairs, membrane width and polarity; every set rescaled to the common
    width (default: the median of the sets' widths; ``scale``: by that factor instead) and
    inverted to dark membranes."""
    stacks = []
    for i, (ims, lbs, mv) in enumerate(sets):
        what = "training" if len(sets) == 1 else f"training set {i}"
        pairs, _ = prepare_references(ims, lbs, mv, what=what)
        stacks.append(dict(pairs=pairs, membrane_value=mv, width=membrane_width([m for _, m in pairs]),
                           polarity=membrane_polarity(pairs)))
    W = float(width) if width else float(np.median([s["width"] for s in stacks]))
    for s in stacks:
        s["scale"] = float(scale) if scale else W / s["width"]
        s["invert"] = s["polarity"] > 0
        s["pairs"] = [rescale_pair(1 - im if s["invert"] else im, m, s["scale"]) for im, m in s["pairs"]]
    return stacks, W


# --------------------------------------------------------------------------- augmentation


def _elastic(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, alpha: float = 6.0,
             grid: int = 4):
    h, w = img.shape
    coarse = rng.normal(0, alpha, (2, grid, grid))
    dy = ndi.zoom(coarse[0], (h / grid, w / grid), order=3)[:h, :w]
    dx = ndi.zoom(coarse[1], (h / grid, w / grid), order=3)[:h, :w]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    coords = [yy + dy, xx + dx]
    img2 = ndi.map_coordinates(img, coords, order=1, mode="reflect")
    lab_f = np.nan_to_num(lab, nan=-1.0)
    lab2 = ndi.map_coordinates(lab_f, coords, order=0, mode="reflect")
    lab2 = np.where(lab2 < 0, np.nan, lab2).astype(np.float32)
    return img2.astype(np.float32), lab2


def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, elastic: bool = True):
    """Flips, rot90, elastic deformation (p=0.5) and intensity changes (gamma, contrast, noise)."""
    k = int(rng.integers(4))
    img, lab = np.rot90(img, k), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    lab = np.ascontiguousarray(lab, dtype=np.float32)
    if elastic and rng.random() < 0.5:
        img, lab = _elastic(img, lab, rng)
    # intensity: gamma on [0,1], contrast/brightness, noise
    x = np.clip(img, 0, 1)
    x = x ** float(np.exp(rng.normal(0, 0.25)))
    x = x * float(rng.uniform(0.7, 1.3)) + float(rng.normal(0, 0.1))
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.0, 0.06), x.shape).astype(np.float32)
    return x.astype(np.float32), lab


def _random_crop(img, lab, size, rng):
    h, w = img.shape
    if h < size or w < size:
        py, px = max(0, size - h), max(0, size - w)
        mode = "reflect" if (py < h and px < w) else "edge"
        img = np.pad(img, ((0, py), (0, px)), mode=mode)
        lab = np.pad(lab, ((0, py), (0, px)), constant_values=np.nan)
        h, w = img.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size], lab[y:y + size, x:x + size], (y, x)


# --------------------------------------------------------------------------- reference bank


@dataclass
class ReferenceBank:
    """Per-crop key embeddings + labels, and each crop's mean embedding for retrieval."""

    keys: torch.Tensor   # (M, K, E)
    vals: torch.Tensor   # (M, K)
    means: torch.Tensor  # (M, E) L2-normalised

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def state(self) -> dict:
        return {"bank.keys": self.keys.cpu(), "bank.vals": self.vals.cpu(), "bank.means": self.means.cpu()}

    @classmethod
    def from_state(cls, sd: dict) -> Optional["ReferenceBank"]:
        if "bank.keys" not in sd:
            return None
        return cls(sd["bank.keys"].float(), sd["bank.vals"].float(), sd["bank.means"].float())

    def retrieve(self, mean_emb: torch.Tensor, n: int):
        """Indices of the ``n`` crops whose mean embedding is most similar to ``mean_emb`` (E,)."""
        sims = self.means @ F.normalize(mean_emb, dim=0)
        n = min(int(n), len(self))
        return torch.topk(sims, n).indices


def _crop_grid(h: int, w: int, size: int):
    ys = list(range(0, max(1, h - size + 1), size)) or [0]
    xs = list(range(0, max(1, w - size + 1), size)) or [0]
    if ys[-1] + size < h:
        ys.append(h - size)
    if xs[-1] + size < w:
        xs.append(w - size)
    return [(y, x) for y in ys for x in xs]


@torch.no_grad()
def build_bank(model: MembraneNet, pairs, device, crop: int = 128, keys_per_ref: Optional[int] = None,
               seed: int = 0, max_crops: int = 512) -> ReferenceBank:
    """Encode every annotated image once and sample keys from each ``crop``×``crop`` crop."""
    if not model.use_reference:
        raise LeaksegError("this model has no reference head; references are not used")
    k = int(keys_per_ref or model.keys_per_ref)
    g = torch.Generator().manual_seed(int(seed))
    model.eval()
    keys, vals, means = [], [], []
    for img, m in pairs:
        x, (h, w) = pad_to_multiple(img[None], model.multiple)
        xt = torch.from_numpy(np.ascontiguousarray(x))[None].to(device)
        _, e = model.encode(xt)
        e = e[0, :, :h, :w].cpu()
        mt = torch.from_numpy(m)
        c = min(crop, h, w)
        for (y, x0) in _crop_grid(h, w, c):
            lab = mt[y:y + c, x0:x0 + c]
            fin = torch.isfinite(lab)
            if fin.sum() < 16 or (lab[fin] == 1).sum() == 0 or (lab[fin] == 0).sum() == 0:
                continue
            emb = e[:, y:y + c, x0:x0 + c]
            kk, vv = sample_keys(emb, lab, k, g)
            keys.append(kk)
            vals.append(vv)
            means.append(F.normalize(emb.mean((1, 2)), dim=0))
    if not keys:
        raise InputError("no reference crop has both membrane and cell pixels; annotate more of the references")
    if len(keys) > max_crops:  # keep the bank bounded: evenly spaced subset
        sel = np.linspace(0, len(keys) - 1, max_crops).round().astype(int)
        keys, vals, means = [keys[i] for i in sel], [vals[i] for i in sel], [means[i] for i in sel]
    return ReferenceBank(torch.stack(keys), torch.stack(vals), torch.stack(means))


# --------------------------------------------------------------------------- training


def _loss(logit, target, weight):
    """BCE + soft Dice on labelled pixels (weight 0 = unlabeled)."""
    bce = F.binary_cross_entropy_with_logits(logit, target, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp_min(1)
    p = torch.sigmoid(logit) * weight
    t = target * weight
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


@dataclass
class TrainedMembrane:
    """A trained model, its metadata and (for reference models) its reference bank."""

    model: MembraneNet
    metadata: dict
    bank: Optional[ReferenceBank] = None
    history: list = field(default_factory=list)
    cancelled: bool = False

    def state_dict(self) -> dict:
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.bank is not None:
            sd.update(self.bank.state())
        return sd

    def save(self, path, overwrite: bool = False) -> Path:
        return store.save(self.state_dict(), path, self.metadata, overwrite=overwrite)


def _metadata(arch: dict, train: dict, membrane_value: int, stacks=None, width=None) -> dict:
    meta = {
        "capability": CAPABILITY,
        "arch": dict(arch),
        "train": dict(train),
        "normalization": {"method": "percentile", "low": 1.0, "high": 99.8},
        "membrane_value": int(membrane_value),
        "output": "membrane probability (1 = membrane)",
    }
    if stacks is not None:
        meta["train_width"] = float(width)
        meta["sets"] = [dict(n_images=len(st["pairs"]), membrane_value=int(st["membrane_value"]),
                             width=round(float(st["width"]), 3), polarity=round(float(st["polarity"]), 4))
                        for st in stacks]
        if len(stacks) == 1:
            # a single set (or a fine-tune): new images of it are read at its scale and polarity
            meta["input_scale"] = float(stacks[0]["scale"])
            meta["input_invert"] = bool(stacks[0]["invert"])
    return meta


def _episode_crop(pair, size: int, zoom: float, rng):
    """A random crop of ``size / zoom`` pixels resized to ``size`` (scale augmentation)."""
    src = max(8, int(round(size / zoom)))
    img, lab, _ = _random_crop(*pair, src, rng)
    if src != size:
        img = _resize_to(img, (size, size))
        lab_f = ndi.zoom(np.nan_to_num(lab, nan=-1.0), size / src, order=0)
        lab_f = np.pad(lab_f, [(0, max(0, size - d)) for d in lab_f.shape], mode="edge")[:size, :size]
        lab = np.where(lab_f < 0, np.nan, lab_f).astype(np.float32)
    return img, lab


def _bank_pairs(stacks, max_images: int = 16):
    """At most ``max_images`` annotated images, evenly spaced within each set, for the saved bank
    (encoding every training image of several stacks would cost more than the training)."""
    per = max(1, max_images // len(stacks))
    out = []
    for st in stacks:
        pairs = st["pairs"]
        sel = np.unique(np.linspace(0, len(pairs) - 1, min(per, len(pairs))).round().astype(int))
        out += [pairs[i] for i in sel]
    return out


def iter_train_membrane(
    images=None,
    labels=None,
    *,
    membrane_value: int = 1,
    sets=None,
    use_reference: bool = True,
    feedback: bool = True,
    epochs: int = 10,
    steps_per_epoch: int = 40,
    batch_size: int = 4,
    crop: int = 128,
    lr: float = 2e-3,
    base: int = 16,
    depth: int = 3,
    emb_dim: int = 16,
    keys_per_ref: int = 128,
    attn_stride: int = 2,
    aux_weight: float = 0.5,
    elastic: bool = True,
    scale_aug: float = 1.25,
    polarity_aug: float = 0.25,
    width: Optional[float] = None,
    seed: int = 0,
    device="auto",
    init: Optional["TrainedMembrane"] = None,
    time_limit: Optional[float] = None,
    clock=time.perf_counter,
    input_scale: Optional[float] = None,
):
    """Episodic training job. Yields Progress (loss, epoch); returns a :class:`TrainedMembrane`.

    ``images``/``labels``/``membrane_value`` is one annotated set; ``sets`` adds more,
    each ``(images, labels, membrane_value)`` (e.g. several stacks with different label
    conventions). Every set is rescaled so its membrane width (from its labels) is the
    training width ``width`` (default: the median over the sets; a fine-tune keeps the
    model's) and inverted to dark membranes where its membranes are bright. Each episode
    draws a set, a target crop and a reference crop from another slice of that set; both
    get the same random scale (``1/scale_aug``..``scale_aug``) and, with probability
    ``polarity_aug``, the same intensity inversion.

    ``init`` fine-tunes a loaded model (its architecture wins). Cancelling
    returns the best model so far (lowest epoch loss), with its reference bank.
    ``time_limit`` (s) stops early (still returning a full model); the learning rate
    then follows a cosine over the time budget. ``clock`` measures it (wall time; a
    benchmark on a shared machine may pass ``time.process_time``). ``input_scale`` zooms
    every set by that factor instead of by training width / its measured width.
    """
    dev = resolve_device(device)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    # references use their own stream, so reference and baseline models see identical target crops
    rrng = np.random.default_rng(int(seed) + 7919)
    fbrng = np.random.default_rng(int(seed) + 104729)
    tg = torch.Generator().manual_seed(int(seed) + 1)
    all_sets = training_sets(images, labels, membrane_value, sets)
    if width is None and init is not None:
        width = init.metadata.get("train_width")
    stacks, W = _prepare_stacks(all_sets, width, scale=input_scale)
    crop = int(crop)
    if init is not None:
        model = copy.deepcopy(init.model)
        arch = dict(model.arch)
    else:
        arch = dict(base=base, depth=depth, norm="group", use_reference=use_reference,
                    feedback=feedback, emb_dim=emb_dim, keys_per_ref=keys_per_ref,
                    attn_stride=attn_stride)
        model = MembraneNet(**arch)
    mult = model.multiple
    crop = max(mult, crop - crop % mult)
    # reference crops are half the size: keys are a sample of pixels anyway, and this keeps
    # the extra cost of the reference branch at about a quarter of the target's
    ref_crop = max(mult, (crop // 2) - (crop // 2) % mult)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    timed = time_limit is not None
    total = None if timed else int(epochs) * int(steps_per_epoch)
    if timed:
        sched = None
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2),
                                                    pct_start=0.15)
    n_images = sum(len(st["pairs"]) for st in stacks)
    train_params = dict(epochs=int(epochs), steps_per_epoch=int(steps_per_epoch),
                        batch_size=int(batch_size), crop=crop, lr=lr, aux_weight=aux_weight,
                        elastic=bool(elastic), scale_aug=float(scale_aug), polarity_aug=float(polarity_aug),
                        seed=int(seed), n_images=n_images, n_sets=len(stacks),
                        fine_tuned=init is not None, time_limit=time_limit)
    meta = _metadata(arch, train_params, all_sets[0][2], stacks, W)
    best_state, best_loss = None, math.inf
    history = []
    throttle = Throttle(0.5)
    t0 = clock()
    t_wall = time.perf_counter()
    cancelled = False
    step = 0
    log_zoom = math.log(max(1.0, float(scale_aug)))

    def episode():
        st = stacks[int(rng.integers(len(stacks)))]
        pairs = st["pairs"]
        zoom = math.exp(rng.uniform(-log_zoom, log_zoom)) if log_zoom > 0 else 1.0
        flip = rng.random() < polarity_aug
        i = int(rng.integers(len(pairs)))
        img, lab = _episode_crop(pairs[i], crop, zoom, rng)
        a, b = augment(img, lab, rng, elastic)
        ref = None
        if model.use_reference:
            n = len(pairs)
            j = int(rrng.choice([q for q in range(n) if q != i])) if n > 1 else i
            for _try in range(10):  # a reference crop with both classes
                rimg, rlab = _episode_crop(pairs[j], ref_crop, zoom, rrng)
                if np.nansum(rlab) > 0 and np.nansum(1 - rlab) > 0:
                    break
            ra, rb = augment(rimg, rlab, rrng, elastic)
            ref = (1 - ra if flip else ra, rb)
        return (1 - a if flip else a), b, ref

    def batch():
        xs, ys, rx, ry = [], [], [], []
        for _ in range(batch_size):
            a, b, ref = episode()
            xs.append(a)
            ys.append(b)
            if ref is not None:
                rx.append(ref[0])
                ry.append(ref[1])
        xt = torch.from_numpy(np.stack(xs)[:, None]).to(dev)
        yt = torch.from_numpy(np.stack(ys)[:, None]).to(dev)
        if rx:
            rxt = torch.from_numpy(np.stack(rx)[:, None]).to(dev)
            ryt = torch.from_numpy(np.stack(ry))
        else:
            rxt = ryt = None
        return xt, yt, rxt, ryt

    def step_loss(xt, yt, rxt, ryt):
        w = torch.isfinite(yt).float()
        y = torch.nan_to_num(yt, nan=0.0)
        keys = vals = None
        if model.use_reference:
            _, re = model.encode(rxt)
            kv = [sample_keys(re[b], ryt[b].to(re.device), model.keys_per_ref, tg) for b in range(re.shape[0])]
            keys = torch.stack([k for k, _ in kv])[:, None]
            vals = torch.stack([v for _, v in kv])[:, None].to(re.device)
        prev = None
        if model.feedback and fbrng.random() < 0.5:
            # feedback episode: a no-grad first pass gives the probability fed back as input
            with torch.no_grad():
                f0, e0 = model.encode(xt)
                l0, _ = model.fuse_logits(f0, e0, keys, vals)
                prev = torch.sigmoid(l0)
        f, e = model.encode(xt, prev)
        logit, p = model.fuse_logits(f, e, keys, vals)
        loss = _loss(logit, y, w)
        if p is not None and aux_weight > 0:
            loss = loss + aux_weight * (F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), y, weight=w,
                                                               reduction="sum") / w.sum().clamp_min(1))
        return loss

    def out_of_time():
        return timed and clock() - t0 > time_limit

    try:
        for ep in range(int(epochs)):
            ep_losses = []
            for _ in range(int(steps_per_epoch)):
                if timed:  # cosine over the time budget
                    frac = min(1.0, (clock() - t0) / max(time_limit, 1e-6))
                    for g in opt.param_groups:
                        g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
                xt, yt, rxt, ryt = batch()
                loss = step_loss(xt, yt, rxt, ryt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                lv = float(loss.detach())
                ep_losses.append(lv)
                if throttle():
                    where = f"step {step}, {clock() - t0:.0f}/{time_limit:.0f} s" if timed else \
                        f"epoch {ep + 1}/{epochs} step {step}/{total}"
                    yield Progress(step, total, f"{where} loss {lv:.4f}",
                                   metrics={"loss": lv, "epoch": ep + 1, "step": step})
                if out_of_time():
                    break
            el = float(np.mean(ep_losses))
            history.append({"epoch": ep + 1, "loss": el, "seconds": time.perf_counter() - t_wall})
            if el < best_loss or timed:  # a timed run keeps its last state (the cosine ends there)
                best_loss = min(best_loss, el)
                best_state = copy.deepcopy(model.state_dict())
            yield Progress(step, total, f"{'step ' + str(step) if timed else f'epoch {ep + 1}/{epochs}'} loss {el:.4f}",
                           metrics={"loss": el, "epoch": ep + 1, "step": step, "best_loss": best_loss})
            if out_of_time():
                break
    except JobCancelled:
        cancelled = True
    if best_state is not None:
        # keep the best epoch (lowest mean loss); the last epoch is usually the best with OneCycle
        model.load_state_dict(best_state)
    model.eval()
    meta["train"].update(steps_done=step, seconds=round(time.perf_counter() - t_wall, 2),
                         best_loss=None if best_loss == math.inf else best_loss, cancelled=cancelled)
    bank = None
    if model.use_reference:
        bank = build_bank(model, _bank_pairs(stacks), dev, crop=crop, seed=seed)
    return TrainedMembrane(model.cpu() if dev.type != "cpu" else model, meta, bank, history, cancelled)


def train_membrane(images=None, labels=None, callback=None, **kw) -> TrainedMembrane:
    """Train (see :func:`iter_train_membrane`) and return the :class:`TrainedMembrane`."""
    res = run_job(iter_train_membrane(images, labels, **kw), callback)
    if res.value is None:
        raise JobCancelled()
    return res.value


def iter_finetune_membrane(model, images, labels, *, membrane_value: Optional[int] = None,
                           seconds: float = 60.0, lr: float = 1e-3, batch_size: int = 4,
                           crop: Optional[int] = None, seed: int = 0, device="auto",
                           clock=time.perf_counter, choose_scale: bool = True):
    """Job: fine-tune a trained model on a few annotated slices for a fixed time.

    ``model``: a :class:`TrainedMembrane` or a model path (not modified). The slices are
    brought to the model's training scale and polarity (measured from their labels), and
    the returned model remembers them, so it reads new images of the same stack the same way.
    ``choose_scale``: the scale is chosen as for references
    (:meth:`MembranePredictor.set_references`: the candidate at which the model best
    reproduces the slices' labels) before fine-tuning starts.
    """
    tm = model if isinstance(model, TrainedMembrane) else load_model(model)
    if seconds is None or not seconds > 0:
        raise InputError(f"fine-tuning time must be positive seconds; got {seconds}")
    mv = tm.metadata.get("membrane_value", 1) if membrane_value is None else int(membrane_value)
    crop = int(crop or tm.metadata.get("train", {}).get("crop", 128))
    scale = None
    if choose_scale and tm.metadata.get("train_width"):
        yield Progress(0, 1, "choosing the scale on the annotated slices")
        pr = MembranePredictor(tm, device=device).set_references(images, labels, membrane_value=mv)
        scale = pr.scale if pr.scale_scores else None
    res = yield from iter_train_membrane(images, labels, membrane_value=mv, init=tm, epochs=1000,
                                         steps_per_epoch=20, batch_size=batch_size, crop=crop, lr=lr,
                                         seed=seed, device=device, time_limit=float(seconds), clock=clock,
                                         input_scale=scale)
    res.metadata["train"]["fine_tune_seconds"] = float(seconds)
    return res


def finetune_membrane(model, images, labels, callback=None, **kw) -> TrainedMembrane:
    """Fine-tune (see :func:`iter_finetune_membrane`) and return the new :class:`TrainedMembrane`."""
    res = run_job(iter_finetune_membrane(model, images, labels, **kw), callback)
    if res.value is None:
        raise JobCancelled()
    return res.value


# --------------------------------------------------------------------------- prediction


def _check_bank(arch: dict, meta: dict, sd: dict) -> None:
    """The saved reference bank: all three tensors or none, with consistent shapes."""
    names = ("bank.keys", "bank.vals", "bank.means")
    have = [n for n in names if n in sd]
    if not have:
        return
    if len(have) != 3:
        raise ModelFileError(f"membrane model reference bank is incomplete (has {', '.join(have)})")
    k, v, m = (sd[n] for n in names)
    E = arch["emb_dim"]
    if (k.ndim != 3 or k.shape[-1] != E or tuple(v.shape) != tuple(k.shape[:2])
            or tuple(m.shape) != (k.shape[0], E)):
        raise ModelFileError(f"membrane model reference bank shapes {tuple(k.shape)}, {tuple(v.shape)}, "
                             f"{tuple(m.shape)} do not fit emb_dim {E}")
    mv = meta.get("membrane_value")
    if mv is not None and (not isinstance(mv, int) or isinstance(mv, bool)):
        raise ModelFileError(f"membrane model 'membrane_value' must be an integer, got {mv!r:.40}")


#: what a saved membrane model must look like (checked by ``core.modelcheck.build_model``)
MODEL_SPEC = ModelSpec(
    CAPABILITY,
    arch={"base": Param("int", 1, 512), "depth": Param("int", 1, 8),
          "norm": Param("str", choices=("batch", "group", "instance", "none")),
          "use_reference": Param("bool"), "feedback": Param("bool"), "emb_dim": Param("int", 1, 1024),
          "keys_per_ref": Param("int", 1, 1 << 16), "attn_stride": Param("int", 1, 64)},
    defaults=DEFAULT_ARCH,
    build=lambda a: MembraneNet(**a),
    weights=lambda sd: {k: v for k, v in sd.items() if not k.startswith("bank.")},
    activation=lambda a: unet_activation(a["base"], a["depth"], 2),
    check=_check_bank)


def load_model(path_or_state, metadata: Optional[dict] = None) -> TrainedMembrane:
    """A :class:`TrainedMembrane` from a model file (checked to be a membrane model) or (state, meta)."""
    if metadata is None:
        sd, meta = store.load(path_or_state, capability=CAPABILITY)
        source = path_or_state
    else:
        if not isinstance(path_or_state, dict):
            raise ModelFileError("membrane model weights must be a dict of tensors")
        sd, meta, source = dict(path_or_state), metadata, None
    model, _ = checked_model(MODEL_SPEC, sd, meta, source)  # types, keys, size, weights
    return TrainedMembrane(model, dict(meta), ReferenceBank.from_state(sd))


class MembranePredictor:
    """Runs a trained model on 2D images with (retrieved, averaged) references.

    ``references(images, labels)`` replaces the bank (the model's saved
    training references are used otherwise). ``probability(image)`` returns the
    membrane probability (Y, X) float32, tiled for large images.
    """

    def __init__(self, trained: TrainedMembrane, device="auto", n_refs: int = 4,
                 feedback_iters: Optional[int] = None, tile: int = 512, overlap: int = 32,
                 scale: Optional[float] = None, invert: Optional[bool] = None, use_references: bool = True,
                 ref_head: bool = True):
        self.trained = trained
        self.device = resolve_device(device)
        self.model = trained.model.to(self.device).eval()
        self.use_references = bool(use_references) and self.model.use_reference
        self.bank = trained.bank
        self.n_refs = int(n_refs)
        if self.n_refs < 1:
            raise InputError("n_refs must be at least 1")
        self.feedback_iters = (1 if self.model.feedback else 0) if feedback_iters is None else int(feedback_iters)
        if self.feedback_iters < 0:
            raise InputError(f"feedback iterations must be 0 or more, got {self.feedback_iters}")
        if self.feedback_iters > 0 and not self.model.feedback:
            raise InputError("this model was trained without feedback; set feedback iterations to 0")
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.ref_ranges: list = []
        self.seed = int(trained.metadata.get("train", {}).get("seed", 0))
        if scale is not None and not (0.05 <= float(scale) <= 20):
            raise InputError(f"scale must be between 0.05 and 20; got {scale}")
        # explicit scale / polarity win; else the references' (set_references); else the model's
        self.scale_override, self.invert_override = scale, invert
        self.scale = float(scale) if scale is not None else float(trained.metadata.get("input_scale", 1.0))
        self.invert = bool(invert) if invert is not None else bool(trained.metadata.get("input_invert", False))
        self.ref_width: Optional[float] = None
        #: membrane F1 on the references at each candidate scale (empty when no choice was made)
        self.scale_scores: dict = {}
        #: fit a per-pixel head to the references given with set_references (None until then)
        self.ref_head = bool(ref_head)
        self.head: Optional[PixelHead] = None

    def set_references(self, images, labels, membrane_value: Optional[int] = None, crop: int = 128,
                       estimate_scale: bool = True, choose_scale: bool = True):
        """Encode annotated images as the references. Their membrane width (from the labels) sets
        the scale the target is read at (the model's training width / theirs) and their
        polarity whether it is inverted, unless ``scale``/``invert`` were given explicitly.

        ``choose_scale``: the width measured from labels can mislead (labels drawn thinner or
        thicker than the membranes in the image), so the scale is chosen among the measured
        one, 1 (the image as it is) and their geometric mean by how well each reproduces
        the references' own labels (membrane F1 on the reference images;
        :attr:`scale_scores`).

        With ``ref_head`` the references' labels also fit the per-pixel head that gives the
        final probability (:meth:`fit_head`)."""
        mv = self.trained.metadata.get("membrane_value", 1) if membrane_value is None else membrane_value
        pairs, self.ref_ranges = prepare_references(images, labels, mv)
        self.head = None
        probs = self._set_scale_and_bank(pairs, crop, estimate_scale, choose_scale)
        if self.ref_head:
            self.fit_head(pairs, probs)
        return self

    def _set_scale_and_bank(self, pairs, crop: int, estimate_scale: bool, choose_scale: bool):
        """The scale and polarity the references imply (see :meth:`set_references`), and their bank.
        Returns the references' probabilities at the chosen scale when a choice computed them, else None."""
        W = self.trained.metadata.get("train_width")
        self.scale_scores = {}
        if estimate_scale and W:
            self.ref_width = membrane_width([m for _, m in pairs])
            if self.scale_override is None:
                self.scale = float(np.clip(W / self.ref_width, 0.2, 5.0))
            if self.invert_override is None:
                self.invert = membrane_polarity(pairs) > 0
            if self.scale_override is None and choose_scale and abs(np.log(self.scale)) > np.log(1.1):
                candidates = (self.scale, float(np.sqrt(self.scale)), 1.0)
                banks, scores, probs = [], [], []
                for s in candidates:
                    self.scale = s
                    banks.append(self._encode(pairs, crop).bank)
                    probs.append(reference_probabilities(self, pairs))
                    scores.append(reference_f1(self, pairs, probs=probs[-1]))
                best = int(np.argmax(scores))  # the first of equals: a tie keeps the measured scale
                self.scale, self.bank = candidates[best], banks[best]
                self.scale_scores = {round(s, 4): f for s, f in zip(candidates, scores)}
                return probs[best]
        self._encode(pairs, crop)
        return None

    def fit_head(self, pairs, probs=None) -> None:
        """Fit the reference head to annotated (normalised image, mask with NaN = unlabelled)
        pairs: a per-pixel MLP on the filter bank and the network's probability of each image
        (``probs``, when already computed at the current scale)."""
        self.head = None
        if probs is None:
            probs = reference_probabilities(self, pairs)
        rng = np.random.default_rng(self.seed)
        max_px = max(1 << 12, _HEAD_MAX_PX // len(pairs))  # the same bound for many references together
        feats, targets = zip(*[_head_samples(im, p, m, self.device, rng, max_px=max_px)
                               for (im, m), p in zip(pairs, probs)])
        self.head = PixelHead(seed=self.seed).fit(feats, targets)

    def _head_tile(self, tile: np.ndarray) -> np.ndarray:
        """(2, h, w) tile of normalised image and network probability → (1, h, w) head probability."""
        return self.head.predict(_head_features(tile[0], tile[1], self.device))[None].cpu().numpy()

    def _encode(self, pairs, crop: int):
        """The reference bank of normalised (image, mask) pairs at the current scale and polarity."""
        if not self.model.use_reference:
            return self
        pairs = [rescale_pair(1 - im if self.invert else im, m, self.scale) for im, m in pairs]
        self.bank = build_bank(self.model, pairs, self.device, crop=crop, seed=self.seed)
        return self

    @torch.no_grad()
    def tile_fn(self, tile: np.ndarray) -> np.ndarray:
        """Normalised (C, h, w) tile → (1, h, w) membrane probability."""
        m = self.model
        t = np.asarray(tile[:1], np.float32)
        if self.invert:
            t = 1 - t
        x, (h, w) = pad_to_multiple(t, m.multiple)
        xt = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device)
        keys = vals = None
        prev = None
        for it in range(1 + self.feedback_iters):
            f, e = m.encode(xt, prev)
            if self.use_references:
                if self.bank is None:
                    raise InputError("no references: give reference images with labels (the model has none saved)")
                if it == 0 or keys is None:
                    idx = self.bank.retrieve(e[0, :, :h, :w].mean((1, 2)).cpu(), self.n_refs)
                    keys = self.bank.keys[idx][None].to(self.device)
                    vals = self.bank.vals[idx][None].to(self.device)
            logit, _ = m.fuse_logits(f, e, keys, vals)
            prev = torch.sigmoid(logit)
        return prev[0, :, :h, :w].float().cpu().numpy()

    def iter_probability(self, image, lohi=None):
        """Job: (Y, X) image (numpy/dask/zarr) → probability (Y, X) float32, tiled in bounded memory."""
        check_image(image, name="target image")
        if image.ndim != 2:
            raise InputError(f"expected a 2D target image; got shape {tuple(image.shape)}")
        if lohi is None:
            lohi = percentile_range(image)
        if self.ref_ranges:
            msg = intensity_scale_warning(lohi, self.ref_ranges)
            if msg:
                warnings.warn(msg, stacklevel=2)
        pre = lambda t: normalize(t, lohi=lohi)  # noqa: E731
        if abs(self.scale - 1) < 0.02:
            out = yield from iter_tiled(self.tile_fn, image[None], tile=self.tile, overlap=self.overlap,
                                        preprocess=pre)
            prob = out[0]
        else:
            # read at the training scale: zoom the normalised image, predict, zoom the probability back
            x = ndi.zoom(normalize(np.asarray(image), lohi=lohi), self.scale, order=1)
            out = yield from iter_tiled(self.tile_fn, x[None], tile=self.tile, overlap=self.overlap)
            prob = np.clip(_resize_to(out[0], image.shape), 0, 1)
        if self.head is None:
            return prob
        out = yield from iter_tiled(self._head_tile, _HeadInput(image, prob, lohi), tile=self.tile,
                                    overlap=_HEAD_HALO)
        return out[0]

    def probability(self, image, lohi=None) -> np.ndarray:
        return run_job(self.iter_probability(image, lohi)).value


_HEAD_HALO = 32  # tile overlap of the reference head: its filter bank reaches 3 sigma = 24 px


def _head_features(img, prob, device) -> torch.Tensor:
    """(F, Y, X) inputs of the reference head: the filter bank (``HEAD_SIGMAS``) of a normalised
    image and the network's membrane probability (and its logit)."""
    x = torch.as_tensor(np.asarray(img, np.float32), device=device)[None, None]
    p = torch.as_tensor(np.asarray(prob, np.float32), device=device).clamp(_EPS, 1 - _EPS)[None]
    return torch.cat([multiscale_features(x, HEAD_SIGMAS)[0], torch.logit(p), p])


#: the reference head is fitted on at most about this many pixels of all references together: a
#: larger reference has its features computed in row bands and its labelled pixels sampled
#: (bounded memory for any size and number of references)
_HEAD_MAX_PX = 1 << 20


def _head_samples(img, prob, mask, device, rng, max_px: int = _HEAD_MAX_PX, band: int = 256):
    """Features (F, n, 1) and labels (n, 1) that fit the reference head on one reference: the whole
    image (NaN = unlabelled) when it is small; else up to ``max_px`` sampled labelled pixels, their
    features computed in row bands of ``band`` rows with the head's halo."""
    mask = np.asarray(mask, np.float32)
    Y, X = mask.shape
    if Y * X <= max_px:
        return _head_features(img, prob, device), torch.from_numpy(mask).to(device)
    lab = ~np.isnan(mask)
    keep = min(1.0, max_px / max(1, int(lab.sum())))
    fs, ts = [], []
    for a in range(0, Y, band):
        b = min(Y, a + band)
        sel = lab[a:b] & (rng.random((b - a, X)) < keep)
        if not sel.any():
            continue
        lo, hi = max(0, a - _HEAD_HALO), min(Y, b + _HEAD_HALO)
        f = _head_features(img[lo:hi], prob[lo:hi], device)[:, a - lo:b - lo].reshape(-1, (b - a) * X)
        fs.append(f[:, torch.from_numpy(np.flatnonzero(sel)).to(device)])
        ts.append(torch.from_numpy(mask[a:b][sel]))
    if not fs:
        raise InputError("no labelled pixels in the reference labels")
    return torch.cat(fs, 1)[..., None], torch.cat(ts).to(device)[:, None]


class _HeadInput:
    """(2, Y, X) view of a raw image (normalised with ``lohi`` when read) and a probability map,
    read tile by tile by ``iter_tiled``."""

    def __init__(self, image, prob: np.ndarray, lohi):
        self.image, self.prob, self.lohi = image, prob, lohi
        self.shape = (2, *prob.shape)
        self.ndim = 3

    def __getitem__(self, key):
        _, sy, sx = key
        return np.stack([normalize(np.asarray(self.image[sy, sx]), lohi=self.lohi), self.prob[sy, sx]])


def reference_probabilities(predictor: "MembranePredictor", pairs) -> list:
    """The predictor's membrane probability of each (normalised image, mask) pair's image."""
    ranges, predictor.ref_ranges = predictor.ref_ranges, []  # already normalised: no intensity warning
    try:
        return [predictor.probability(im, lohi=(0.0, 1.0)) for im, _ in pairs]
    finally:
        predictor.ref_ranges = ranges


def reference_f1(predictor: "MembranePredictor", pairs, threshold: float = 0.5, probs=None) -> float:
    """Pooled membrane F1 of ``predictor`` on annotated (normalised image, mask) pairs,
    unlabeled (NaN) pixels ignored: how well it reproduces the references' own labels
    (``probs``: its probabilities of the pairs' images, when already computed)."""
    tp = fp = fn = 0
    if probs is None:
        probs = reference_probabilities(predictor, pairs)
    for (im, m), p in zip(pairs, probs):
        pred = p >= threshold
        lab = ~np.isnan(m)
        true = np.nan_to_num(m, nan=0.0) > 0.5
        tp += int((pred & true & lab).sum())
        fp += int((pred & ~true & lab).sum())
        fn += int((~pred & true & lab).sum())
    return 2 * tp / max(1, 2 * tp + fp + fn)


def cells_from_probability(prob: np.ndarray, threshold: float = 0.5, min_size: int = 30,
                           smooth: float = 1.0, membrane_background: bool = False) -> np.ndarray:
    """Cell instances: watershed of the (smoothed) probability from non-membrane seeds.

    Seeds are connected components of ``prob < threshold`` with at least
    ``min_size`` pixels; every pixel is flooded to a seed (smaller regions merge
    into a neighbour). ``membrane_background`` sets membrane pixels to 0.
    """
    from skimage.segmentation import watershed

    p = ndi.gaussian_filter(np.asarray(prob, np.float32), smooth) if smooth > 0 else np.asarray(prob, np.float32)
    seeds, nseeds = ndi.label(p < threshold)
    if nseeds == 0:
        return np.zeros(p.shape, np.uint32)
    sizes = np.bincount(seeds.ravel())
    keep = sizes >= max(1, int(min_size))
    keep[0] = False
    lut = np.zeros(sizes.size, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    seeds = lut[seeds]
    if seeds.max() == 0:
        return np.zeros(p.shape, np.uint32)
    cells = watershed(p, seeds).astype(np.uint32)
    if membrane_background:
        cells[np.asarray(prob) >= threshold] = 0
    return cells


def _as_target_slices(images):
    if isinstance(images, (list, tuple)):
        return [(np.asarray(im) if not hasattr(im, "chunks") else im) for im in images], False
    shape = getattr(images, "shape", None)
    if shape is None:
        raise InputError("target image must be an array")
    if len(shape) == 2:
        return [images], False
    if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4:
        return [np.asarray(images)[..., :3].mean(-1)], False
    if len(shape) == 3:
        return [images[z] for z in range(shape[0])], True
    raise InputError(f"target must be a 2D image or a 3D stack; got shape {tuple(shape)}")


def iter_predict_membrane(model, images, ref_images=None, ref_labels=None, *,
                          membrane_value: Optional[int] = None, n_refs: int = 4,
                          feedback_iters: Optional[int] = None, threshold: float = 0.5,
                          min_size: int = 30, membrane_background: bool = False,
                          device="auto", tile: int = 512, scale: Optional[float] = None,
                          invert: Optional[bool] = None, use_references: bool = True, ref_head: bool = True):
    """Job: predict a 2D image or a stack slice by slice.

    ``model``: a :class:`TrainedMembrane`, a model path, or a ``MembranePredictor``.
    References (``ref_images``/``ref_labels``) replace the model's saved ones; their
    membrane width sets the scale the target is read at (``scale`` overrides it: the
    factor the target is zoomed by before the network sees it) and their polarity
    whether it is inverted (``invert`` overrides). ``use_references=False`` runs the
    network's plain head (no attention over references). ``ref_head=False`` skips the
    per-pixel head fitted to the given references (:meth:`MembranePredictor.fit_head`).
    Returns a dict with ``probability`` (float32), ``membrane`` (uint8 0/1) and
    ``cells`` (uint32), stacked like the input. A cancelled job returns the
    slices done so far (the rest zero) with ``done`` = number of slices.
    """
    if isinstance(model, MembranePredictor):
        pred = model
    else:
        tm = model if isinstance(model, TrainedMembrane) else load_model(model)
        pred = MembranePredictor(tm, device=device, n_refs=n_refs, feedback_iters=feedback_iters, tile=tile,
                                 scale=scale, invert=invert, use_references=use_references, ref_head=ref_head)
    if (ref_images is None) != (ref_labels is None):
        raise InputError("give both reference images and reference labels (or neither)")
    if ref_images is not None:
        yield Progress(0, None, "encoding references")
        pred.set_references(ref_images, ref_labels, membrane_value)
    elif pred.use_references and pred.bank is None:
        raise InputError("fewer than 1 reference: give reference images with labels")
    slices, stacked = _as_target_slices(images)
    probs, masks, cells = [], [], []
    done = 0
    total = len(slices)
    try:
        for z, im in enumerate(slices):
            p = yield from pred.iter_probability(im)
            probs.append(p)
            masks.append((p >= threshold).astype(np.uint8))
            cells.append(cells_from_probability(p, threshold, min_size, membrane_background=membrane_background))
            done += 1
            yield Progress(done, total, f"slice {done}/{total}", preview=p)
    except JobCancelled:
        if done == 0:
            raise
    while len(probs) < total:
        shp = tuple(slices[len(probs)].shape[-2:])
        probs.append(np.zeros(shp, np.float32))
        masks.append(np.zeros(shp, np.uint8))
        cells.append(np.zeros(shp, np.uint32))
    if stacked:
        out = {"probability": np.stack(probs), "membrane": np.stack(masks), "cells": np.stack(cells)}
    else:
        out = {"probability": probs[0], "membrane": masks[0], "cells": cells[0]}
    out["done"] = done
    return out


def predict_membrane(model, images, ref_images=None, ref_labels=None, callback=None, **kw) -> dict:
    """Run :func:`iter_predict_membrane` to the end and return its dict."""
    res = run_job(iter_predict_membrane(model, images, ref_images, ref_labels, **kw), callback)
    if res.value is None:
        raise JobCancelled()
    return res.value


def predictor_from_model(state_dict, metadata, device="auto") -> Predictor:
    """A tiler/dask :class:`Predictor` (probability → binary membrane) using the saved reference bank."""
    tm = load_model(state_dict, metadata)
    mp = MembranePredictor(tm, device=device)
    if tm.model.use_reference and tm.bank is None:
        raise ModelFileError("this membrane model has no saved references; use `leakseg membrane predict --ref-images`")
    return Predictor(
        fn=mp.tile_fn,
        in_channels=1,
        out_channels=1,
        finalize=lambda b: (np.asarray(b)[0] >= 0.5).astype(np.uint8),
        output="labels",
        halo=32,
        tile=512,
        capability=CAPABILITY,
        metadata=dict(metadata),
        preprocess=None,
    )
