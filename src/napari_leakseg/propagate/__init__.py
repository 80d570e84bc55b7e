"""Time-series label propagation with interactive correction (see :mod:`.session`).

The package is split along the parts of the method:

* :mod:`.common` — parameters, frame IO, resampling, foreground IoU;
* :mod:`.anchors` — the user's annotations checked: annotated frames, classes to learn;
* :mod:`.walks` — which frames each walk from an anchor covers, which anchor owns a frame;
* :mod:`.training` — the U-Net of a session: training on anchors and pseudo frames,
  inference, saved-model predictor;
* :mod:`.pseudo` — pseudo-labels: the prediction fused with the previous frame's
  result, confident pixels, frame-level cues;
* :mod:`.instances` — cells with ids through time, CTC export, SEG and link scores;
* :mod:`.corrections` — what a resume recomputes, when it stops, what to correct next;
* :mod:`.flow` — the optical-flow warping baseline (TV-L1);
* :mod:`.session` — :class:`Propagator`, :func:`propagate`, :func:`iter_propagate`.

Plain torch/numpy: never imports napari or Qt.
"""

from .common import ANCHOR, MAX_CLASSES, STATUSES, PropagateParams, clean_labels, foreground_iou
from .instances import (check_ctc_folder, ctc_folder_taken, ctc_seg, export_ctc, iter_link_instances,
                        iter_track_instances, link_instances, link_scores, propagate_ids, split_instances,
                        track_instances, tracks_of)
from .session import Propagator, iter_propagate, propagate
from .training import MODEL_SPEC, predictor_from_model

__all__ = [
    "ANCHOR", "MAX_CLASSES", "STATUSES", "PropagateParams", "Propagator", "iter_propagate", "propagate",
    "predictor_from_model", "link_instances", "iter_link_instances", "track_instances",
    "iter_track_instances", "propagate_ids", "split_instances", "link_scores", "export_ctc", "ctc_seg",
    "ctc_folder_taken", "check_ctc_folder", "tracks_of", "foreground_iou", "clean_labels",
]
