"""The propagation session (:class:`Propagator`) and the functional API.

After Mano, Kato and Hotta, "Semantic Segmentation by Semi-Supervised Learning
Using Time Series Constraint" (VISAPP 2023): a compact U-Net is trained on the
annotated frames of a time-lapse (:mod:`.training`), then walks through time
frame by frame (:mod:`.pseudo`):

1. predict the next frame, and fuse the prediction with the previous frame's
   result (weight ``prior``): the previous frame is a strong guess where the
   network hesitates;
2. keep the pixels whose fused confidence is ≥ ``tau`` as pseudo-labels, the
   others are ignored by the loss;
3. add the frame to a sliding training set (the ``window`` most recent pseudo
   frames), weighted per pixel by confidence and per frame by its distance in
   time to the frame being predicted;
4. fine-tune for ``steps`` steps, and go on.

The human in the loop (:mod:`.corrections`): frames have a status
(``annotated``, ``confirmed``, ``pseudo`` or ``pending``). Annotated and
confirmed frames ("anchors") are never modified. After the user corrects a frame
and confirms it, :meth:`Propagator.iter_resume` re-trains on all anchors and
walks again from that frame, up to the next anchor — stopping early once the
walk reproduces the previous result. :meth:`Propagator.suggest` names the frames
worth checking next.

In instance mode each walk follows the annotated cells: objects no followed cell
leads to stay background (:func:`.pseudo.follow_objects`, ``params.follow``). The
result is also an instance stack whose ids follow each cell (:mod:`.instances`),
seeded by the annotated frames' ids.

Frames are read one at a time (``stack[t]``), so zarr/dask stacks stay bounded
in memory; the outputs can be any sliceable arrays (e.g. zarr) via ``out=`` and
``confidence_out=``.

Plain torch/numpy: this module never imports napari or Qt.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterable, Optional, Sequence

import numpy as np

from ..core.device import resolve_device
from ..core.errors import InputError, JobCancelled, LeaksegError
from ..core.jobs import Progress, run_job
from ..core.normalize import normalize, percentile_range
from . import corrections
from .anchors import annotated_frames, frame_classes
from .common import (ANCHOR, Chain, PropagateParams, Sample, check_stack, clean_labels, down_image, down_labels,
                     frame, pad_shape, upsample_probs)
from .instances import iter_track_instances
from .pseudo import Follow, frame_cues, fuse, one_hot, pseudo_sample
from .training import Trainer
from .walks import owner, plan_walks


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
        T, Y, X = check_stack(stack)
        self.shape = (T, Y, X)
        self.instance_mode = bool(instances)
        self.device = resolve_device(device)
        self.status: list[str] = ["pending"] * T
        self.labels = out if out is not None else np.zeros((T, Y, X), np.uint8)
        self.confidence = confidence_out if confidence_out is not None else np.zeros((T, Y, X), np.uint8)
        if tuple(self.labels.shape) != (T, Y, X) or tuple(self.confidence.shape) != (T, Y, X):
            raise InputError("out / confidence_out must have the stack's T×Y×X shape")
        self._anchors: dict[int, Sample] = {}
        self.n_classes = 0
        self.trainer = Trainer(self.params, self.device)
        self._anchor_inst: dict[int, np.ndarray] = {}  # instance mode: the anchors' own ids
        #: per-frame cues for suggesting corrections (NaN = not computed)
        self.uncertain = np.full(T, np.nan)
        self.disagreement = np.full(T, np.nan)
        self._old: Optional[dict] = None  # a resume: the previous labels of the frames it may recompute
        self._old_conf: dict[int, np.ndarray] = {}  # ... and their previous confidence
        #: what each confirmation changed: the class each changed pixel became, -1 elsewhere (full res;
        #: None = a frame that had no result, all of it new)
        self._diff: dict[int, Optional[np.ndarray]] = {}
        self._fresh: set[int] = set()  # anchors confirmed since the last run (their walks are due)
        #: how much confirming changed a frame (1 − agreement with its previous result; 1.0 = new)
        self.change: dict[int, float] = {}
        self.history: list[dict] = []  # per-run record of what was computed
        if labels is not None:
            self._init_labels(labels, annotated)
        elif annotated:
            raise InputError("annotated frames were given but no label stack")

    # ------------------------------------------------------------------ setup
    def _init_labels(self, labels, annotated):
        for t in annotated_frames(labels, self.shape, annotated):
            self._set_anchor(t, labels[t], "annotated")

    def _set_anchor(self, t: int, lab, status: str):
        t = int(t)
        # a confirmed frame may hold background only (cells can leave the field)
        lab, given = frame_classes(lab, t, self.shape[1:], self.instance_mode,
                                   need_two=status == "annotated" or self.model is None)
        K = int(lab.max()) + 1
        if self.model is not None and K > self.n_classes:
            raise InputError(
                f"frame {t} introduces class {K - 1} but the model was trained with {self.n_classes - 1} "
                "classes; start a new propagation"
            )
        if self.instance_mode:
            self._keep_ids(t, given)
        self.n_classes = max(self.n_classes, K)
        f = self.params.downsample
        # how much this changes the frame (a re-confirmed frame whose walks are still due keeps its change)
        # and what it changed, to which class (-1: unchanged; None: a new frame, all of it)
        ch, diff = 1.0, None
        if self.status[t] != "pending":
            old = np.asarray(self.labels[t])
            ch = corrections.change(lab, old)
            diff = corrections.change_map(lab, old, self.params.sliver)
        self.change[t] = max(ch, self.change.get(t, 0.0)) if t in self._fresh else ch
        if t in self._fresh and t in self._diff:  # confirmed again before its walks ran: both changes count
            prev = self._diff[t]
            diff = None if prev is None or diff is None else np.where(diff >= 0, diff, prev)
        self._diff[t] = diff
        img = self._norm_frame(t)
        self._anchors[t] = Sample(t, down_image(img, f), down_labels(lab, f).astype(np.int64), None, True)
        self.labels[t] = lab
        self.confidence[t] = 255
        self.status[t] = status
        self._fresh.add(t)

    def _keep_ids(self, t: int, ids: np.ndarray) -> None:
        """Instance mode: the cell ids of anchor ``t`` seed the tracked instances, unless it
        holds a single id while other anchors have theirs (e.g. a frame painted with one label)."""
        u = np.unique(ids)
        if u[u > 0].size > 1 or set(self._anchor_inst) <= {t}:
            self._anchor_inst[t] = ids.astype(np.int32)
        else:
            self._anchor_inst.pop(t, None)

    def _norm_frame(self, t: int) -> np.ndarray:
        x = frame(self.stack, t).astype(np.float32)
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
            self._anchor_inst.pop(t, None)
            self._fresh.discard(t)
            self._diff.pop(t, None)
            self.status[t] = "pseudo"

    # ------------------------------------------------------------ the network
    @property
    def model(self):
        return self.trainer.model

    @property
    def _base_state(self):
        return self.trainer.base_state

    def _anchor_pool(self) -> list[Sample]:
        return [self._anchors[t] for t in sorted(self._anchors)]

    def _train(self, n: int, window: Sequence[Sample] = (), current: Optional[int] = None) -> float:
        return self.trainer.train(n, self._anchor_pool() + list(window), current)

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
        self.trainer.keep_base()

    def predict_frame(self, t: int, img: Optional[np.ndarray] = None, prior: Optional[np.ndarray] = None):
        """Predict frame ``t`` with the current model (does not store anything).

        ``prior``: the previous frame's probabilities at processing resolution,
        fused with weight ``params.prior``. Returns ``(labels, confidence,
        probs_ds, img_ds)``: full-resolution labels and confidence (float32 in
        [0, 1]), and the processing-resolution (fused) probabilities and image.
        """
        f = self.params.downsample
        img = self._norm_frame(t) if img is None else img
        img_ds = down_image(img, f)
        prob = fuse(self.trainer.predict_ds(img_ds), prior, self.params.prior)
        up = upsample_probs(prob, f, self.shape[1:])
        return np.argmax(up, 0).astype(np.uint8), up.max(0), prob, img_ds

    # ------------------------------------------------------------- the walks
    def walks(self, frames: set[int], direction: str, starts: Optional[set] = None) -> list[Chain]:
        """The walks from the current anchors that cover ``frames`` (:func:`.walks.plan_walks`)."""
        return plan_walks(self.anchors, self.shape[0], frames, direction, starts)

    def _anchor_prior(self, a: int) -> Optional[np.ndarray]:
        if self.params.prior <= 0:
            return None
        return one_hot(self._anchors[a].target, self.n_classes)

    def _compute_frame(self, t: int, prior, region: Optional[np.ndarray] = None,
                       follow: Optional[Follow] = None):
        """Predict, fuse, clean and store frame ``t``; returns (labels, conf, sample, probs, region).

        With ``region`` (a resume following a correction's change), the new result is
        taken only where that change reaches (:func:`.corrections.fuse_correction`);
        the returned region is where it is still alive (None without one). With
        ``follow`` (the walk's :class:`.pseudo.Follow`), only the objects linked to the
        ones it follows are kept; the dropped ones are left out of the pseudo-labels.
        """
        p = self.params
        img = self._norm_frame(t)
        img_ds = down_image(img, p.downsample)
        net = self.trainer.predict_ds(img_ds)
        prob = fuse(net, prior, p.prior)
        cues = frame_cues(net, prior, p.tau)
        self.uncertain[t], self.disagreement[t] = cues["uncertain"], cues["disagreement"]
        up = upsample_probs(prob, p.downsample, self.shape[1:])
        lab, conf = np.argmax(up, 0).astype(np.uint8), up.max(0)
        target = None
        if p.min_size > 0:
            lab = clean_labels(lab, p.min_size)
        if follow is not None:
            lab = follow(lab)
        if region is not None:
            lab, taken, region = corrections.fuse_correction(lab, self._old[t], region, p.reach, p.sliver)
            conf = np.where(taken, conf, self._old_conf[t] / 255.0).astype(np.float32)
        if p.min_size > 0 or region is not None or follow is not None:
            target = pad_shape(down_labels(lab, p.downsample), prob.shape[1:], 0)
        if follow is not None:
            dropped = follow.advance(lab)
            target = np.where(pad_shape(down_labels(dropped, p.downsample), prob.shape[1:], False), -1,
                              target.astype(np.int64))
        self.labels[t] = lab
        self.confidence[t] = np.round(conf * 255).astype(np.uint8)
        self.status[t] = "pseudo"
        # a fused result trains the walk with its own labels and confidence
        conf_ds = None if region is None else pad_shape(down_labels(conf, p.downsample), prob.shape[1:], 0.0)
        return lab, conf, pseudo_sample(t, img_ds, prob, p.tau, target, conf_ds), prob, region

    def _kept_frame(self, t: int):
        """A frame the walk passes without recomputing: its stored result feeds the window."""
        p = self.params
        img_ds = down_image(self._norm_frame(t), p.downsample)
        tgt = down_labels(np.asarray(self.labels[t]), p.downsample).astype(np.int64)
        conf = down_labels(np.asarray(self.confidence[t]), p.downsample) / 255.0
        prob = one_hot(tgt, self.n_classes) if p.prior > 0 else None
        return pseudo_sample(t, img_ds, prob, p.tau, tgt, conf), prob

    @property
    def follows(self) -> bool:
        """Whether the walks keep only the objects linked to the anchors' (``params.follow``;
        by default in instance mode)."""
        return self.instance_mode if self.params.follow is None else bool(self.params.follow)

    def _follow_from(self, t: int) -> Optional[Follow]:
        """What a walk follows from frame ``t`` as it is stored (None when not following).

        A correction's walk also follows what the correction deleted: deleting an object in
        one frame fixes that frame, and it is removed further on only where the re-trained
        network no longer finds it (a cell that is half out of the field in one frame may be
        wanted again when it comes in)."""
        if not self.follows:
            return None
        kept = np.asarray(self.labels[t]) > 0
        diff = self._diff.get(t) if t in self._fresh else None
        if diff is not None:
            kept = kept | (diff == 0)
        return Follow(kept)

    def _walk(self, chains: list[Chain], recompute: set[int], total: int, done0: int = 0):
        """Walk the chains; yields a Progress per computed frame. During a resume
        (``self._old`` set) a chain from a correction takes the new result only where
        the correction's change reaches (``params.reach``), and stops where that change
        has died out or after ``converge`` frames in a row that reproduce the previous
        result."""
        p = self.params
        done = done0
        self._computed: list[int] = []
        for ch in chains:
            self.trainer.restore_base(seed=2 * ch.anchor + (ch.direction > 0))
            window: list[Sample] = []
            prior = self._anchor_prior(ch.anchor)
            follow = self._follow_from(ch.anchor)
            same = 0
            tol = corrections.stop_tolerance(self.change.get(ch.anchor, 1.0))
            # a resume from a correction follows what it changed, frame to frame (None: whole frames)
            region = self._diff.get(ch.anchor) if (self._old is not None and p.reach > 0
                                                   and ch.anchor in self._fresh) else None
            for t in ch.frames:
                if self.status[t] in ANCHOR:  # never modified (may appear if confirmed mid-run)
                    break
                if t in recompute:
                    fuse_here = region if (region is not None and t in self._old) else None
                    lab, conf, sample, prior, left = self._compute_frame(t, prior, fuse_here, follow)
                    region = left if fuse_here is not None else region
                    self._computed.append(t)
                    if self._old is not None and t in self._old:
                        same = same + 1 if corrections.same_result(lab, self._old[t], tol) else 0
                else:  # already pseudo-labelled and kept: reuse it for the training window
                    sample, prior = self._kept_frame(t)
                    follow = self._follow_from(t)
                    lab = conf = None
                keep = sample.target >= 0
                window = (window + [sample])[-p.window:] if p.window > 0 else []
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
                if p.converge and same >= p.converge:
                    break  # the correction no longer changes anything further on
                if region is not None and not (region >= 0).any():
                    break  # nothing the correction changed reaches further
        return done

    def iter_run(self, direction: str = "both", frames: Optional[Iterable[int]] = None,
                 starts: Optional[Iterable[int]] = None):
        """Train on the anchors and propagate; a job generator returning ``self``.

        ``frames``: restrict recomputation to these frames (default: every
        non-anchor frame reachable in ``direction``); ``starts``: only walk from
        these anchors. Cancelling returns ``self`` with the frames done so far (the others
        keep their previous status).
        """
        try:
            if self.model is None:
                self.trainer.new_model(self.n_classes, self._anchor_pool())
                steps = self.params.init_steps
            elif self._base_state is not None:
                self.trainer.restore_base()
                steps = self.params.resume_steps
            else:  # the first training was stopped early
                steps = self.params.init_steps
            T = self.shape[0]
            targets = set(range(T)) if frames is None else {int(t) for t in frames}
            targets = {t for t in targets if 0 <= t < T and self.status[t] not in ANCHOR}
            chains = self.walks(targets, direction, None if starts is None else set(starts))
            total = sum(1 for c in chains for t in c.frames if t in targets)
            yield from self._train_base(steps, total, "training on anchors")
            n = yield from self._walk(chains, targets, total)
            self.history.append({"kind": "run", "direction": direction, "frames": sorted(self._computed)})
            self._fresh.clear()
            self._diff.clear()  # the walks of those corrections ran: their change masks are spent
            yield Progress(n, total, f"done: {n} frames propagated")
        except JobCancelled:
            pass
        return self

    # ------------------------------------------------------------- corrections
    def resume_frames(self, t: int, direction: str = "both") -> list[int]:
        """Frames a resume from ``t`` may recompute: those between ``t`` and the
        next anchor in each direction (only forward/backward when asked)."""
        return corrections.resume_frames(self.status, t, direction)

    def iter_resume(self, t: int, direction: str = "both", labels_t=None):
        """Restart propagation from frame ``t`` after a correction (job generator).

        If ``labels_t`` is given, frame ``t`` is confirmed with it first. The
        model is re-trained on all anchors, then the walks from ``t`` and from the
        frames confirmed since the last run recompute the frames they own (those
        nearer to them than to another anchor in *both* mode, up to the next anchor
        otherwise) between ``t``'s neighbouring anchors, each walk stopping early once
        it reproduces the previous result (``params.converge`` frames in a row).
        Frames owned by older anchors keep their labels.
        """
        t = int(t)
        if labels_t is not None:
            self.confirm(t, labels_t)
        if self.model is None:
            return (yield from self.iter_run(direction))
        frames = self.resume_frames(t, direction)
        self._old = {f: np.array(self.labels[f], copy=True) for f in frames if self.status[f] == "pseudo"}
        self._old_conf = {f: np.array(self.confidence[f], copy=True) for f in self._old}
        try:
            # from a confirmed frame: the walks of the new anchors that changed something (a frame
            # confirmed as it was carries no new information); from a pseudo frame: all walks over its gap
            starts = None
            if self.status[t] in ANCHOR:
                starts = {a for a in self._fresh | {t} if self.change.get(a, 1.0) >= corrections.MIN_CHANGE}
                frames = [f for f in frames if owner(self.anchors, self.shape[0], f, direction) in starts]
            res = yield from self.iter_run(direction, frames=frames, starts=starts)
        finally:
            self._old, self._old_conf = None, {}
        self.history[-1]["kind"] = "resume"
        self.history[-1]["from"] = t
        return res

    def suggest(self, k: int = 1) -> list[int]:
        """The ``k`` pseudo frames most worth checking next (lowest confidence, or the
        network disagreeing most with the previous frame's result)."""
        return corrections.suggest_frames(self.status, np.nan_to_num(self.uncertain, nan=-1.0),
                                          np.nan_to_num(self.disagreement, nan=0.0), k)

    def run(self, direction: str = "both", callback=None):
        return run_job(self.iter_run(direction), callback).value

    def resume(self, t: int, direction: str = "both", labels_t=None, callback=None):
        return run_job(self.iter_resume(t, direction, labels_t), callback).value

    # ------------------------------------------------------------- outputs
    def edited_frames(self, current_labels) -> list[int]:
        """Frames where ``current_labels`` (e.g. the napari layer) differs from
        the last propagated/anchored version: the user painted there."""
        return corrections.edited_frames(self.status, self.labels, current_labels)

    def iter_instances(self, out=None, min_size: int = 30, erode: int = 2):
        """Job generator: instance ids that follow each cell, seeded by the annotated
        frames' ids (instance mode) or their connected components."""
        anchors = dict(self._anchor_inst)
        if not anchors:
            anchors = {t: np.asarray(self.labels[t]) > 0 for t in self.anchors[:1]}
        if not anchors:
            raise LeaksegError("no annotated frame to take the cell ids from")
        return (yield from iter_track_instances(self.labels, anchors, out=out, min_size=min_size, erode=erode))

    def instances(self, out=None, **kw) -> np.ndarray:
        """Tracked instance labels for the current result (see :meth:`iter_instances`)."""
        return run_job(self.iter_instances(out=out, **kw)).value

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
        from ..core import store

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
