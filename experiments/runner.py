"""The experiment runner: features (cached), fit, score, evaluate and plot, from one config.

:func:`run_experiment` runs every stage and fills a run directory::

    config.yaml            the resolved configuration (absolute paths, every key)
    posterior.safetensors  the fitted posterior, with the backbone and dataset as provenance
    metrics.json           metrics of the DPMM and of the memory-bank baseline, timings,
                           counts, fingerprints of the images, image scores of the normal
                           validation images, package versions
    scores.csv             per test image: path, label, defect, DPMM score, bank score,
                           backbone
    figures/*.png          anomaly maps, component assignments, ROC curves, weights,
                           number of components, inference trace

The Dice thresholds come from the patch scores of normal validation images. When the
dataset has no validation split, a seeded fraction (``data.holdout_fraction``) of the
normal training images is held out of the fit and of the memory bank for that, and
``metrics.json`` records it under ``threshold_images``.

:func:`fit_from_config` runs only the features and the fit, and :mod:`.run_figures`
draws the figures. Saved runs are reloaded, re-evaluated and used to score new images
by :mod:`.saved_runs`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..features import (
    Backbone,
    Dataset,
    EmbeddingCache,
    Sample,
    SplitEmbeddings,
    available_backbones,
    embed_split,
    load_backbone,
    load_mask,
    open_dataset,
)
from ..features.backbones import OFFLINE_BACKBONES
from ..inference import Posterior, fit_gibbs, fit_online_em, fit_svi
from .config import Config, ConfigError, resolve_paths, save_config
from .memory_bank import MemoryBank
from .metrics import PixelMetrics, evaluate
from .scoring import anomaly_map, image_score, patch_scores

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
POSTERIOR_FILE = "posterior.safetensors"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
FIGURES_DIR = "figures"
# Outputs computed from a run's posterior; refitting into the directory deletes them.
STALE_OUTPUTS = (METRICS_FILE, SCORES_FILE, FIGURES_DIR, "evaluation.json", "inference_data.nc")
METHODS = ("dpmm", "memory_bank")
# Metrics that evaluate() returns and that a re-evaluation of a saved run must reproduce.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro")
# Packages whose versions metrics.json records.
VERSIONED_PACKAGES = ("dinodpmm", "torch", "pyro-ppl", "timm", "numpy")
# Posterior draws for the number-of-components figure.
NUM_COMPONENT_DRAWS = 500


class RunError(ValueError):
    """A user error in a run: missing run directory, empty split, incompatible posterior."""


# -- data -------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """The images of one experiment after subsampling.

    Attributes
    ----------
    dataset : Dataset
        The opened dataset.
    train : list of Sample
        Normal images the mixture and the memory bank are fitted on.
    threshold : list of Sample
        Normal images whose patch scores set the Dice thresholds.
    threshold_source : str
        ``"valid"`` or ``"train holdout"``.
    test : list of Sample
        Test images, normal and anomalous.
    """

    dataset: Dataset
    train: list[Sample]
    threshold: list[Sample]
    threshold_source: str
    test: list[Sample]

    def fingerprints(self) -> dict[str, str]:
        """Return a fingerprint of the images of each role, see :func:`split_fingerprint`."""
        return {role: split_fingerprint(getattr(self, role), self.dataset.root)
                for role in ("train", "threshold", "test")}

    def counts(self) -> dict[str, int]:
        """Return the number of images in each role."""
        test_anomalous = sum(sample.label for sample in self.test)
        return {
            "train_images": len(self.train),
            "threshold_images": len(self.threshold),
            "test_images": len(self.test),
            "test_normal_images": len(self.test) - test_anomalous,
            "test_anomalous_images": test_anomalous,
        }


def split_fingerprint(samples: Sequence[Sample], root: Path) -> str:
    """Return a SHA-256 hex digest of the images, masks, labels and file sizes of ``samples``.

    Paths enter relative to ``root``, so a dataset moved as a whole keeps its
    fingerprint. A file added, removed, relabelled or rewritten with another size
    changes it. File contents are not read, so an edit that keeps the size goes unseen.
    """
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is None:
                digest.update(b"-\n")
                continue
            name = path.relative_to(root) if path.is_relative_to(root) else path
            size = path.stat().st_size if path.exists() else -1
            digest.update(f"{name.as_posix()}\t{size}\n".encode())
        digest.update(f"{sample.label}\n".encode())
    return digest.hexdigest()


def _subsample(samples: Sequence[Sample], size: int | None, rng: np.random.Generator) -> list[Sample]:
    """Return ``size`` samples drawn without replacement, in their original order."""
    if size is None or size >= len(samples):
        return list(samples)
    keep = np.sort(rng.choice(len(samples), size=size, replace=False))
    return [samples[i] for i in keep]


def _stratified_subsample(samples: Sequence[Sample], size: int | None, rng: np.random.Generator) -> list[Sample]:
    """Subsample keeping the fraction of anomalous images, with at least one image of each label present."""
    if size is None or size >= len(samples):
        return list(samples)
    anomalous = [i for i, sample in enumerate(samples) if sample.label == 1]
    normal = [i for i, sample in enumerate(samples) if sample.label == 0]
    num_anomalous = round(size * len(anomalous) / len(samples))
    num_anomalous = min(len(anomalous), max(num_anomalous, 1 if anomalous else 0, size - len(normal)))
    num_anomalous = min(num_anomalous, size - (1 if normal else 0))
    keep = rng.choice(anomalous, size=num_anomalous, replace=False).tolist() if num_anomalous else []
    keep += rng.choice(normal, size=size - num_anomalous, replace=False).tolist() if size > num_anomalous else []
    return [samples[i] for i in sorted(keep)]


def prepare_data(config: Config) -> PreparedData:
    """Open the dataset and pick the training, threshold and test images of ``config``.

    Raises
    ------
    RunError
        If ``data.root`` is not set or a split that the run needs is empty.
    FileNotFoundError, ValueError
        From :func:`~dinodpmm.features.open_dataset` for a missing or invalid dataset.
    """
    if config.data.root is None:
        raise RunError("data.root is not set; set it in the config file or pass data.root=PATH.")
    if not Path(config.data.root).is_dir():
        raise RunError(f"dataset root {config.data.root} not found or not a directory; set data.root in the "
                       "config file or pass data.root=PATH, the folder that contains the train and test splits.")
    dataset = open_dataset(config.data.root, config.data.layout)
    rng = np.random.default_rng(config.data.seed)
    train = [sample for sample in dataset.train if sample.label == 0]
    _require_images(train, "normal training", dataset)
    valid_normal = [sample for sample in dataset.valid or () if sample.label == 0]
    if valid_normal:
        threshold, source = _subsample(valid_normal, config.data.max_valid_images, rng), "valid"
    else:
        train, threshold = _hold_out(train, config.data.holdout_fraction, rng)
        source = "train holdout"
    train = _subsample(train, config.data.max_train_images, rng)
    test = _stratified_subsample(list(dataset.test), config.data.max_test_images, rng)
    _require_images(test, "test", dataset)
    return PreparedData(dataset, train, threshold, source, test)


def _require_images(samples: Sequence[Sample], role: str, dataset: Dataset) -> None:
    if not samples:
        raise RunError(f"the {role} split of the {dataset.layout} dataset at {dataset.root} has no images; "
                       "point data.root at a dataset with normal training images and test images.")


def _hold_out(train: list[Sample], fraction: float, rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Split normal training images into (fit images, threshold images) with a seeded permutation."""
    num_held = max(1, round(fraction * len(train)))
    if num_held >= len(train):
        raise RunError(f"the dataset has no validation split and only {len(train)} normal training images, "
                       "too few to hold some out for the Dice thresholds; add training images.")
    held_out = set(rng.choice(len(train), size=num_held, replace=False).tolist())
    logger.info("no validation split: holding out %d of %d normal training images for the Dice thresholds",
                num_held, len(train))
    return ([s for i, s in enumerate(train) if i not in held_out], [s for i, s in enumerate(train) if i in held_out])


# -- features ------------------------------------------------------------------------------------


def backbone_from_config(config: Config) -> Backbone:
    """Load the backbone that ``config.backbone`` names.

    Raises
    ------
    RunError
        If ``backbone.name`` is not a registered backbone.
    """
    if config.backbone.name not in available_backbones():
        raise RunError(f"unknown backbone {config.backbone.name!r} in backbone.name; available backbones: "
                       f"{', '.join(available_backbones())}.")
    return load_backbone(
        config.backbone.name,
        weights=config.backbone.weights,
        device=config.backbone.device,
        resolution=config.backbone.resolution,
        batch_size=config.backbone.batch_size,
        progress=False,
    )


def embed_role(backbone: Backbone, samples: list[Sample], config: Config, role: str, progress: bool) -> SplitEmbeddings:
    """Embed the images of one role (train, threshold or test) through the config's cache."""
    cache = EmbeddingCache(config.cache.dir, dtype=config.cache.dtype)
    return embed_split(backbone, samples, cache, batch_size=config.backbone.batch_size, progress=progress,
                       description=role)


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    """Time the enclosed block into ``timings[stage]`` (seconds) and log its start and end."""
    logger.info("stage %s: started", stage)
    started = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - started
    logger.info("stage %s: done in %.2f s", stage, timings[stage])


# -- fit --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """Everything :func:`fit_from_config` computed, for the scoring stages that follow.

    Attributes
    ----------
    config : Config
        The resolved configuration.
    posterior : Posterior
        The fitted mixture.
    backbone : Backbone
        The backbone that embedded the images.
    data : PreparedData
        The images of the run.
    train : SplitEmbeddings or None
        Patch embeddings of the training images, shape (num_patches, dim); None when a
        saved run is re-evaluated without the memory bank, the only stage that reads them.
    timings : dict of str to float
        Seconds per stage.
    posterior_sha256 : str or None
        Digest of the saved posterior file (:func:`posterior_digest`); None when the
        posterior was not saved.
    """

    config: Config
    posterior: Posterior
    backbone: Backbone
    data: PreparedData
    train: SplitEmbeddings | None
    timings: dict[str, float]
    posterior_sha256: str | None = None


def fit_from_config(config: Config, out_dir: str | Path | None = None, *, progress: bool = False) -> FitResult:
    """Embed the training images (through the cache) and fit the mixture that ``config`` describes.

    With ``out_dir``, writes ``config.yaml`` and ``posterior.safetensors`` there. When
    ``out_dir`` already has a posterior, the outputs computed from it (``STALE_OUTPUTS``)
    are deleted first; this happens after the fit, so an error before it leaves the
    earlier run whole.
    """
    config = resolve_paths(config)
    timings: dict[str, float] = {}
    with _timed(timings, "prepare"):
        backbone = backbone_from_config(config)
        data = prepare_data(config)
    logger.info("%s", data.dataset.summary())
    with _timed(timings, "embed_train"):
        train = embed_role(backbone, data.train, config, "train", progress)
    with _timed(timings, "fit"):
        posterior = _fit(train, config, backbone, progress)
    posterior.provenance.update(_provenance(backbone, data, train))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / POSTERIOR_FILE).exists():
            _remove_stale_outputs(out_dir)
        save_config(config, out_dir / CONFIG_FILE)
        posterior.save(out_dir / POSTERIOR_FILE)
        digest = posterior_digest(out_dir / POSTERIOR_FILE)
    else:
        digest = None
    return FitResult(config, posterior, backbone, data, train, timings, digest)


def _remove_stale_outputs(out_dir: Path) -> None:
    """Delete the outputs an earlier run left in ``out_dir``, which describe the posterior about to be replaced."""
    for name in STALE_OUTPUTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        logger.info("removed %s of the earlier run", path)


def posterior_digest(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a posterior file, which outputs store to name their posterior."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(backbone: Backbone, data: PreparedData, train: SplitEmbeddings) -> dict[str, Any]:
    return {
        "backbone": backbone.describe(),
        "dataset_root": str(data.dataset.root),
        "layout": data.dataset.layout,
        "train_images": len(data.train),
        "train_patches": train.num_patches,
        "train_fingerprint": split_fingerprint(data.train, data.dataset.root),
    }


def _fit(train: SplitEmbeddings, config: Config, backbone: Backbone, progress: bool) -> Posterior:
    fit = config.fit
    alpha_prior = tuple(fit.alpha_prior) if fit.alpha_prior is not None else None
    logger.info("fitting %s (%s covariance) on %d patches x %d dims", fit.algorithm, fit.covariance,
                train.num_patches, train.dim)
    if fit.algorithm == "svi":
        return fit_svi(train.patches, truncation=fit.truncation, covariance=fit.covariance, alpha=fit.alpha,
                       alpha_prior=alpha_prior, batch_size=fit.batch_size, num_steps=fit.num_steps,
                       max_steps=fit.max_steps, learning_rate=fit.learning_rate, seed=fit.seed,
                       device=config.backbone.device, progress=progress)
    if fit.algorithm == "gibbs":
        gibbs = fit.gibbs
        return fit_gibbs(train.patches, covariance=fit.covariance, alpha=fit.alpha, alpha_prior=alpha_prior,
                         num_chains=gibbs.num_chains, num_sweeps=gibbs.num_sweeps, burn_in=gibbs.burn_in,
                         thin=gibbs.thin, subsample=gibbs.subsample, split_merge=gibbs.split_merge,
                         seed=fit.seed, progress=progress)
    online = fit.online_em
    return fit_online_em(train.patches, truncation=fit.truncation, covariance=fit.covariance, alpha=fit.alpha,
                         images_per_step=online.images_per_step, num_epochs=online.num_epochs, rate=online.rate,
                         seed=fit.seed, progress=progress, image_offsets=image_offsets(train),
                         device=config.backbone.device)


def image_offsets(embeddings: SplitEmbeddings) -> np.ndarray:
    """Return the row offsets of the images in a split's patch matrix, shape (num_images + 1,)."""
    return np.array([record.row_start for record in embeddings.index] + [embeddings.num_patches])


# -- scoring -------------------------------------------------------------------------------------------


def score_name(config: Config, backbone: Backbone) -> str:
    """Return the patch score of a run: ``score.name``, else the backbone's recommended score."""
    return config.score.name or backbone.recommended_score


def bank_metric(score: str) -> str:
    """Return the memory-bank metric of the same family as a DPMM patch score."""
    return "cosine" if score == "cosine" else "euclidean"


def build_memory_bank(train: SplitEmbeddings, config: Config, score: str) -> MemoryBank:
    """Build the exact nearest-neighbour bank from the training patches, seeded-subsampled to ``baseline.max_patches``."""
    patches = train.patches
    if config.baseline.max_patches is not None and config.baseline.max_patches < train.num_patches:
        rng = np.random.default_rng(config.baseline.seed)
        rows = np.sort(rng.choice(train.num_patches, size=config.baseline.max_patches, replace=False))
        patches = np.asarray(train.patches[rows])
    # The torch backend keeps the run free of the optional faiss dependency and its timings comparable.
    return MemoryBank(patches, bank_metric(score), backend="torch")


def _scorers(fitted: FitResult, score: str, timings: dict[str, float]) -> dict[str, Callable]:
    """Return one function per method mapping patches (num_patches, dim) to patch scores (num_patches,)."""
    config, posterior = fitted.config, fitted.posterior
    scorers = {"dpmm": lambda patches: patch_scores(posterior, patches, score, config.score.min_weight)}
    if config.baseline.memory_bank:
        with _timed(timings, "build_memory_bank"):
            bank = build_memory_bank(fitted.train, config, score)
        scorers["memory_bank"] = bank.score
    return scorers


def _score_images(scorer: Callable, embeddings: SplitEmbeddings) -> tuple[list[np.ndarray], float]:
    """Score every image of ``embeddings`` one at a time; return the patch scores and the seconds spent."""
    scores, seconds = [], 0.0
    for i in range(embeddings.num_images):
        patches = np.asarray(embeddings.image_patches(i))
        started = time.perf_counter()
        scores.append(scorer(patches).numpy())
        seconds += time.perf_counter() - started
    return scores, seconds


# -- evaluation ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MethodResult:
    """Scores and metrics of one method on the test images."""

    metrics: dict[str, float]
    image_scores: np.ndarray
    normal_image_scores: np.ndarray
    patch_scores: list[np.ndarray]
    roc_pixels: tuple[np.ndarray, np.ndarray]
    seconds_per_image: float


def evaluate_method(scorer: Callable, test: SplitEmbeddings, threshold: SplitEmbeddings, data: PreparedData,
                     config: Config) -> MethodResult:
    """Score the threshold and test images with ``scorer`` and compute every metric."""
    normal_scores, _ = _score_images(scorer, threshold)
    test_scores, seconds = _score_images(scorer, test)
    image_scores = np.array([image_score(s, config.score.top_fraction) for s in test_scores])
    pixels = PixelMetrics()
    rng = np.random.default_rng(config.data.seed)
    sampled_maps, sampled_masks = [], []
    empty_anomalous = []
    for i, sample in enumerate(data.test):
        mask = load_mask(sample)
        if sample.label == 1 and not mask.any():
            empty_anomalous.append(sample.image)
        heat = anomaly_map(test_scores[i], test.grid(i), mask.shape, config.score.sigma)
        pixels.update(heat, mask)
        picks = rng.choice(mask.size, size=min(mask.size, config.plots.roc_pixels_per_image), replace=False)
        sampled_maps.append(heat.reshape(-1)[picks])
        sampled_masks.append(mask.reshape(-1)[picks])
    if empty_anomalous:
        logger.warning(
            "%d anomalous test images have an all-zero mask (first: %s); they count as anomalous "
            "for the image metrics and add no anomalous pixels", len(empty_anomalous), empty_anomalous[0],
        )
    metrics = evaluate(image_scores, test.labels, pixels, np.concatenate(normal_scores),
                       fprs=config.eval.fprs, max_fpr=config.eval.max_fpr)
    roc_pixels = (np.concatenate(sampled_masks), np.concatenate(sampled_maps))
    normal_image_scores = np.array([image_score(s, config.score.top_fraction) for s in normal_scores])
    return MethodResult(metrics, image_scores, normal_image_scores, test_scores, roc_pixels,
                        seconds / max(test.num_images, 1))


def evaluate_methods(fitted: FitResult, timings: dict[str, float], progress: bool) -> tuple[dict, SplitEmbeddings]:
    """Score the threshold and test images with the DPMM (and the memory bank) and compute the metrics.

    Returns the :class:`MethodResult` of each method and the test embeddings.
    """
    config, data = fitted.config, fitted.data
    with _timed(timings, "embed_threshold"):
        threshold = embed_role(fitted.backbone, data.threshold, config, "threshold", progress)
    with _timed(timings, "embed_test"):
        test = embed_role(fitted.backbone, data.test, config, "test", progress)
    _check_dims(fitted.posterior, test)
    score = score_name(config, fitted.backbone)
    results = {}
    for method, scorer in _scorers(fitted, score, timings).items():
        with _timed(timings, f"evaluate_{method}"):
            results[method] = evaluate_method(scorer, test, threshold, data, config)
        timings[f"{method}_scoring_s_per_image"] = results[method].seconds_per_image
    return results, test


def _check_dims(posterior: Posterior, embeddings: SplitEmbeddings) -> None:
    if posterior.dim != embeddings.dim:
        raise RunError(
            f"the posterior was fitted on {posterior.dim}-dimensional embeddings but the backbone "
            f"{embeddings.backbone.get('name')} produces {embeddings.dim}-dimensional ones; score with "
            f"the backbone the posterior was fitted on ({posterior.provenance.get('backbone', {}).get('name')})."
        )


def package_versions() -> dict[str, str]:
    """Return the installed version of each package in ``VERSIONED_PACKAGES``."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def finite_or_none(value: Any) -> Any:
    """Map NaN to None so metrics.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return finite_or_none(value.item())
    return value


def _metrics_document(fitted: FitResult, results: dict[str, MethodResult], timings: dict[str, float]) -> dict:
    config, posterior = fitted.config, fitted.posterior
    count = posterior.num_components(fitted.train.num_patches, NUM_COMPONENT_DRAWS, seed=config.fit.seed)
    # Gibbs has no truncation: its posterior.truncation counts the clusters it found.
    saturated = None if posterior.algorithm == "gibbs" else bool(count.interval(0.94)[1] >= posterior.truncation)
    if saturated:
        logger.warning(
            "all %d components are occupied in some posterior draws, so the truncation bounds the "
            "number of components; raise fit.truncation", posterior.truncation,
        )
    document = {method: {k: finite_or_none(v) for k, v in result.metrics.items()}
                for method, result in results.items()}
    document.update(
        backbone=fitted.backbone.describe(),
        posterior_sha256=fitted.posterior_sha256,
        backbone_is_baseline=fitted.backbone.name in OFFLINE_BACKBONES,
        algorithm=posterior.algorithm,
        score=score_name(config, fitted.backbone),
        memory_bank_metric=bank_metric(score_name(config, fitted.backbone)) if "memory_bank" in results else None,
        memory_bank_patches=_bank_size(fitted),
        threshold_images=fitted.data.threshold_source,
        counts={**fitted.data.counts(), "train_patches": fitted.train.num_patches},
        data_fingerprints=fitted.data.fingerprints(),
        # Image scores of the normal validation images: `dinodpmm score` places new
        # images among them and derives its threshold from them.
        normal_image_scores={method: result.normal_image_scores.tolist() for method, result in results.items()},
        posterior=posterior.describe(),
        num_components={"mean": count.mean, "interval_94": list(count.interval(0.94)),
                        "num_points": count.num_points, "truncation": posterior.truncation,
                        "truncation_saturated": saturated},
        versions=package_versions(),
        timings_s=timings,
    )
    return document


def _bank_size(fitted: FitResult) -> int | None:
    if not fitted.config.baseline.memory_bank:
        return None
    limit = fitted.config.baseline.max_patches
    return fitted.train.num_patches if limit is None else min(limit, fitted.train.num_patches)


def _write_scores_csv(path: Path, samples: Sequence[Sample], results: dict[str, MethodResult],
                      backbone: Backbone) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "defect", "dpmm_score", "memory_bank_score", "backbone"])
        for i, sample in enumerate(samples):
            bank = results["memory_bank"].image_scores[i] if "memory_bank" in results else ""
            writer.writerow([str(sample.image), sample.label, sample.defect, results["dpmm"].image_scores[i], bank,
                             backbone.name])


def run_experiment(config: Config, out_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Run features, fit, scoring, evaluation and figures, and fill the run directory ``out_dir``.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    out_dir = Path(out_dir)
    fitted = fit_from_config(config, out_dir, progress=progress)
    timings = fitted.timings
    results, test = evaluate_methods(fitted, timings, progress)
    _write_scores_csv(out_dir / SCORES_FILE, fitted.data.test, results, fitted.backbone)
    if fitted.config.plots.enabled:
        with _timed(timings, "figures"):
            # Imported here because run_figures imports this module.
            from .run_figures import write_figures

            write_figures(fitted, results, test, out_dir / FIGURES_DIR)
    document = _metrics_document(fitted, results, timings)
    (out_dir / METRICS_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
    logger.info("run directory: %s", out_dir)
    return document


__all__ = [
    "ConfigError",
    "FitResult",
    "PreparedData",
    "RunError",
    "fit_from_config",
    "prepare_data",
    "run_experiment",
]
