"""A weight-free backbone for textured surfaces: hand-crafted texture descriptors per patch.

:class:`~dinodpmm.features.offline.OfflineBackbone` describes brain MRI: intensity
relative to a foreground, depth inside it and left-right asymmetry. Industrial
surfaces (tiles, metal, fabric) have no foreground and no symmetry axis. Their
defects are dark or bright spots, thin lines and regions whose texture differs from
the rest. :class:`OfflineTextureBackbone` shares the preprocessing and the 14 px
patch grid of the offline backbone and computes, on the intensity image centred on
its median and divided by its 10%-90% range:

- the patch's mean and standard deviation and their means over centred windows of
  5 and 9 patches (brightness and roughness with their context);
- the patch's mean minus the mean of its 5-patch window (local contrast);
- the minimum and maximum of the slightly blurred image in the patch, relative to
  the patch's median (dark spots and bright specks);
- the root mean square of the horizontal and vertical derivatives, in the patch and
  over 5-patch windows, and the logarithm of their ratio (strength and direction
  of streaks and scratches);
- the most negative and most positive difference-of-Gaussians response in the patch
  at three scales (dark and bright blobs and lines of different widths);
- the patch's distance to the nearest left or right and top or bottom image edge,
  saturating at 3 patches, so patches at the border of a crop, which look unlike
  the interior, are compared with other border patches.

Each feature is multiplied by a fixed constant (``_FEATURE_SCALES``, all 1 in this
version). No statistic is fitted at run time, so the embedding of one image does not
depend on other images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .offline import (
    PATCH_SIZE,
    OfflineBackbone,
    _box_mean,
    _patch_pool,
    _standard_deviation,
)

__all__ = ["OfflineTextureBackbone", "FEATURE_NAMES"]

# Bump it whenever a change to this module changes the tokens, because it enters
# weights_digest and so the embedding cache keys.
FEATURE_VERSION = "offline-texture-v1"

# Lower bound of the normalisation scale (the image's 10%-90% range), in [0, 1]
# intensity units. It keeps flat images from dividing by zero and is a quarter of
# one 8-bit grey level, far below the range of any textured image.
_MIN_SCALE = 1e-3
_SCALE_QUANTILES = (0.1, 0.5, 0.9)

# Gaussian blur, in preprocessed pixels, before taking a patch's minimum and maximum
# and its derivatives, so that single noisy pixels do not dominate them.
_PRE_BLUR_SIGMA = 1.0
# Gaussian kernels are truncated at this many standard deviations.
_GAUSSIAN_TRUNCATE = 3.0

# Inner standard deviations, in preprocessed pixels, of the difference-of-Gaussians
# filters. The outer standard deviation is twice the inner one. At the default
# resolution of 448, one source pixel of a 250 px tile image is about 1.8 preprocessed
# pixels.
_DOG_SIGMAS = (1.0, 2.0, 4.0)

# Side lengths, in patches, of the centred context windows of the intensity
# statistics, and of the one window of the derivative energies.
_CONTEXT_WINDOWS = (5, 9)
_GRADIENT_WINDOW = 5

# Distances to the image's left/right and top/bottom edges saturate at this many
# patches, so all deeper patches count as interior.
_MAX_EDGE_PATCHES = 3

# Added to both derivative energies (squared normalised intensity per pixel squared)
# before their ratio is taken, so flat patches get a finite orientation near 0. Normal
# magnetic tile patches have median energies of about 1e-3 along x and 3e-4 along y.
_MIN_GRADIENT_ENERGY = 1e-4

FEATURE_NAMES = (
    "mean",
    "std",
    "mean_5",
    "std_5",
    "mean_9",
    "std_9",
    "contrast_5",
    "local_min",
    "local_max",
    "gradient_x",
    "gradient_y",
    "gradient_x_5",
    "gradient_y_5",
    "orientation",
    "dog_dark_1",
    "dog_bright_1",
    "dog_dark_2",
    "dog_bright_2",
    "dog_dark_4",
    "dog_bright_4",
    "edge_x",
    "edge_y",
)

# Fixed multipliers that set each feature's weight in Euclidean distances. They are
# constants, not statistics fitted to a dataset, because the cache stores tokens per
# image. Every feature has weight 1. Intensity features are in units of the image's
# 10%-90% range, so brightness, contrast and the patch extremes dominate. The
# derivative and blob features, whose interquartile ranges on normal magnetic tile
# patches are 0.01 to 0.06, refine the match. Edge distances lie in [0, 1].
# Rescaling each feature to a unit interquartile range on 60 normal magnetic_tile
# training images was the alternative. A one-off experiment, not kept in benchmarks/,
# pasted synthetic dark spots, lines and texture patches into 40 held-out training
# images. Both weightings gave a patch AUROC of about 0.84 there, and unit weights the
# higher image AUROC (0.60 against 0.55).
# NOTE: the weights were chosen on one dataset of grey-level tiles with vertical
# streaks. Surfaces with other textures may need other weights.
_FEATURE_SCALES = {name: 1.0 for name in FEATURE_NAMES}

_PIXELS_PER_PATCH = PATCH_SIZE * PATCH_SIZE


class OfflineTextureBackbone(OfflineBackbone):
    """Hand-crafted texture descriptors on DINOv2's patch grid, with no weights.

    Preprocessing, grid and input checks are those of
    :class:`~dinodpmm.features.offline.OfflineBackbone`: the shorter edge is resized to
    ``resolution`` (bicubic), the image is centre-cropped to a multiple of 14 px and
    reduced to one intensity channel scaled by its own range, so 8-bit and 16-bit
    versions of one image embed alike.

    Parameters
    ----------
    resolution : int, default 448
        Length in pixels of the shorter image edge after resizing.
    device : str or torch.device, default "cpu"
        Device the descriptors are computed on. Tokens are returned on the CPU.

    Attributes
    ----------
    feature_names : tuple of str
        Name of each embedding dimension, in order.
    """

    name = "offline-texture"
    recommended_score = "euclidean"
    feature_names = FEATURE_NAMES

    @property
    def settings(self) -> dict[str, Any]:
        """Preprocessing and feature settings that change the embeddings."""
        return {**super().settings, "feature_version": FEATURE_VERSION}

    def _describe_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Compute the scaled texture descriptors of preprocessed images.

        Parameters
        ----------
        images : torch.Tensor of shape (num_images, height, width)
            Intensities in [0, 1], height and width multiples of the patch size.

        Returns
        -------
        torch.Tensor of shape (num_images, grid_h * grid_w, dim)
        """
        normalised = _normalise(images[:, None])  # N 1 H W
        blurred = _gaussian_blur(normalised, _PRE_BLUR_SIGMA)
        features = _intensity_statistics(normalised)
        features.update(_extremes(blurred))
        features.update(_gradients(blurred))
        features.update(_blob_responses(normalised))
        features.update(_edge_distances(normalised))
        columns = [features[name] * _FEATURE_SCALES[name] for name in FEATURE_NAMES]
        stacked = torch.cat(columns, dim=1)  # N D gh gw
        return stacked.flatten(2).transpose(1, 2).contiguous().float()  # N P D


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Centre each image on its median and divide by its 10%-90% intensity range.

    Parameters
    ----------
    pixels : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    torch.Tensor of shape (num_images, 1, height, width)
    """
    values = pixels.flatten(1).cpu().numpy()  # N HW
    # numpy's quantile selects instead of sorting, several times faster than torch's.
    low, median, high = np.quantile(values, _SCALE_QUANTILES, axis=1)  # N, N, N
    scale = np.maximum(high - low, _MIN_SCALE)
    centre = torch.as_tensor(median, dtype=pixels.dtype, device=pixels.device)
    spread = torch.as_tensor(scale, dtype=pixels.dtype, device=pixels.device)
    return (pixels - centre[:, None, None, None]) / spread[:, None, None, None]


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with a separable Gaussian, reflecting the maps at their borders.

    Parameters
    ----------
    maps : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    torch.Tensor of shape (num_images, 1, height, width)
    """
    radius = max(1, math.ceil(_GAUSSIAN_TRUNCATE * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    height, width = maps.shape[-2:]
    # Reflect padding needs a pad smaller than the side, so tiny maps use replicate.
    mode = "reflect" if radius < min(height, width) else "replicate"
    padded = F.pad(maps, (radius, radius, 0, 0), mode=mode)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    padded = F.pad(rows, (0, 0, radius, radius), mode=mode)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1))


def _intensity_statistics(normalised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the patch mean and standard deviation, their context means and the local contrast.

    Parameters
    ----------
    normalised : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
    """
    mean = _patch_pool(normalised)  # N 1 gh gw
    std = _standard_deviation(mean, _patch_pool(normalised.square()))
    features = {"mean": mean, "std": std}
    for window in _CONTEXT_WINDOWS:
        features[f"mean_{window}"] = _box_mean(mean, window)
        features[f"std_{window}"] = _box_mean(std, window)
    features["contrast_5"] = mean - features["mean_5"]
    return features


def _patch_pixels(maps: torch.Tensor) -> torch.Tensor:
    """Return the pixels of each patch, shape (num_images, pixels_per_patch, grid_h, grid_w)."""
    num_images, _, height, width = maps.shape
    pixels = F.unfold(maps, PATCH_SIZE, stride=PATCH_SIZE)  # N PP gh*gw
    return pixels.view(num_images, _PIXELS_PER_PATCH, height // PATCH_SIZE, width // PATCH_SIZE)


def _extremes(blurred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return each patch's minimum and maximum relative to its median.

    Parameters
    ----------
    blurred : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
    """
    pixels = _patch_pixels(blurred)  # N PP gh gw
    median = pixels.median(dim=1, keepdim=True).values  # N 1 gh gw
    return {
        "local_min": pixels.amin(dim=1, keepdim=True) - median,
        "local_max": pixels.amax(dim=1, keepdim=True) - median,
    }


def _gradients(blurred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the root mean square derivatives along x and y and their log ratio.

    Parameters
    ----------
    blurred : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
    """
    # Central differences, replicating the border so the maps keep their size.
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    derivative_x = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])  # N 1 H W
    derivative_y = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    energy_x = _patch_pool(derivative_x.square())  # N 1 gh gw
    energy_y = _patch_pool(derivative_y.square())
    features = {"gradient_x": energy_x.sqrt(), "gradient_y": energy_y.sqrt()}
    features[f"gradient_x_{_GRADIENT_WINDOW}"] = _box_mean(energy_x, _GRADIENT_WINDOW).sqrt()
    features[f"gradient_y_{_GRADIENT_WINDOW}"] = _box_mean(energy_y, _GRADIENT_WINDOW).sqrt()
    features["orientation"] = torch.log(
        (energy_x + _MIN_GRADIENT_ENERGY) / (energy_y + _MIN_GRADIENT_ENERGY)
    )
    return features


def _blob_responses(normalised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return each patch's most negative and most positive difference-of-Gaussians response.

    Parameters
    ----------
    normalised : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
        Dark responses are reported as positive numbers, so both features grow with
        the strength of the blob.
    """
    features = {}
    for sigma in _DOG_SIGMAS:
        response = _gaussian_blur(normalised, sigma) - _gaussian_blur(normalised, 2.0 * sigma)
        label = f"{sigma:g}"
        features[f"dog_dark_{label}"] = F.max_pool2d(-response, PATCH_SIZE).clamp(min=0.0)
        features[f"dog_bright_{label}"] = F.max_pool2d(response, PATCH_SIZE).clamp(min=0.0)
    return features


def _edge_distances(normalised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return each patch's distance to the nearest left/right and top/bottom image edge.

    Distances count whole patches, saturate at ``_MAX_EDGE_PATCHES`` and are scaled to
    [0, 1], so patches at an image edge are compared with other edge patches.

    Parameters
    ----------
    normalised : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
    """
    num_images, _, height, width = normalised.shape
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    options = {"dtype": normalised.dtype, "device": normalised.device}
    rows = torch.arange(grid_h, **options)
    cols = torch.arange(grid_w, **options)
    to_row_edge = torch.minimum(rows, grid_h - 1 - rows).clamp(max=_MAX_EDGE_PATCHES)  # gh
    to_col_edge = torch.minimum(cols, grid_w - 1 - cols).clamp(max=_MAX_EDGE_PATCHES)  # gw
    shape = (num_images, 1, grid_h, grid_w)
    return {
        "edge_x": (to_col_edge / _MAX_EDGE_PATCHES)[None, None, None, :].expand(shape),
        "edge_y": (to_row_edge / _MAX_EDGE_PATCHES)[None, None, :, None].expand(shape),
    }
