"""Anomaly scores from a fitted mixture: per patch, per image and as a pixel map.

A patch is anomalous when it is far from every component of the mixture fitted to
normal patches. :func:`patch_scores` measures that distance, :func:`image_score`
pools the patch scores of one image, and :func:`anomaly_map` turns the patch grid of
one image into a map at the resolution of its ground-truth mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ..inference.posterior import Posterior
from .memory_bank import DEFAULT_CHUNK_SIZE, MemoryBank, _check_chunk_size

SCORE_NAMES: tuple[str, ...] = ("cosine", "euclidean", "mahalanobis", "nll")

# Absolute slack added to top_fraction * num_patches before rounding down, so that a
# product such as 0.29 * 100 = 28.999999999999996 counts as 29 patches.
_COUNT_ROUNDING_SLACK = 1e-9


def patch_scores(
    posterior: Posterior,
    patches: torch.Tensor | np.ndarray,
    score: str = "cosine",
    min_weight: float = 1e-6,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Score patches by their distance to the components of a fitted mixture.

    Parameters
    ----------
    posterior : Posterior
        Mixture fitted to normal patches.
    patches : torch.Tensor or np.ndarray of shape (num_patches, dim)
        Patch embeddings of any float dtype. Rows are converted to float32 one chunk at
        a time, so float16 ``np.memmap`` arrays are never loaded whole.
    score : {"cosine", "euclidean", "mahalanobis", "nll"}
        ``"cosine"``: cosine distance ``1 - cos(x, mu_k)`` to the nearest component mean,
        the score of the method. ``"euclidean"``: L2 distance to the nearest mean.
        ``"mahalanobis"``: square root of the smallest squared Mahalanobis distance under
        each component's covariance. ``"nll"``: ``-log p(x)`` under the whole mixture.
    min_weight : float
        Components whose expected weight is at most ``min_weight`` are ignored by
        ``"cosine"``, ``"euclidean"`` and ``"mahalanobis"``, because a truncated
        posterior keeps empty components whose means carry no information. ``"nll"``
        uses every component, each weighted by its expected weight.
    chunk_size : int
        Rows of ``patches`` scored per matrix product.

    Returns
    -------
    torch.Tensor of shape (num_patches,)
        Scores, higher is more anomalous, float32 on the CPU.

    Raises
    ------
    ValueError
        If ``score`` is not one of :data:`SCORE_NAMES`, ``min_weight`` is negative, no
        component has expected weight above ``min_weight``, or ``patches`` does not
        have shape (num_patches, posterior.dim) or is not finite.
    """
    if score not in SCORE_NAMES:
        raise ValueError(f"score must be one of {list(SCORE_NAMES)}, got {score!r}.")
    _check_chunk_size(chunk_size)
    keep = _kept_components(posterior, min_weight)
    if score in ("cosine", "euclidean"):
        bank = MemoryBank(posterior.means[keep], score, chunk_size, backend="torch")
        return bank.score(_checked_patches(patches, posterior.dim))
    return _density_scores(posterior, _checked_patches(patches, posterior.dim), score, keep, chunk_size)


def _kept_components(posterior: Posterior, min_weight: float) -> torch.Tensor:
    if not min_weight >= 0.0:
        raise ValueError(f"min_weight must be a non-negative expected weight, got {min_weight!r}.")
    weights = posterior.weights
    keep = weights > min_weight
    if not bool(keep.any()):
        raise ValueError(
            f"no component has expected weight above min_weight={min_weight!r}; the largest "
            f"weight is {float(weights.max()):.3g}. Lower min_weight below it."
        )
    return keep


def _checked_patches(patches, dim: int):
    if not isinstance(patches, (torch.Tensor, np.ndarray)):
        raise TypeError(f"patches must be a torch.Tensor or numpy array, got {type(patches).__name__}.")
    if patches.ndim != 2 or patches.shape[1] != dim:
        raise ValueError(
            f"patches must have shape (num_patches, {dim}) to match the posterior's embedding "
            f"dimension, got {tuple(patches.shape)}; embed them with the backbone the posterior was fitted on."
        )
    return patches


def _density_scores(posterior: Posterior, patches, score: str, keep: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Score ``patches`` (num_patches, dim) by Mahalanobis distance or negative log-density."""
    pieces = []
    for start in range(0, patches.shape[0], chunk_size):
        rows = patches[start : start + chunk_size]
        # Float16 rows become float32 here and the posterior casts them to its own dtype.
        # np.array copies, because torch cannot wrap the read-only arrays of np.load(mmap_mode="r").
        if isinstance(rows, torch.Tensor):
            chunk = rows.detach()
        else:
            chunk = torch.from_numpy(np.array(rows, dtype=np.promote_types(rows.dtype, np.float32)))
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"patches must be finite, but rows {start} to {start + len(chunk) - 1} "
                             "contain NaN or infinity; check the embeddings that produced them.")
        if score == "mahalanobis":
            squared = posterior.squared_mahalanobis(chunk)[:, keep]  # N K
            piece = squared.min(dim=1).values.clamp_min(0.0).sqrt()
        else:
            piece = -posterior.log_density(chunk)
        pieces.append(piece.float().cpu())
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32)


def image_score(patch_scores: torch.Tensor | np.ndarray, top_fraction: float = 0.01) -> float:
    """Pool one image's patch scores into an image score: the mean of the highest ones.

    The mean runs over the ``k = max(1, floor(top_fraction * num_patches))`` highest
    scores. With the default ``top_fraction=0.01`` that is the top 1% of patches. Below
    ``1 / top_fraction`` patches (100 by default) the floor is 0, so the image score is
    the maximum patch score. It is also the maximum below ``2 / top_fraction`` patches,
    because there the floor is 1.

    Parameters
    ----------
    patch_scores : torch.Tensor or np.ndarray of shape (num_patches,)
        Patch scores of one image.
    top_fraction : float
        Fraction of patches averaged, in (0, 1]; 1 gives the mean of all patches.

    Returns
    -------
    float
        Image score.

    Raises
    ------
    ValueError
        If ``top_fraction`` is outside (0, 1] or ``patch_scores`` is not a non-empty
        1-D array of finite values.
    """
    scores = _as_score_tensor(patch_scores, expected_ndim=1)
    return float(image_scores(scores.unsqueeze(0), top_fraction)[0])


def image_scores(patch_scores: torch.Tensor | np.ndarray, top_fraction: float = 0.01) -> np.ndarray:
    """Pool the patch scores of several images that share a patch grid, as :func:`image_score` does.

    Parameters
    ----------
    patch_scores : torch.Tensor or np.ndarray of shape (num_images, num_patches)
        Patch scores, one row per image.
    top_fraction : float
        Fraction of patches averaged per image, in (0, 1].

    Returns
    -------
    np.ndarray of shape (num_images,)
        Image scores, float64.
    """
    scores = _as_score_tensor(patch_scores, expected_ndim=2)
    count = top_patch_count(scores.shape[1], top_fraction)
    top = torch.topk(scores.double(), count, dim=1).values  # I k
    return top.mean(dim=1).numpy()


def top_patch_count(num_patches: int, top_fraction: float) -> int:
    """Return how many of ``num_patches`` patches the image score averages: ``max(1, floor(top_fraction * num_patches))``."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction!r}; 0.01 averages the top 1% of patches.")
    return max(1, math.floor(top_fraction * num_patches + _COUNT_ROUNDING_SLACK))


def _as_score_tensor(scores, expected_ndim: int) -> torch.Tensor:
    scores = scores.detach().cpu() if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    shape = "(num_patches,)" if expected_ndim == 1 else "(num_images, num_patches)"
    if scores.ndim != expected_ndim or scores.shape[-1] == 0:
        raise ValueError(f"patch_scores must have shape {shape} with at least one patch, got {tuple(scores.shape)}.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("patch_scores must be finite, but contains NaN or infinity; "
                         "check the embeddings and the posterior that produced them.")
    return scores


def anomaly_map(
    patch_scores: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    size: tuple[int, int],
    sigma: float = 0.0,
) -> np.ndarray:
    """Upsample one image's patch scores to a pixel map of the given size.

    The (grid_h, grid_w) score grid is resized bilinearly with ``align_corners=False``
    (``torch.nn.functional.interpolate``), so each patch score sits at the centre of
    the image region the patch covers, then optionally smoothed with a Gaussian.

    Parameters
    ----------
    patch_scores : torch.Tensor or np.ndarray of shape (grid_h * grid_w,)
        Patch scores in row-major patch order.
    grid : tuple of int
        ``(grid_h, grid_w)``.
    size : tuple of int
        ``(height, width)`` of the output, normally the ground-truth mask's.
    sigma : float
        Standard deviation of the Gaussian smoothing in output pixels
        (``scipy.ndimage.gaussian_filter``, reflecting borders); 0 means no smoothing.

    Returns
    -------
    np.ndarray of shape (height, width)
        Anomaly map, float32.

    Raises
    ------
    ValueError
        If ``patch_scores`` does not have ``grid_h * grid_w`` entries, a size is not
        positive, or ``sigma`` is negative.
    """
    grid_h, grid_w = _positive_pair("grid", grid)
    height, width = _positive_pair("size", size)
    if not sigma >= 0.0:
        raise ValueError(f"sigma must be a non-negative number of pixels, got {sigma!r}; use 0 for no smoothing.")
    scores = _as_score_tensor(patch_scores, expected_ndim=1)
    if scores.numel() != grid_h * grid_w:
        raise ValueError(f"patch_scores must have grid_h * grid_w = {grid_h * grid_w} entries for grid {grid}, "
                         f"got {scores.numel()}; pass the grid the backbone returned for this image.")
    # NOTE: the map assumes the patch grid covers the whole image. The centre crop of
    # preprocessing drops up to patch_size - 1 resized pixels per axis, so map pixels
    # near the image border can be misplaced by up to half a patch.
    patches = scores.float().reshape(1, 1, grid_h, grid_w)
    pixels = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    pixels = pixels.numpy()
    if sigma > 0.0:
        pixels = gaussian_filter(pixels, sigma=sigma, mode="reflect")
    return pixels.astype(np.float32, copy=False)


def _positive_pair(name: str, pair) -> tuple[int, int]:
    values = tuple(pair)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"{name} must be two positive integers (height, width), got {pair!r}.")
    return int(values[0]), int(values[1])
