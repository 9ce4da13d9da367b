"""The figures of a run: which test images to show, and in which panels.

:func:`write_figures` picks the cases (best and worst anomalous images, the
highest-scored normal one, component assignments, ROC samples) and hands them to the
drawing functions of :mod:`.plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..features import SplitEmbeddings, load_image, load_mask
from ..inference import Posterior
from . import plots
from .runner import NUM_COMPONENT_DRAWS, FitResult, MethodResult, score_name
from .scoring import anomaly_map


def write_figures(fitted: FitResult, results: dict[str, MethodResult], test: SplitEmbeddings, out_dir: Path) -> None:
    """Write every figure of a run into ``out_dir``."""
    posterior, config = fitted.posterior, fitted.config
    footer = plots.backbone_label(fitted.backbone.describe())
    if config.plots.note:
        footer += " | " + config.plots.note
    plots.plot_overlays(_overlay_cases(fitted, results, test), out_dir / "anomaly_maps.png", footer)
    plots.plot_assignments(_assignment_cases(fitted, test), out_dir / "component_assignments.png", footer)
    plots.plot_roc(_roc_curves(results, test), out_dir / "roc.png", footer)
    plots.plot_weights(posterior.weights.detach().cpu().numpy(), out_dir / "mixture_weights.png", footer)
    count = posterior.num_components(fitted.train.num_patches, NUM_COMPONENT_DRAWS, seed=config.fit.seed)
    plots.plot_num_components(count.samples, count.num_points, out_dir / "num_components.png", footer)
    plots.plot_trace(posterior.trace, posterior.algorithm, out_dir / "trace.png", footer)


def _overlay_cases(fitted: FitResult, results: dict[str, MethodResult], test: SplitEmbeddings) -> list[dict]:
    """Pick the highest- and lowest-scored anomalous images and the highest-scored normal one (DPMM scores)."""
    scores, labels = results["dpmm"].image_scores, test.labels
    picks = []
    for title, label, pick in (("highest-scored anomalous", 1, np.argmax), ("lowest-scored anomalous", 1, np.argmin),
                               ("highest-scored normal", 0, np.argmax)):
        candidates = np.flatnonzero(labels == label)
        if candidates.size:
            picks.append((title, int(candidates[pick(scores[candidates])])))
    cases = []
    for title, i in picks:
        sample = fitted.data.test[i]
        mask = load_mask(sample)
        maps = {method: anomaly_map(result.patch_scores[i], test.grid(i), mask.shape, fitted.config.score.sigma)
                for method, result in results.items()}
        cases.append({"title": f"{title}\n{sample.image.name}, DPMM score {scores[i]:.3g}",
                      "image": plots.grayscale(load_image(sample.image)), "mask": mask, "maps": maps})
    return cases


def nearest_components(posterior: Posterior, patches: np.ndarray, score: str, min_weight: float) -> np.ndarray:
    """Return the index of each patch's nearest kept component under the score's geometry.

    Parameters
    ----------
    patches : np.ndarray of shape (num_patches, dim)

    Returns
    -------
    np.ndarray of shape (num_patches,)
        Component indices into ``posterior.means``, int64.
    """
    keep = torch.nonzero(posterior.weights > min_weight).flatten()
    x = torch.as_tensor(np.asarray(patches, dtype=np.float32)).to(posterior.means)
    means = posterior.means[keep]
    if score == "cosine":
        nearest = torch.argmax(torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(means, dim=1).T, 1)
    elif score == "euclidean":
        nearest = torch.argmin(torch.cdist(x, means), 1)
    else:
        return posterior.assign(x).cpu().numpy()
    return keep[nearest].cpu().numpy()


def _assignment_cases(fitted: FitResult, test: SplitEmbeddings) -> list[dict]:
    """Component assignment grids of a few test images, half anomalous where possible."""
    labels = test.labels
    count = fitted.config.plots.num_assignment_images
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    chosen = list(anomalous[: (count + 1) // 2]) + list(normal[: count // 2])
    chosen += [i for i in range(test.num_images) if i not in chosen][: count - len(chosen)]
    rank = torch.argsort(torch.argsort(fitted.posterior.weights, descending=True)).cpu().numpy()
    score = score_name(fitted.config, fitted.backbone)
    cases = []
    for i in chosen:
        nearest = nearest_components(fitted.posterior, test.image_patches(i), score, fitted.config.score.min_weight)
        sample = fitted.data.test[int(i)]
        cases.append({"title": f"{sample.image.name} ({'anomalous' if sample.label else 'normal'})",
                      "image": plots.grayscale(load_image(sample.image)), "mask": load_mask(sample),
                      "assignment": rank[nearest].reshape(test.grid(i))})
    return cases


def _roc_curves(results: dict[str, MethodResult], test: SplitEmbeddings) -> dict:
    curves: dict[str, dict] = {"image": {}, "pixel": {}}
    for method, result in results.items():
        curves["image"][method] = {"labels": test.labels, "scores": result.image_scores,
                                   "auroc": result.metrics["image_auroc"]}
        masks, maps = result.roc_pixels
        curves["pixel"][method] = {"labels": masks, "scores": maps, "auroc": result.metrics["pixel_auroc"]}
    return curves


__all__ = ["nearest_components", "write_figures"]
