"""Training and inference of the propagation U-Net (one per session), and saved models."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device import fast_layout, resolve_device, seed_everything
from ..core.errors import LeaksegError
from ..core.labels import smallest_uint
from ..core.predictor import Predictor
from ..core.tiling import pad_to_multiple, predict_tiled
from ..core.modelcheck import ModelSpec, Param, build_model as checked_model, check_value, unet_activation
from ..core.unet import UNet
from .common import PropagateParams, Sample


class Trainer:
    """The network of a session: built on the anchors' classes, trained on crops of
    anchors + pseudo frames, restored to its "base" state (trained on anchors only)
    before each walk."""

    def __init__(self, params: PropagateParams, device):
        self.params = params
        self.device = device
        self._layout = fast_layout(device)  # channels-last where convolutions run faster in it
        self.model: Optional[UNet] = None
        self.base_state: Optional[dict] = None
        self._opt = None
        self._rng = np.random.default_rng(params.seed)

    # ------------------------------------------------------------ model state
    def new_model(self, n_classes: int, anchors: Sequence[Sample]) -> None:
        p = self.params
        seed_everything(p.seed)
        self.model = UNet(1, n_classes, base=p.base, depth=p.depth, norm="group").to(
            self.device, memory_format=self._layout)
        self._opt = torch.optim.Adam(self.model.parameters(), lr=p.lr)
        self._rng = np.random.default_rng(p.seed)
        cnt = np.zeros(n_classes)
        for s in anchors:
            cnt += np.bincount(s.target.ravel(), minlength=n_classes)[:n_classes]
        freq = cnt / max(cnt.sum(), 1)
        w = np.maximum(freq, 1e-4) ** -float(p.balance)
        self._class_w = torch.tensor(w / w[freq > 0].min(), dtype=torch.float32, device=self.device)

    def keep_base(self) -> None:
        """Remember the current weights as the base every walk starts from."""
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore_base(self, seed: Optional[int] = None) -> None:
        """Back to the base weights with a fresh optimiser (and, with ``seed``, a
        reproducible crop sequence: a walk does not depend on what ran before it)."""
        if self.base_state is not None:
            self.model.load_state_dict(self.base_state)
        self._opt = torch.optim.Adam(self.model.parameters(), lr=self.params.lr)
        if seed is not None:
            self._rng = np.random.default_rng([self.params.seed, int(seed)])

    # --------------------------------------------------------------- training
    def crop(self, s: Sample):
        p = self.params
        img, tgt, w = s.image, s.target, s.weight
        m = 2 ** p.depth
        if img.shape[0] < m or img.shape[1] < m:
            # a frame thinner than the U-Net's smallest input (e.g. 1×N): pad it; padded pixels carry no loss
            pad = ((0, max(0, m - img.shape[0])), (0, max(0, m - img.shape[1])))
            w = np.pad(np.ones(img.shape, np.float32) if w is None else w, pad)
            img, tgt = np.pad(img, pad, mode="edge"), np.pad(tgt, pad)
        ps = min(p.patch, img.shape[0], img.shape[1])
        ps -= ps % (2 ** p.depth) if ps >= 2 ** p.depth else 0
        y = int(self._rng.integers(0, img.shape[0] - ps + 1))
        x = int(self._rng.integers(0, img.shape[1] - ps + 1))
        sl = (slice(y, y + ps), slice(x, x + ps))
        a = img[sl]
        b = tgt[sl]
        c = w[sl] if w is not None else np.ones_like(a)
        k = int(self._rng.integers(0, 4))
        flip = bool(self._rng.integers(0, 2))
        a, b, c = (np.rot90(v, k) for v in (a, b, c))
        if flip:
            a, b, c = (v[:, ::-1] for v in (a, b, c))
        # mild intensity augmentation: contrast/brightness jitter
        g = float(self._rng.uniform(0.85, 1.15))
        o = float(self._rng.uniform(-0.08, 0.08))
        a = a * g + o
        return np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(c)

    def pool_weights(self, pool: Sequence[Sample], current: Optional[int]) -> np.ndarray:
        """Sampling weights: anchors ``anchor_weight``, pseudo frames ``decay**(distance-1)``."""
        p = self.params
        wts = []
        for s in pool:
            if s.anchor:
                wts.append(p.anchor_weight)
            else:
                dist = abs(s.t - current) if current is not None else 1
                wts.append(p.decay ** max(dist - 1, 0))
        wts = np.asarray(wts, np.float64)
        return wts / wts.sum()

    def train(self, n: int, pool: Sequence[Sample], current: Optional[int] = None) -> float:
        """``n`` optimiser steps on crops of ``pool``; returns the mean loss."""
        if n <= 0 or not pool:
            return float("nan")
        p = self.params
        wts = self.pool_weights(pool, current)
        self.model.train()
        losses = []
        for _ in range(n):
            idx = self._rng.choice(len(pool), size=p.batch, p=wts)
            crops = [self.crop(pool[i]) for i in idx]
            # all crops in a batch must share a size: use the smallest frame
            hs = min(c[0].shape[0] for c in crops)
            ws = min(c[0].shape[1] for c in crops)
            xb = torch.from_numpy(np.stack([c[0][:hs, :ws] for c in crops]))[:, None].to(self.device)
            xb = xb.contiguous(memory_format=self._layout)
            yb = torch.from_numpy(np.stack([c[1][:hs, :ws] for c in crops])).to(self.device)
            wb = torch.from_numpy(np.stack([c[2][:hs, :ws] for c in crops])).to(self.device)
            logits = self.model(xb)
            ce = F.cross_entropy(logits, yb.clamp_min(0), weight=self._class_w, reduction="none")
            valid = (yb >= 0).float() * wb
            loss = (ce * valid).sum() / valid.numel()
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            self._opt.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    # -------------------------------------------------------------- inference
    def predict_ds(self, img_ds: np.ndarray) -> np.ndarray:
        """Class probabilities (K, y, x) at processing resolution."""
        p = self.params
        self.model.eval()
        model, dev, mult, layout = self.model, self.device, 2 ** p.depth, self._layout

        def fn(tile):
            x, (h, w) = pad_to_multiple(np.asarray(tile, np.float32), mult)
            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(x))[None].to(dev).contiguous(memory_format=layout)
                y = softmax_tta(model, t, p.tta)
            return y[0, :, :h, :w].cpu().numpy()

        return predict_tiled(fn, img_ds[None], tile=p.tile, overlap=32)


#: the flips test-time augmentation averages over (dims of an N×C×Y×X batch)
FLIPS = ((), (-1,), (-2,), (-2, -1))


def softmax_tta(model, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class probabilities of ``x`` (N×C×Y×X), averaged over its 4 flips when ``tta``.

    Measured on U373 (bench_propagate.py, frame 0 annotated): +0.007 fg IoU for the walk and
    +0.013 for the model trained on the annotated frame only, at 4 forward passes per frame
    instead of 1 (0.071 instead of ~0.04 s for a 352×264 frame on 2 cores, channels-last)."""
    if not tta:
        return torch.softmax(model(x), 1)
    out = 0
    for f in FLIPS:
        y = torch.softmax(model(x.flip(f) if f else x), 1)
        out = out + (y.flip(f) if f else y)
    return out / len(FLIPS)


# --------------------------------------------------------------------------- #
# saved models
# --------------------------------------------------------------------------- #
def _check_saved(arch: dict, meta: dict, sd: dict) -> None:
    for key in ("downsample",):
        if key in meta:
            check_value(key, meta[key], Param("int", 1, 64))
    train = meta.get("train") or {}
    if "downsample" in train and "downsample" not in meta:
        check_value("train.downsample", train["downsample"], Param("int", 1, 64))


#: what a saved propagate model must look like (checked by ``core.modelcheck.build_model``)
MODEL_SPEC = ModelSpec(
    "propagate",
    arch={"in_channels": Param("int", 1, 64), "out_channels": Param("int", 1, 4096), "base": Param("int", 1, 512),
          "depth": Param("int", 1, 8), "norm": Param("str", choices=("batch", "group", "instance", "none"))},
    required=("in_channels", "out_channels", "base", "depth"),
    build=lambda a: UNet(**a),
    activation=lambda a: unet_activation(a["base"], a["depth"], a["in_channels"]),
    check=_check_saved)


def predictor_from_model(state_dict, metadata, device="auto") -> Predictor:
    """A :class:`~napari_leakseg.core.predictor.Predictor` for a saved propagate model.

    ``fn`` maps a normalised full-resolution tile (1, h, w) to class
    probabilities (K, h, w), internally at 1/``downsample`` resolution;
    ``finalize`` takes the argmax.
    """
    dev = resolve_device(device)
    model, arch = checked_model(MODEL_SPEC, state_dict, metadata, None, dev)  # one validation step
    layout = fast_layout(dev)
    model = model.to(memory_format=layout)
    f = int(metadata.get("downsample", (metadata.get("train") or {}).get("downsample", 1)))
    mult = model.multiple * f
    tta = bool((metadata.get("train") or {}).get("tta", False))  # models saved before it predicted without

    def fn(tile: np.ndarray) -> np.ndarray:
        x, (h, w) = pad_to_multiple(np.asarray(tile, np.float32), mult)
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x))[None].to(dev)
            if f > 1:
                t = F.avg_pool2d(t, f)
            y = softmax_tta(model, t.contiguous(memory_format=layout), tta)
            if f > 1:
                y = F.interpolate(y, scale_factor=f, mode="bilinear", align_corners=False)
        return y[0, :, :h, :w].float().cpu().numpy()

    def finalize(block: np.ndarray) -> np.ndarray:
        return smallest_uint(np.argmax(block, 0))

    return Predictor(fn=fn, in_channels=arch.get("in_channels", 1),
                     out_channels=arch.get("out_channels", 2), finalize=finalize,
                     output="labels", halo=32 * f, tile=256 * f, capability="propagate",
                     metadata=dict(metadata))
