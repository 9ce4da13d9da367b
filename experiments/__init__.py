"""Scoring, metrics, the experiment runner, plots and the command-line interface.

The names below load their modules on first access, so that the ``dinodpmm`` command
(:mod:`.cli`, inside this package) answers ``--help`` without importing torch.
"""

from .._lazy import lazy_exports

# Public name -> module (relative to this package) that defines it.
_EXPORTS = {
    "Config": ".config",
    "load_config": ".config",
    "MemoryBank": ".memory_bank",
    "PixelMetrics": ".metrics",
    "evaluate": ".metrics",
    "image_auroc": ".metrics",
    "thresholds_from_normal": ".metrics",
    "fit_from_config": ".runner",
    "run_experiment": ".runner",
    "evaluate_run": ".saved_runs",
    "load_run": ".saved_runs",
    "score_images": ".saved_runs",
    "SCORE_NAMES": ".scoring",
    "anomaly_map": ".scoring",
    "image_score": ".scoring",
    "image_scores": ".scoring",
    "patch_scores": ".scoring",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
