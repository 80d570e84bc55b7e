"""Time-series pseudo-label propagation with interactive correction.

After Mano, Kato and Hotta, "Semantic Segmentation by Semi-Supervised Learning
Using Time Series Constraint" (VISAPP 2023): a compact U-Net is trained on the
annotated frames of a time-lapse, then walks through time frame by frame:

1. predict the next frame;
2. keep the pixels whose confidence (max softmax probability) is ≥ ``tau`` as
   pseudo-labels, the others are ignored by the loss;
3. add the frame to a sliding training set (the ``window`` most recent pseudo
   frames), weighted per pixel by confidence and per frame by its distance in
   time to the frame being predicted;
4. fine-tune for ``steps`` steps, and go on.

The human in the loop: frames have a status (``annotated``, ``confirmed``,
``pseudo`` or ``pending``). Annotated and confirmed frames ("anchors") are
never modified. After the user corrects a frame and confirms it,
:meth:`Propagator.iter_resume` re-trains on all anchors and recomputes only the
frames between that frame and the next anchor in each direction.

Frames are read one at a time (``stack[t]``), so zarr/dask stacks stay bounded
in memory; the outputs can be any sliceable arrays (e.g. zarr) via ``out=`` and
``confidence_out=``.

Plain torch/numpy: this module never imports napari or Qt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .core.device import resolve_device, seed_everything
from .core.errors import InputError, JobCancelled, LeaksegError
from .core.jobs import Progress, run_job
from .core.labels import check_labels, smallest_uint
from .core.modelcheck import ModelSpec, Param, build_model as checked_model, check_value, unet_activation
from .core.normalize import check_image, normalize, percentile_range
from .core.predictor import Predictor
from .core.tiling import pad_to_multiple, predict_tiled
from .core.unet import UNet

__all__ = [
    "STATUSES",
    "PropagateParams",
    "Propagator",
    "iter_propagate",
    "propagate",
    "predictor_from_model",
    "link_instances",
    "iter_link_instances",
    "export_ctc",
    "ctc_seg",
    "foreground_iou",
]

#: per-frame statuses, in the order used by the integer status codes
STATUSES = ("pending", "annotated", "confirmed", "pseudo")
ANCHOR = ("annotated", "confirmed")
MAX_CLASSES = 32


@dataclass
class PropagateParams:
    """Propagation settings (all stored in saved-model metadata)."""

    tau: float = 0.9            #: confidence threshold for pseudo-labels
    steps: int = 6              #: fine-tune steps per propagated frame
    init_steps: int = 400       #: training steps on the anchors before walking
    resume_steps: int = 60      #: re-training steps on all anchors at a resume
    window: int = 4             #: how many recent pseudo frames stay in the training set
    decay: float = 0.7          #: per-frame weight factor for pseudo frames (distance in time)
    anchor_weight: float = 1.0  #: sampling weight of anchor frames vs pseudo frames (1 = equal)
    downsample: int = 2         #: frames are processed at 1/downsample resolution
    patch: int = 128            #: training crop size (at processing resolution)
    batch: int = 4
    lr: float = 3e-3
    base: int = 8               #: U-Net width
    depth: int = 3              #: U-Net poolings
    tile: int = 512             #: inference tile (processing resolution) for large frames
    min_size: int = 0           #: drop objects and fill holes smaller than this (pixels, full res)
    balance: float = 0.0        #: class weights ∝ frequency**-balance (0 = none, 0.5 = sqrt)
    seed: int = 0

    def check(self) -> "PropagateParams":
        if not (0.0 < float(self.tau) <= 1.0):
            raise InputError(f"tau must be in (0, 1], got {self.tau}")
        for name in ("steps", "init_steps", "resume_steps", "window"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if int(self.downsample) < 1:
            raise InputError(f"downsample must be ≥ 1, got {self.downsample}")
        if int(self.patch) < 2 ** int(self.depth) or int(self.batch) < 1:
            raise InputError("patch must be ≥ 2**depth and batch ≥ 1")
        if not (0.0 < float(self.decay) <= 1.0):
            raise InputError(f"decay must be in (0, 1], got {self.decay}")
        return self


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #
def _frame(stack, t: int) -> np.ndarray:
    """One frame as a numpy array (reads only that frame from zarr/dask)."""
    return np.asarray(stack[int(t)])


def _check_stack(stack) -> tuple[int, int, int]:
    shape = tuple(getattr(stack, "shape", ()))
    check_image(stack, name="time-lapse stack") if len(shape) else None
    if len(shape) == 4 and shape[-1] in (3, 4):
        raise InputError(
            f"RGB time-lapses are not supported (stack shape {shape}); "
            "convert to grayscale or pick one channel first"
        )
    if len(shape) == 2:
        raise InputError(
            f"a single-frame image (shape {shape}) is not a time-lapse; propagation needs T×Y×X with T ≥ 2"
        )
    if len(shape) != 3:
        raise InputError(f"expected a T×Y×X time-lapse stack; got shape {shape}")
    if shape[0] < 2:
        raise InputError(
            f"the stack has a single frame (shape {shape}); propagation needs at least 2 frames"
        )
    return shape  # type: ignore[return-value]


def _down_image(x: np.ndarray, f: int) -> np.ndarray:
    """Area-downsample a 2D float32 image by ``f`` (any size)."""
    if f == 1:
        return x.astype(np.float32, copy=False)
    Y, X = x.shape
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(-(-Y // f), -(-X // f)), mode="area")
    return out[0, 0].numpy()


def _down_labels(lab: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return lab
    return lab[::f, ::f]  # ceil(Y/f) × ceil(X/f), like _down_image


def _pad_shape(a: np.ndarray, shape: tuple[int, int], value) -> np.ndarray:
    py, px = shape[0] - a.shape[0], shape[1] - a.shape[1]
    if py <= 0 and px <= 0:
        return a[: shape[0], : shape[1]]
    return np.pad(a, ((0, max(py, 0)), (0, max(px, 0))), constant_values=value)[: shape[0], : shape[1]]


def foreground_iou(pred, gt) -> float:
    """IoU of the foreground (label > 0) of two label maps; 1.0 when both are empty."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    union = np.logical_or(p, g).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, g).sum() / union)


def clean_labels(lab: np.ndarray, min_size: int) -> np.ndarray:
    """Remove foreground objects smaller than ``min_size`` pixels; with a single
    class, also fill holes smaller than ``min_size``."""
    from scipy import ndimage as ndi

    lab = np.array(lab, copy=True)
    fg = lab > 0
    cc, n = ndi.label(fg)
    if n:
        sizes = np.bincount(cc.ravel())
        small = sizes < min_size
        small[0] = False
        lab[small[cc]] = 0
    if lab.max() <= 1:
        holes, nh = ndi.label(lab == 0)
        if nh:
            sizes = np.bincount(holes.ravel())
            # a background region touching the border is not a hole
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            fill = sizes < min_size
            fill[0] = False
            fill[border] = False
            lab[fill[holes]] = 1
    return lab


# --------------------------------------------------------------------------- #
# the session
# --------------------------------------------------------------------------- #
@dataclass
class _Sample:
    """One frame of the training set at processing resolution."""

    t: int
    image: np.ndarray                 # (y, x) float32, normalised
    target: np.ndarray                # (y, x) int64, -1 = ignored
    weight: Optional[np.ndarray]      # (y, x) float32 per-pixel weight (None = 1)
    anchor: bool


@dataclass
class _Chain:
    anchor: int
    frames: list[int]
    direction: int  # +1 forward, -1 backward


class Propagator:
    """A propagation session: model, per-frame status, labels and confidence.

    Parameters
    ----------
    stack:
        T×Y×X array-like (numpy, zarr, dask). Frames are read one at a time.
    labels:
        T×Y×X label stack (0 = background, 1..K = classes). Frames with any
        nonzero label count as annotated, unless ``annotated`` lists them.
        Only the annotated frames are read. May be None when every anchor is
        later given with :meth:`confirm`.
    annotated:
        explicit annotated frame indices (each must have ≥ 2 classes).
    instances:
        binarise labels (cell vs background) for training; :meth:`instances`
        then splits the result into linked instances.
    out, confidence_out:
        optional pre-allocated T×Y×X outputs (e.g. zarr arrays) for very long
        stacks; by default numpy arrays are created.
    """

    def __init__(self, stack, labels=None, *, annotated: Optional[Sequence[int]] = None,
                 params: Optional[PropagateParams] = None, device="auto",
                 instances: bool = False, out=None, confidence_out=None, **kw):
        self.params = PropagateParams(**{**(asdict(params) if params else {}), **kw})
        self.params.check()
        self.stack = stack
        T, Y, X = _check_stack(stack)
        self.shape = (T, Y, X)
        self.instance_mode = bool(instances)
        self.device = resolve_device(device)
        self.status: list[str] = ["pending"] * T
        self.labels = out if out is not None else np.zeros((T, Y, X), np.uint8)
        self.confidence = confidence_out if confidence_out is not None else np.zeros((T, Y, X), np.uint8)
        if tuple(self.labels.shape) != (T, Y, X) or tuple(self.confidence.shape) != (T, Y, X):
            raise InputError("out / confidence_out must have the stack's T×Y×X shape")
        self._anchors: dict[int, _Sample] = {}
        self.n_classes = 0
        self.model: Optional[UNet] = None
        self._base_state: Optional[dict] = None
        self._gen = None
        self.history: list[dict] = []  # per-run record of what was computed
        if labels is not None:
            self._init_labels(labels, annotated)
        elif annotated:
            raise InputError("annotated frames were given but no label stack")

    # ------------------------------------------------------------------ setup
    def _init_labels(self, labels, annotated):
        T, Y, X = self.shape
        lshape = tuple(getattr(labels, "shape", np.shape(labels)))
        if len(lshape) != 3:
            raise InputError(f"the label stack must be T×Y×X like the image {self.shape}; got shape {lshape}")
        if lshape[0] != T:
            raise InputError(
                f"the label stack has {lshape[0]} frames but the image stack has {T}; they must match"
            )
        if lshape[1:] != (Y, X):
            raise InputError(
                f"label frames have shape {lshape[1]}×{lshape[2]} but image frames have shape {Y}×{X}; they must match"
            )
        if annotated is None:
            annotated = []
            for t in range(T):
                if np.any(np.asarray(labels[t])):
                    annotated.append(t)
        else:
            annotated = sorted({int(t) for t in annotated})
            bad = [t for t in annotated if not (0 <= t < T)]
            if bad:
                raise InputError(f"annotated frame(s) {bad} are outside the stack (0..{T - 1})")
        if not annotated:
            raise InputError("no annotated frame: paint labels on at least one frame (or pass --frames)")
        for t in annotated:
            self._set_anchor(t, labels[t], "annotated")

    def _prep_labels(self, lab, t: int, need_two: bool = True) -> np.ndarray:
        lab = check_labels(lab, self.shape[1:], name=f"labels of frame {t}")
        if self.instance_mode:
            lab = (lab > 0).astype(np.uint8)
        ids = np.unique(lab)
        if ids.size < 2 and need_two:
            raise InputError(
                f"frame {t} has only one class (label {int(ids[0])}); an annotated frame needs "
                "background (0) and at least one object class"
            )
        if ids.max() >= MAX_CLASSES:
            raise InputError(
                f"frame {t} has label values up to {int(ids.max())}; semantic mode supports at most "
                f"{MAX_CLASSES - 1} classes (for instance masks use instance mode / --instances)"
            )
        return smallest_uint(lab)

    def _set_anchor(self, t: int, lab, status: str):
        t = int(t)
        # a confirmed frame may hold background only (cells can leave the field)
        lab = self._prep_labels(lab, t, need_two=status == "annotated" or self.model is None)
        K = int(lab.max()) + 1
        if self.model is not None and K > self.n_classes:
            raise InputError(
                f"frame {t} introduces class {K - 1} but the model was trained with {self.n_classes - 1} "
                "classes; start a new propagation"
            )
        self.n_classes = max(self.n_classes, K)
        f = self.params.downsample
        img = self._norm_frame(t)
        self._anchors[t] = _Sample(t, _down_image(img, f), _down_labels(lab, f).astype(np.int64), None, True)
        self.labels[t] = lab
        self.confidence[t] = 255
        self.status[t] = status

    def _norm_frame(self, t: int) -> np.ndarray:
        x = _frame(self.stack, t).astype(np.float32)
        return normalize(x, lohi=percentile_range(x, 1.0, 99.8))

    @property
    def anchors(self) -> list[int]:
        return sorted(t for t, s in enumerate(self.status) if s in ANCHOR)

    def frame_status(self) -> list[str]:
        return list(self.status)

    # --------------------------------------------------------------- user API
    def confirm(self, t: int, labels_t=None) -> None:
        """Mark frame ``t`` as confirmed, optionally with corrected labels.

        A confirmed frame is never modified by later runs.
        """
        t = int(t)
        if not (0 <= t < self.shape[0]):
            raise InputError(f"frame {t} is outside the stack (0..{self.shape[0] - 1})")
        lab = np.asarray(labels_t) if labels_t is not None else np.asarray(self.labels[t])
        if self.status[t] == "annotated" and labels_t is None:
            return
        self._set_anchor(t, lab, "annotated" if self.status[t] == "annotated" and labels_t is None else "confirmed")

    def unconfirm(self, t: int) -> None:
        """Turn a confirmed frame back into a pseudo frame (it may be recomputed)."""
        t = int(t)
        if self.status[t] == "confirmed":
            self._anchors.pop(t, None)
            self.status[t] = "pseudo"

    # --------------------------------------------------------------- training
    def _new_model(self):
        p = self.params
        seed_everything(p.seed)
        self.model = UNet(1, self.n_classes, base=p.base, depth=p.depth, norm="group").to(self.device)
        self._opt = torch.optim.Adam(self.model.parameters(), lr=p.lr)
        self._rng = np.random.default_rng(p.seed)
        self._gen = torch.Generator().manual_seed(p.seed)
        cnt = np.zeros(self.n_classes)
        for s in self._anchors.values():
            cnt += np.bincount(s.target.ravel(), minlength=self.n_classes)[: self.n_classes]
        freq = cnt / max(cnt.sum(), 1)
        w = np.maximum(freq, 1e-4) ** -float(p.balance)
        self._class_w = torch.tensor(w / w[freq > 0].min(), dtype=torch.float32, device=self.device)

    def _crop(self, s: _Sample):
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

    def _train(self, n: int, window: Sequence[_Sample] = (), current: Optional[int] = None):
        """``n`` optimiser steps on anchors + the pseudo window; returns the mean loss."""
        if n <= 0:
            return float("nan")
        p = self.params
        pool = list(self._anchors.values()) + list(window)
        wts = []
        for s in pool:
            if s.anchor:
                wts.append(p.anchor_weight)
            else:
                dist = abs(s.t - current) if current is not None else 1
                wts.append(p.decay ** max(dist - 1, 0))
        wts = np.asarray(wts, np.float64)
        wts /= wts.sum()
        # all crops in a batch must share a size: use the smallest frame
        self.model.train()
        losses = []
        for _ in range(n):
            idx = self._rng.choice(len(pool), size=p.batch, p=wts)
            crops = [self._crop(pool[i]) for i in idx]
            hs = min(c[0].shape[0] for c in crops)
            ws = min(c[0].shape[1] for c in crops)
            xb = torch.from_numpy(np.stack([c[0][:hs, :ws] for c in crops]))[:, None].to(self.device)
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
    def _predict_ds(self, img_ds: np.ndarray) -> np.ndarray:
        """Class probabilities (K, y, x) at processing resolution."""
        p = self.params
        self.model.eval()
        model, dev, mult = self.model, self.device, 2 ** p.depth

        def fn(tile):
            x, (h, w) = pad_to_multiple(np.asarray(tile, np.float32), mult)
            with torch.no_grad():
                y = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))[None].to(dev)), 1)
            return y[0, :, :h, :w].cpu().numpy()

        return predict_tiled(fn, img_ds[None], tile=p.tile, overlap=32)

    def predict_frame(self, t: int, img: Optional[np.ndarray] = None):
        """Predict frame ``t`` with the current model (does not store anything).

        Returns ``(labels, confidence, probs_ds, img_ds)``: full-resolution labels
        and confidence (float32 in [0, 1]), and the processing-resolution
        probabilities and image.
        """
        f = self.params.downsample
        img = self._norm_frame(t) if img is None else img
        img_ds = _down_image(img, f)
        prob = self._predict_ds(img_ds)
        Y, X = self.shape[1:]
        if f > 1:
            up = F.interpolate(torch.from_numpy(prob)[None], scale_factor=f, mode="bilinear",
                               align_corners=False)[0, :, :Y, :X]
            up = up.numpy()
            if up.shape[1:] != (Y, X):
                up = np.stack([_pad_shape(c, (Y, X), 0.0) for c in up])
        else:
            up = prob
        lab = np.argmax(up, 0).astype(np.uint8)
        conf = up.max(0)
        return lab, conf, prob, img_ds

    # ------------------------------------------------------------- the walks
    def _chains(self, frames: set[int], direction: str) -> list[_Chain]:
        """Plan walks from anchors that cover ``frames`` (non-anchor frames)."""
        T = self.shape[0]
        anchors = self.anchors
        if not anchors:
            raise InputError("no annotated or confirmed frame to propagate from")
        if direction not in ("forward", "backward", "both"):
            raise InputError(f"direction must be forward, backward or both, not {direction!r}")
        chains: list[_Chain] = []
        bounds = [-1] + anchors + [T]
        for i in range(1, len(bounds) - 1):
            a = bounds[i]
            prev_a, next_a = bounds[i - 1], bounds[i + 1]
            fwd = list(range(a + 1, next_a))
            bwd = list(range(a - 1, prev_a, -1))
            if direction == "both":
                if next_a < T:  # gap shared with the next anchor: split at the middle
                    fwd = fwd[: (len(fwd) + 1) // 2]
                if prev_a >= 0:
                    bwd = bwd[: len(bwd) // 2]
            elif direction == "forward":
                bwd = []
            else:
                fwd = []
            for seq, d in ((fwd, 1), (bwd, -1)):
                # the chain walks from the anchor up to the last frame it must recompute
                need = [k for k, t in enumerate(seq) if t in frames]
                if need:
                    chains.append(_Chain(a, seq[: need[-1] + 1], d))
        return chains

    def _uncovered(self, direction: str) -> list[int]:
        T = self.shape[0]
        an = self.anchors
        if direction == "forward":
            return list(range(0, an[0]))
        if direction == "backward":
            return list(range(an[-1] + 1, T))
        return []

    def _walk(self, chains: list[_Chain], recompute: set[int], total: int, done0: int = 0):
        """Walk the chains; yields a Progress per computed frame."""
        p = self.params
        done = done0
        for ch in chains:
            if self._base_state is not None:
                self.model.load_state_dict(self._base_state)
                self._opt = torch.optim.Adam(self.model.parameters(), lr=p.lr)
            window: list[_Sample] = []
            for t in ch.frames:
                if self.status[t] in ANCHOR:  # never modified (may appear if confirmed mid-run)
                    continue
                if t in recompute:
                    lab, conf, prob, img_ds = self.predict_frame(t)
                    pconf = prob.max(0)
                    if p.min_size > 0:
                        lab = clean_labels(lab, p.min_size)
                        tgt = _pad_shape(_down_labels(lab, p.downsample), pconf.shape, 0).astype(np.int64)
                    else:
                        tgt = np.argmax(prob, 0).astype(np.int64)
                    self.labels[t] = lab
                    self.confidence[t] = np.round(conf * 255).astype(np.uint8)
                    self.status[t] = "pseudo"
                else:  # already pseudo-labelled and kept: reuse it for the training window
                    img_ds = _down_image(self._norm_frame(t), p.downsample)
                    tgt = _down_labels(np.asarray(self.labels[t]), p.downsample).astype(np.int64)
                    pconf = _down_labels(np.asarray(self.confidence[t]), p.downsample) / 255.0
                    lab = conf = None
                keep = pconf >= p.tau
                tgt = np.where(keep, tgt, -1)
                window.append(_Sample(t, img_ds, tgt, pconf.astype(np.float32), False))
                window = window[-p.window:] if p.window > 0 else []
                loss = float("nan")
                if p.steps > 0 and window and keep.any():
                    loss = self._train(p.steps, window, current=t + ch.direction)
                if t in recompute:
                    done += 1
                    yield Progress(
                        done, total, f"frame {t}: {100 * keep.mean():.0f}% confident",
                        preview=(t, lab, np.round(conf * 255).astype(np.uint8)),
                        metrics={"frame": t, "loss": loss, "confident": float(keep.mean()),
                                 "mean_confidence": float(conf.mean())},
                    )
        return done

    def _train_base(self, steps: int, total: int, label: str):
        """Train (or re-train) the base model on all anchors, yielding progress."""
        chunk = 20
        k = 0
        while k < steps:
            n = min(chunk, steps - k)
            loss = self._train(n)
            k += n
            yield Progress(0, total, f"{label}: step {k}/{steps} (loss {loss:.3f})",
                           metrics={"loss": loss, "train_step": k})
        self._base_state = {kk: v.detach().clone() for kk, v in self.model.state_dict().items()}

    def iter_run(self, direction: str = "both", frames: Optional[Iterable[int]] = None):
        """Train on the anchors and propagate; a job generator returning ``self``.

        ``frames``: restrict recomputation to these frames (default: every
        non-anchor frame reachable in ``direction``). Cancelling returns ``self``
        with the frames done so far (the others keep their previous status).
        """
        try:
            if self.model is None:
                self._new_model()
                steps = self.params.init_steps
            else:
                if self._base_state is not None:
                    self.model.load_state_dict(self._base_state)
                    self._opt = torch.optim.Adam(self.model.parameters(), lr=self.params.lr)
                    steps = self.params.resume_steps
                else:  # the first training was stopped early
                    steps = self.params.init_steps
            T = self.shape[0]
            targets = set(range(T)) if frames is None else {int(t) for t in frames}
            targets = {t for t in targets if 0 <= t < T and self.status[t] not in ANCHOR}
            chains = self._chains(targets, direction)
            total = sum(1 for c in chains for t in c.frames if t in targets)
            yield from self._train_base(steps, total, "training on anchors")
            n = yield from self._walk(chains, targets, total)
            self.history.append({"kind": "run", "direction": direction,
                                 "frames": sorted(t for c in chains for t in c.frames if t in targets)})
            yield Progress(n, total, f"done: {n} frames propagated")
        except JobCancelled:
            pass
        return self

    def resume_frames(self, t: int, direction: str = "both") -> list[int]:
        """Frames a resume from ``t`` recomputes: those between ``t`` and the
        next anchor in each direction (only forward/backward when asked)."""
        t = int(t)
        T = self.shape[0]
        an = [a for a in self.anchors if a != t]
        nxt = min([a for a in an if a > t], default=T)
        prv = max([a for a in an if a < t], default=-1)
        out = []
        if direction in ("forward", "both"):
            out += list(range(t + 1, nxt))
        if direction in ("backward", "both"):
            out += list(range(prv + 1, t))
        if self.status[t] not in ANCHOR:
            out.append(t)
        return sorted(out)

    def iter_resume(self, t: int, direction: str = "both", labels_t=None):
        """Restart propagation from frame ``t`` after a correction (job generator).

        If ``labels_t`` is given, frame ``t`` is confirmed with it first. The
        model is re-trained on all anchors, then only the frames between ``t``
        and the next anchor in each direction are recomputed.
        """
        t = int(t)
        if labels_t is not None:
            self.confirm(t, labels_t)
        if self.model is None:
            return (yield from self.iter_run(direction))
        frames = self.resume_frames(t, direction)
        res = yield from self.iter_run("both", frames=frames)
        self.history[-1]["kind"] = "resume"
        self.history[-1]["from"] = t
        return res

    def run(self, direction: str = "both", callback=None):
        return run_job(self.iter_run(direction), callback).value

    def resume(self, t: int, direction: str = "both", labels_t=None, callback=None):
        return run_job(self.iter_resume(t, direction, labels_t), callback).value

    # ------------------------------------------------------------- outputs
    def edited_frames(self, current_labels) -> list[int]:
        """Frames where ``current_labels`` (e.g. the napari layer) differs from
        the last propagated/anchored version: the user painted there."""
        out = []
        for t in range(self.shape[0]):
            if self.status[t] == "pending":
                if np.any(np.asarray(current_labels[t]) != np.asarray(self.labels[t])):
                    out.append(t)
                continue
            if not np.array_equal(np.asarray(current_labels[t]), np.asarray(self.labels[t])):
                out.append(t)
        return out

    def instances(self, out=None, **kw) -> np.ndarray:
        """Linked instance labels for the current result (see :func:`link_instances`)."""
        return link_instances(self.labels, out=out, **kw)

    def metadata(self) -> dict:
        p = self.params
        return {
            "capability": "propagate",
            "arch": dict(self.model.arch) if self.model is not None else {},
            "train": asdict(p),
            "normalization": {"method": "percentile", "low": 1.0, "high": 99.8, "per": "frame"},
            "downsample": p.downsample,
            "n_classes": self.n_classes,
            "instances": self.instance_mode,
            "frame_status": list(self.status),
        }

    def save_model(self, path, overwrite: bool = False):
        from .core import store

        if self.model is None:
            raise LeaksegError("no model yet: run the propagation first")
        return store.save(self.model, path, self.metadata(), overwrite=overwrite)


# --------------------------------------------------------------------------- #
# functional API
# --------------------------------------------------------------------------- #
def iter_propagate(stack, labels, *, direction: str = "both", annotated=None, device="auto",
                   instances: bool = False, out=None, confidence_out=None, **params):
    """Job generator: build a :class:`Propagator` and run it; returns the session.

    ``params`` are :class:`PropagateParams` fields (tau, steps, window, ...).
    """
    sess = Propagator(stack, labels, annotated=annotated, device=device, instances=instances,
                      out=out, confidence_out=confidence_out, **params)
    return (yield from sess.iter_run(direction))


def propagate(stack, labels, *, callback=None, **kw) -> Propagator:
    """Run :func:`iter_propagate` to the end; returns the :class:`Propagator`.

    ``result.labels`` (T×Y×X), ``result.confidence`` (uint8, 255 = certain) and
    ``result.status`` hold the outputs.
    """
    return run_job(iter_propagate(stack, labels, **kw), callback).value


# --------------------------------------------------------------------------- #
# instance mode and Cell Tracking Challenge export
# --------------------------------------------------------------------------- #
def split_instances(mask: np.ndarray, method: str = "cc", min_size: int = 30) -> np.ndarray:
    """Split a foreground mask into instances (connected components or watershed)."""
    from scipy import ndimage as ndi

    fg = np.asarray(mask) > 0
    if method == "watershed":
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        dist = ndi.distance_transform_edt(fg)
        cc, _ = ndi.label(fg)
        peaks = peak_local_max(dist, min_distance=7, labels=cc, exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        lab = watershed(-dist, markers, mask=fg)
    elif method == "cc":
        lab, _ = ndi.label(fg)
    else:
        raise InputError(f"instance split must be 'cc' or 'watershed', not {method!r}")
    if min_size > 0 and lab.max() > 0:
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        lab[small[lab]] = 0
    return lab.astype(np.int32)


def _overlap_link(prev: np.ndarray, cur: np.ndarray, next_id: int, min_iou: float = 0.1):
    """Give each instance of ``cur`` the id of the best-overlapping ``prev`` instance."""
    out = np.zeros(cur.shape, np.int32)
    cur_ids = [i for i in np.unique(cur) if i]
    pairs = []
    if prev is not None and prev.any():
        m = (cur > 0) & (prev > 0)
        if m.any():
            a, b = cur[m].astype(np.int64), prev[m].astype(np.int64)
            key = a * (int(prev.max()) + 1) + b
            uk, inter = np.unique(key, return_counts=True)
            ca = np.bincount(cur.ravel())
            pb = np.bincount(prev.ravel())
            for k, n in zip(uk, inter):
                i, j = divmod(int(k), int(prev.max()) + 1)
                iou = n / (ca[i] + pb[j] - n)
                if iou >= min_iou:
                    pairs.append((iou, i, j))
    pairs.sort(reverse=True)
    used_c, used_p = set(), set()
    for iou, i, j in pairs:
        if i in used_c or j in used_p:
            continue
        out[cur == i] = j
        used_c.add(i)
        used_p.add(j)
    for i in cur_ids:
        if i not in used_c:
            out[cur == i] = next_id
            next_id += 1
    return out, next_id


def iter_link_instances(labels, out=None, method: str = "cc", min_size: int = 30,
                        min_iou: float = 0.1, first=None):
    """Job generator: split every frame into instances and link ids through time.

    Walks frames in time order; each instance takes the id of the instance of
    the previous frame it overlaps most (greedy by IoU ≥ ``min_iou``), so a cell
    keeps its id; new cells get new ids. ``first`` (instance map of frame 0)
    fixes the initial ids, e.g. the user's annotation. Returns (T, Y, X) uint16/32
    and a tracks table ``{id: [begin, end]}`` (CTC-style, parent 0).
    """
    T = labels.shape[0]
    res = out if out is not None else np.zeros(labels.shape, np.uint32)
    prev = None
    next_id = 1
    tracks: dict[int, list[int]] = {}
    for t in range(T):
        cur = split_instances(np.asarray(labels[t]), method, min_size)
        if t == 0 and first is not None:
            cur = np.asarray(first).astype(np.int32)
            lab, next_id = cur, int(cur.max()) + 1
        else:
            lab, next_id = _overlap_link(prev, cur, next_id, min_iou)
        res[t] = lab
        for i in np.unique(lab):
            if not i:
                continue
            i = int(i)
            if i in tracks and tracks[i][1] == t - 1:
                tracks[i][1] = t
            elif i not in tracks:
                tracks[i] = [t, t]
        prev = lab
        yield Progress(t + 1, T, f"instances: frame {t}")
    return res, tracks


def link_instances(labels, out=None, **kw) -> np.ndarray:
    """Run :func:`iter_link_instances`; returns the linked instance stack."""
    return run_job(iter_link_instances(labels, out=out, **kw)).value[0]


def tracks_of(instances) -> dict[int, list[int]]:
    """``{id: [first_frame, last_frame]}`` of an instance stack (ids continuous in time)."""
    tracks: dict[int, list[int]] = {}
    for t in range(instances.shape[0]):
        for i in np.unique(np.asarray(instances[t])):
            if i:
                tracks.setdefault(int(i), [t, t])[1] = t
    return tracks


def ctc_folder_taken(folder) -> bool:
    """Whether a CTC results folder already holds files (writing there would replace them)."""
    folder = Path(folder)
    return folder.exists() and any(folder.iterdir())


def check_ctc_folder(folder, overwrite: bool = False, inputs=()) -> Path:
    """A CTC results folder to write: refused when it holds files (unless ``overwrite``), when it
    is, holds or lies inside one of ``inputs``, or when its parent folder is missing, not a
    folder or not writable (``core.paths.check_target``)."""
    from .core.paths import check_target

    folder = Path(folder)
    if not overwrite and ctc_folder_taken(folder):
        raise LeaksegError(f"CTC folder {folder} exists and is not empty; choose another or pass --overwrite")
    # files are written into the folder (an empty existing one may be reused), never the folder replaced
    return check_target(folder, overwrite=True, inputs=inputs, into_folder=True)


def export_ctc(instances, folder, overwrite: bool = False) -> Path:
    """Write Cell Tracking Challenge results: ``mask%03d.tif`` + ``res_track.txt``.

    ``res_track.txt`` has one line ``L B E P`` per track (label, begin frame,
    end frame, parent = 0). A label that disappears and comes back is split into
    two tracks (the second gets a new id and the first as parent), as CTC requires.
    """
    import tifffile

    folder = check_ctc_folder(folder, overwrite)
    folder.mkdir(exist_ok=True)
    T = instances.shape[0]
    digits = max(3, len(str(T - 1)))
    last_seen: dict[int, int] = {}
    alias: dict[int, int] = {}  # original id -> current CTC id
    tracks: dict[int, list[int]] = {}  # ctc id -> [B, E, P]
    next_id = int(max((int(np.asarray(instances[t]).max()) for t in range(T)), default=0)) + 1
    for t in range(T):
        lab = np.asarray(instances[t]).astype(np.uint32)
        ids = [int(i) for i in np.unique(lab) if i]
        outl = np.zeros(lab.shape, np.uint16 if next_id + len(ids) < 65535 else np.uint32)
        for i in ids:
            if i in last_seen and last_seen[i] < t - 1:  # gap: start a new track
                new = next_id
                next_id += 1
                tracks[new] = [t, t, alias[i]]
                alias[i] = new
            elif i not in alias:
                alias[i] = i
                tracks[i] = [t, t, 0]
            tracks[alias[i]][1] = t
            last_seen[i] = t
            outl[lab == i] = alias[i]
        tifffile.imwrite(folder / f"mask{t:0{digits}d}.tif", outl, compression="zlib")
    with open(folder / "res_track.txt", "w") as f:
        for i in sorted(tracks):
            b, e, par = tracks[i]
            f.write(f"{i} {b} {e} {par}\n")
    return folder


def ctc_seg(gt, pred) -> tuple[float, int]:
    """Cell Tracking Challenge SEG of one frame: mean Jaccard over GT objects.

    A GT object is matched to the predicted object covering > 50 % of it
    (at most one can); unmatched GT objects score 0. Returns (sum, n_objects)
    so scores can be pooled over frames.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    total, n = 0.0, 0
    pb = np.bincount(pred.ravel().astype(np.int64)) if pred.any() else np.zeros(1)
    for g in np.unique(gt):
        if not g:
            continue
        n += 1
        m = gt == g
        ov = pred[m]
        ov = ov[ov > 0]
        if ov.size == 0:
            continue
        ids, cnt = np.unique(ov, return_counts=True)
        k = np.argmax(cnt)
        if cnt[k] > 0.5 * m.sum():
            inter = cnt[k]
            total += inter / (m.sum() + pb[ids[k]] - inter)
    return float(total), n


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
    f = int(metadata.get("downsample", (metadata.get("train") or {}).get("downsample", 1)))
    mult = model.multiple * f

    def fn(tile: np.ndarray) -> np.ndarray:
        x, (h, w) = pad_to_multiple(np.asarray(tile, np.float32), mult)
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x))[None].to(dev)
            if f > 1:
                t = F.avg_pool2d(t, f)
            y = torch.softmax(model(t), 1)
            if f > 1:
                y = F.interpolate(y, scale_factor=f, mode="bilinear", align_corners=False)
        return y[0, :, :h, :w].float().cpu().numpy()

    def finalize(block: np.ndarray) -> np.ndarray:
        return smallest_uint(np.argmax(block, 0))

    return Predictor(fn=fn, in_channels=arch.get("in_channels", 1),
                     out_channels=arch.get("out_channels", 2), finalize=finalize,
                     output="labels", halo=32 * f, tile=256 * f, capability="propagate",
                     metadata=dict(metadata))
