"""Scoring, metrics, the experiment runner, plots and the command-line interface."""

from .config import Config, load_config
from .memory_bank import MemoryBank
from .metrics import PixelMetrics, evaluate, image_auroc, thresholds_from_normal
from .runner import evaluate_run, fit_from_config, run_experiment, score_images
from .scoring import SCORE_NAMES, anomaly_map, image_score, image_scores, patch_scores

__all__ = [
    "SCORE_NAMES",
    "Config",
    "evaluate_run",
    "fit_from_config",
    "load_config",
    "run_experiment",
    "score_images",
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
