"""Post-processing: box decoding, NMS-free top-k, heatmap peaks, corner pairing, per-level candidates,
CornerNet-Saccade's crops and the class-wise NMS family. Every detector ends in :class:`Postprocess` or a subclass of it."""

from anchorless.detectors.postprocess.base import Postprocess
from anchorless.detectors.postprocess.box_coding import decode_ltrb
from anchorless.detectors.postprocess.corners import CornerPostprocess, TripletPostprocess
from anchorless.detectors.postprocess.heatmap import gather_cells, heatmap_peaks, topk_heatmap, topk_heatmap_batched
from anchorless.detectors.postprocess.levelwise import LevelwisePostprocess
from anchorless.detectors.postprocess.nms import NMS_KINDS, NMSKind, NMSResult, nms, register_nms, soft_nms
from anchorless.detectors.postprocess.saccade import SaccadePostprocess
from anchorless.detectors.postprocess.topk import topk_dense

__all__ = [
    "NMS_KINDS",
    "CornerPostprocess",
    "LevelwisePostprocess",
    "NMSKind",
    "NMSResult",
    "Postprocess",
    "SaccadePostprocess",
    "TripletPostprocess",
    "decode_ltrb",
    "gather_cells",
    "heatmap_peaks",
    "nms",
    "register_nms",
    "soft_nms",
    "topk_dense",
    "topk_heatmap",
    "topk_heatmap_batched",
]
