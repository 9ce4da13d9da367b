"""Scoring, metrics, the experiment runner, plots and the command-line interface."""

from .memory_bank import MemoryBank
from .metrics import PixelMetrics, evaluate, image_auroc, thresholds_from_normal
from .scoring import SCORE_NAMES, anomaly_map, image_score, image_scores, patch_scores

__all__ = [
    "SCORE_NAMES",
    "MemoryBank",
    "PixelMetrics",
    "anomaly_map",
    "evaluate",
    "image_auroc",
    "image_score",
    "image_scores",
    "patch_scores",
    "thresholds_from_normal",
]
