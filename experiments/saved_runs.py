"""Saved run directories: reload a run, recompute its metrics, score new images.

A run directory comes from ``dinodpmm run`` (``config.yaml``, ``posterior.safetensors``,
``metrics.json``, ``scores.csv``, ``figures/``) or from ``dinodpmm fit`` (the first two
only). :func:`evaluate_run` writes ``evaluation.json`` beside them and leaves the files
of the run as they are; :func:`score_images` writes into a folder of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..features import Backbone, ImageReadError, load_image
from ..features.datasets import is_image_file
from ..inference import Posterior
from . import plots
from .config import Config, load_config, resolve_paths
from .runner import (
    CONFIG_FILE,
    METRICS_FILE,
    POSTERIOR_FILE,
    SCORES_FILE,
    FitResult,
    RunError,
    backbone_from_config,
    embed_role,
    evaluate_methods,
    finite_or_none,
    posterior_digest,
    prepare_data,
    score_name,
    split_fingerprint,
)
from .scoring import anomaly_map, image_score, patch_scores

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
# Backbone.describe() keys that must match between the fit and later scoring.
BACKBONE_IDENTITY = ("name", "weights_digest", "resolution")
# Overlays that score_images writes: "<4-digit index>_<image stem>_overlay.png".
OVERLAY_NAME = re.compile(r"\d{4}_.*_overlay\.png")
# False-positive rate on the normal validation images that sets the threshold of `score`.
DEFAULT_SCORE_FPR = 0.05


def _open_run(run_dir: str | Path) -> tuple[Path, Config]:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunError(f"run directory {run_dir} is a file; pass the directory that contains it ({run_dir.parent}).")
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} not found; pass a directory written by `dinodpmm run` or "
                       "`dinodpmm fit`.")
    for name in (CONFIG_FILE, POSTERIOR_FILE):
        if not (run_dir / name).is_file():
            raise RunError(f"run directory {run_dir} has no {name}; pass a directory written by "
                           "`dinodpmm run` or `dinodpmm fit`.")
    return run_dir, load_config(run_dir / CONFIG_FILE)


def load_run(run_dir: str | Path) -> tuple[Config, Posterior, Backbone]:
    """Read the configuration and posterior of a run and load its backbone.

    Raises
    ------
    RunError
        If the directory or its files are missing, or the posterior's embedding
        dimension differs from the backbone's.
    """
    run_dir, config = _open_run(run_dir)
    backbone = backbone_from_config(config)
    try:
        posterior = Posterior.load(run_dir / POSTERIOR_FILE, expected_dim=backbone.dim)
    except ValueError as error:
        raise RunError(str(error)) from None
    _check_backbone(posterior, backbone, run_dir)
    return config, posterior, backbone


def _check_backbone(posterior: Posterior, backbone: Backbone, run_dir: Path) -> None:
    """Raise RunError when the config's backbone differs from the one the posterior was fitted with."""
    fitted = posterior.provenance.get("backbone")
    if not isinstance(fitted, dict):
        return
    current = backbone.describe()
    differing = [key for key in BACKBONE_IDENTITY if key in fitted and fitted[key] != current.get(key)]
    if differing:
        changes = ", ".join(f"{key} {fitted[key]!r} at the fit, {current.get(key)!r} now" for key in differing)
        raise RunError(f"the backbone in {run_dir / CONFIG_FILE} differs from the one the posterior was fitted with "
                       f"({changes}); restore the backbone settings or refit the run.")


def _read_json(path: Path) -> dict[str, Any] | None:
    """Return the JSON object in ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    command = "evaluate" if path.name == EVALUATION_FILE else "run"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is not valid JSON ({error}); rerun `dinodpmm {command}` to rewrite it.") from None
    if not isinstance(document, dict):
        raise RunError(f"{path} contains a JSON {type(document).__name__}, not an object; rerun `dinodpmm {command}` "
                       "to rewrite it.")
    return document


# -- evaluate ----------------------------------------------------------------------------------------


def evaluate_run(run_dir: str | Path, *, memory_bank: bool = False, progress: bool = False) -> dict[str, Any]:
    """Recompute the metrics of a saved run and write them to ``RUN_DIR/evaluation.json``.

    The embeddings come from the cache (or are recomputed), and the image subsamples
    and the memory-bank subsample are drawn again from the same seeds, so on unchanged
    data the values match those in the run's ``metrics.json``.

    Parameters
    ----------
    run_dir : str or pathlib.Path
        Directory written by ``dinodpmm run`` or ``dinodpmm fit``.
    memory_bank : bool
        Score the memory-bank baseline too (when the run's config enables it). Exact
        nearest-neighbour search over the bank costs minutes per hundred images.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        The content of ``evaluation.json``: the metrics of ``"dpmm"`` (and
        ``"memory_bank"``), ``backbone``, ``algorithm``, ``score``, ``counts``,
        ``data_fingerprints``, ``changed_splits`` (roles whose images differ from those
        the run recorded), ``normal_image_scores`` and ``timings_s``.
    """
    run_dir = Path(run_dir)
    config, posterior, backbone = load_run(run_dir)
    # A hand-edited data.root may start with ~ or be relative to the current directory.
    config = resolve_paths(config)
    _check_writable(run_dir / EVALUATION_FILE)
    if not Path(config.data.root).is_dir():
        raise RunError(f"dataset root {config.data.root} of the run not found; if the data moved, set data.root "
                       f"in {run_dir / CONFIG_FILE}.")
    if not memory_bank:
        config = dataclasses.replace(config, baseline=dataclasses.replace(config.baseline, memory_bank=False))
    timings: dict[str, float] = {}
    data = prepare_data(config)
    changed = _changed_splits(run_dir, posterior, data)
    # Only the memory bank needs the training patches.
    train = embed_role(backbone, data.train, config, "train", progress) if config.baseline.memory_bank else None
    fitted = FitResult(config, posterior, backbone, data, train, timings, posterior_digest(run_dir / POSTERIOR_FILE))
    results, _ = evaluate_methods(fitted, timings, progress)
    document = {method: {k: finite_or_none(v) for k, v in result.metrics.items()} for method, result in results.items()}
    document.update(
        backbone=backbone.describe(),
        posterior_sha256=fitted.posterior_sha256,
        algorithm=posterior.algorithm,
        score=score_name(config, backbone),
        counts=data.counts(),
        data_fingerprints=data.fingerprints(),
        changed_splits=changed,
        normal_image_scores={method: result.normal_image_scores.tolist() for method, result in results.items()},
        timings_s=timings,
    )
    (run_dir / EVALUATION_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
    return document


def _check_writable(path: Path) -> None:
    """Raise RunError before any work when ``path`` cannot be written."""
    if path.is_dir():
        raise RunError(f"{path} is a directory; remove or rename it so that the evaluation can be written there.")
    if not os.access(path.parent, os.W_OK):
        raise RunError(f"run directory {path.parent} is not writable; make it writable to write {path.name}.")


def _changed_splits(run_dir: Path, posterior: Posterior, data) -> list[str]:
    """Return the roles whose images differ from the fingerprints the run recorded, with a warning for each."""
    recorded = (_read_json(run_dir / METRICS_FILE) or {}).get("data_fingerprints", {})
    if not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())):
        logger.warning("%s has malformed data_fingerprints; the images cannot be compared with the run's",
                       run_dir / METRICS_FILE)
        recorded = {}
    recorded = dict(recorded)
    if "train_fingerprint" in posterior.provenance:
        recorded["train"] = posterior.provenance["train_fingerprint"]
    changed = []
    for role, samples in (("train", data.train), ("threshold", data.threshold), ("test", data.test)):
        if role in recorded and recorded[role] != split_fingerprint(samples, data.dataset.root):
            changed.append(role)
            logger.warning(
                "the %s images under %s differ from those of the run (files added, removed, relabelled "
                "or resized), so the metrics can differ from the run's %s", role, data.dataset.root,
                "posterior" if role == "train" else METRICS_FILE,
            )
    return changed


# -- score ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NormalReference:
    """Image scores of a run's normal validation images, the reference for new scores.

    Attributes
    ----------
    scores : np.ndarray of shape (num_images,)
        DPMM image scores of the normal validation images.
    source : str
        File the scores come from.
    """

    scores: np.ndarray
    source: str

    def threshold(self, fpr: float) -> float:
        """Return the lowest recorded score that at most ``fpr`` of the normal images exceed."""
        # The tolerance keeps products such as 0.29 * 100 = 28.999999999999996 at 29.
        allowed_above = int(np.floor(fpr * len(self.scores) + 1e-9))
        return float(np.sort(self.scores)[len(self.scores) - allowed_above - 1])

    def percentile(self, score: float) -> float:
        """Return the percentage of normal images that score below ``score``."""
        return 100.0 * float(np.mean(self.scores < score))


def normal_reference(run_dir: str | Path) -> NormalReference | None:
    """Return the normal validation image scores of a run, or None when it has none.

    ``metrics.json`` (written by ``dinodpmm run``) takes precedence over
    ``evaluation.json`` (written by ``dinodpmm evaluate``, for runs made with ``fit``).
    A file written for another posterior (one the run directory held before a refit)
    or whose scores are not finite numbers is skipped with a warning.
    """
    run_dir = Path(run_dir)
    current = posterior_digest(run_dir / POSTERIOR_FILE) if (run_dir / POSTERIOR_FILE).is_file() else None
    for name in (METRICS_FILE, EVALUATION_FILE):
        document = _read_json(run_dir / name)
        if document is None:
            continue
        recorded = document.get("posterior_sha256")
        if recorded is not None and recorded != current:
            logger.warning("ignoring the normal scores of %s: it was written for another posterior", run_dir / name)
            continue
        scores = _finite_scores(document.get("normal_image_scores"))
        if scores is None:
            logger.warning("ignoring %s: its normal_image_scores are missing or not finite numbers", run_dir / name)
            continue
        return NormalReference(scores, name)
    return None


def _finite_scores(section) -> np.ndarray | None:
    """Return the DPMM scores of a ``normal_image_scores`` section as a 1-D float array, or None if malformed."""
    if not isinstance(section, dict) or not isinstance(section.get("dpmm"), list):
        return None
    try:
        scores = np.asarray(section["dpmm"], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if scores.ndim != 1 or scores.size == 0 or not np.all(np.isfinite(scores)):
        return None
    return scores


def _is_overlay(path: Path, out_dir: Path) -> bool:
    """Return whether ``path`` is an overlay that :func:`score_images` wrote into ``out_dir``."""
    return OVERLAY_NAME.fullmatch(path.name) is not None and path.resolve().parent == out_dir.resolve()


def earlier_scores(out_dir: str | Path) -> list[Path]:
    """Return the ``scores.csv`` and overlays that an earlier :func:`score_images` call left in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [path for path in out_dir.iterdir() if path.is_file() and OVERLAY_NAME.fullmatch(path.name)]
    if (out_dir / SCORES_FILE).is_file():
        found.append(out_dir / SCORES_FILE)
    return sorted(found)


def _image_files(paths: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """List the image files among ``paths`` and in their folders, skipping the overlays in ``out_dir``."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not _is_overlay(p, out_dir)
            )
            if not found:
                raise RunError(f"folder {path} contains no image files; pass image files or a folder of images.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise RunError(f"image or folder {path} not found; pass existing image files or folders.")
    return files


@dataclasses.dataclass
class ScoreReport:
    """The result of :func:`score_images`: the rows it wrote and the threshold it used.

    Attributes
    ----------
    rows : list of dict
        The rows of ``scores.csv``, one per image.
    reference : NormalReference or None
        The run's normal validation image scores; None when the run has none.
    threshold : float or None
        The image-score threshold at the requested false-positive rate.
    """

    rows: list[dict[str, Any]]
    reference: NormalReference | None
    threshold: float | None


def score_images(run_dir: str | Path, paths: Sequence[str | Path], out_dir: str | Path, *,
                 fpr: float = DEFAULT_SCORE_FPR, replace: bool = False) -> ScoreReport:
    """Score new images with a saved run's posterior and write overlays and a CSV to ``out_dir``.

    Parameters
    ----------
    run_dir : str or pathlib.Path
        Directory written by ``dinodpmm run`` or ``dinodpmm fit``.
    paths : sequence of str or pathlib.Path
        Image files, or folders searched recursively for images.
    out_dir : str or pathlib.Path
        Receives ``scores.csv`` and one ``<index>_<stem>_overlay.png`` per image.
    fpr : float
        Fraction of the run's normal validation images allowed above the threshold.
    replace : bool
        Delete the ``scores.csv`` and overlays of an earlier call in ``out_dir``
        (:func:`earlier_scores`) once the run and the inputs are found.

    Returns
    -------
    ScoreReport
        ``rows`` are the CSV rows: ``path``, ``score`` (the image score), ``threshold`` and
        ``above_threshold`` (empty when the run has no normal validation scores, see
        :func:`normal_reference`), ``normal_percentile`` (percentage of normal
        validation images scoring lower), ``max_patch_score``, ``overlay``,
        ``backbone`` and ``error``. An image that cannot be read or embedded gets a
        row with only ``path``, ``backbone`` and ``error``, and a logged warning.

    Raises
    ------
    RunError
        If the run cannot be loaded, ``paths`` is empty, a path does not exist, or no
        image could be scored (``scores.csv`` is written first).
    """
    if not 0.0 < fpr < 1.0:
        raise RunError(f"fpr must lie in (0, 1), got {fpr!r}; pass for example 0.05.")
    if not paths:
        raise RunError("paths is empty; pass image files or folders of images.")
    config, posterior, backbone = load_run(run_dir)
    reference = normal_reference(run_dir)
    threshold = None if reference is None else reference.threshold(fpr)
    out_dir = Path(out_dir)
    files = _image_files(paths, out_dir)
    if replace:
        for path in earlier_scores(out_dir):
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, path in enumerate(files):
        row = {"path": str(path), "score": "", "threshold": "" if threshold is None else threshold,
               "above_threshold": "", "normal_percentile": "", "max_patch_score": "", "overlay": "",
               "backbone": backbone.name, "error": ""}
        try:
            value, max_patch_score, overlay = _score_image(path, out_dir / f"{index:04d}_{path.stem}_overlay.png",
                                                           config, posterior, backbone)
        except (ImageReadError, OSError, ValueError) as error:
            # One unreadable image must not discard the scores of the others.
            logger.warning("skipped %s: %s", path, error)
            row["error"] = str(error).splitlines()[0]
        else:
            row.update(score=value, max_patch_score=max_patch_score, overlay=overlay.name)
            if reference is not None:
                row.update(above_threshold=bool(value > threshold), normal_percentile=reference.percentile(value))
        rows.append(row)
    _write_rows(out_dir / SCORES_FILE, rows)
    if all(row["error"] for row in rows):
        raise RunError(f"none of the {len(rows)} images could be scored; the first failed with: {rows[0]['error']}")
    return ScoreReport(rows, reference, threshold)


def _score_image(path: Path, overlay: Path, config: Config, posterior: Posterior,
                 backbone: Backbone) -> tuple[float, float, Path]:
    """Score one image, draw its overlay, and return the image score, the max patch score and the overlay path."""
    image = load_image(path)
    tokens, grid = backbone.embed([image])
    scores = patch_scores(posterior, tokens[0], score_name(config, backbone), config.score.min_weight)
    value = image_score(scores, config.score.top_fraction)
    display = plots.display_image(image)
    # The map is drawn at the display size; sigma is in pixels of the original image.
    stride = plots.display_stride(image.height, image.width)
    heat = anomaly_map(scores, grid, display.shape, config.score.sigma / stride)
    case = {"title": f"{path.name}: score {value:.4g}", "image": display,
            "mask": np.zeros(heat.shape, dtype=bool), "maps": {"dpmm": heat}}
    plots.plot_overlays([case], overlay, plots.backbone_label(backbone.describe()))
    return value, float(scores.max()), overlay


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


__all__ = [
    "EVALUATION_FILE",
    "NormalReference",
    "ScoreReport",
    "earlier_scores",
    "evaluate_run",
    "load_run",
    "normal_reference",
    "score_images",
]
