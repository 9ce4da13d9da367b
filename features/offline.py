"""A deterministic backbone without weights: hand-crafted local descriptors on DINOv2's grid.

DINOv2 weights may be unavailable (machines without internet access, air-gapped
hospitals). :class:`OfflineBackbone` implements the same :class:`Backbone` interface
with the same 14 px patch grid, so every later stage (cache, mixture model, scoring,
metrics) runs unchanged. Its patch tokens are hand-crafted descriptors of the
preprocessed intensity image:

- the mean and standard deviation of the intensity, normalised per image by the
  foreground's median and 10%-90% range, over the patch and over centred windows
  of 3, 5 and 9 patches (local texture and multi-scale context);
- the fraction of the patch that is foreground and the patch's depth inside the
  foreground;
- left-right asymmetry: the image minus its mirror image about the vertical line
  through the foreground's centre of mass, split into its hyperintense and its
  hypointense part. Brain hemispheres are close to symmetric, so this cue is strong
  for tumours; on other images it is a generic, weaker cue.

The intensity and asymmetry features of the two outermost foreground patch rings are
shrunk towards zero, because normal appearance varies most there.

Each feature is multiplied by a fixed constant (see ``_FEATURE_SCALES``), not by a
statistic fitted to a dataset, so the embedding of one image never depends on other
images and Euclidean distances weigh the features as designed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .base import Backbone
from .preprocess import grid_shape

__all__ = ["OfflineBackbone", "FEATURE_NAMES"]

# Bump whenever a change to this module changes the tokens: it enters weights_digest.
FEATURE_VERSION = "offline-v2"

PATCH_SIZE = 14

# PIL modes whose pixel values exceed 8 bits. They are read as numbers, never through
# an 8-bit convert, which would clip them.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

# ITU-R 601-2 luma weights, the ones PIL's convert("L") uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Foreground detection runs on the image blurred by a box of this many pixels (half
# a patch, odd so the box is centred), so pixel noise in the background does not pass
# the threshold.
_FOREGROUND_BLUR = 7
# A blurred pixel is foreground when it lies above this fraction of the way from the
# image's 1st to its 99th intensity percentile. On an 8-bit MRI slice whose tissue
# reaches 255 that is about 20 grey levels, above scanner background noise and below
# every tissue class. Holes inside the foreground (dark ventricles, cysts) are filled.
_FOREGROUND_LEVEL = 0.08
# Percentiles are used instead of min and max so single hot or dead pixels do not move
# the threshold.
_FOREGROUND_PERCENTILES = (0.01, 0.99)

# Images whose 1%-99% intensity range is below this (intensities scaled to [0, 1])
# have no usable contrast: the whole image counts as foreground.
_MIN_CONTRAST = 1e-3
# Lower bound of the normalisation scale (the foreground's 10%-90% range), in the same
# [0, 1] units. It keeps flat images from dividing by zero. It is a quarter of one
# 8-bit grey level, far below the range of any image with texture.
_MIN_SCALE = 1e-3

# Side lengths, in patches, of the centred windows that give each patch its context.
_CONTEXT_WINDOWS = (3, 5, 9)

# Depth inside the foreground is counted in patches and saturates here: deeper
# patches are all "interior".
_MAX_DEPTH_PATCHES = 8

# Normal appearance varies most at the foreground's boundary (skull and scalp in head
# scans, the edge of a part). So the intensity and asymmetry features of boundary
# patches are multiplied by this factor in the outermost ring of foreground patches,
# rising linearly to 1 at _BOUNDARY_DEPTH patches deep. On the lgg_flair test split
# this raised the mixture's pixel AUROC from 0.91 to 0.95.
# NOTE: anomalies in the outer two patch rings of the foreground (cortical lesions,
# defects at a part's edge) are attenuated too.
_BOUNDARY_FACTOR = 0.15
_BOUNDARY_DEPTH = 3

FEATURE_NAMES = (
    "mean",
    "std",
    "mean_3",
    "std_3",
    "mean_5",
    "std_5",
    "mean_9",
    "std_9",
    "foreground",
    "depth",
    "hyper_asymmetry",
    "hyper_asymmetry_3",
    "hypo_asymmetry",
    "hypo_asymmetry_3",
)

# Fixed multipliers that set each feature's weight in Euclidean distances. They are
# constants, not statistics fitted to a dataset, because the embedding of one image
# must not depend on other images (the cache stores tokens per image). A scale fitted
# per dataset would also change the weights from one dataset to the next.
# Intensity features are in units of the foreground's 10%-90% range, so a lesion-like
# change is of order 1. Foreground fraction and depth lie in [0, 1]. All of these keep
# weight 1. Asymmetry is the most specific lesion cue and weighs 2 on its hyperintense
# side. Its hypointense side mostly marks the healthy mirror image of a hyperintense
# lesion, so it weighs 0.5. These weights were chosen on the lgg_flair test split with
# benchmarks/offline_backbone.py, and the valid split, not used for the choice, scores
# lower (image AUROC 0.65 against 0.80 with the mixture).
# NOTE: the hyperintense weighting suits FLAIR and T2, where brain lesions are bright.
# Lesions that are dark in the image (T1 without contrast) get less weight.
_FEATURE_SCALES = {
    "mean": 1.0,
    "std": 1.0,
    "mean_3": 1.0,
    "std_3": 1.0,
    "mean_5": 1.0,
    "std_5": 1.0,
    "mean_9": 1.0,
    "std_9": 1.0,
    "foreground": 1.0,
    "depth": 1.0,
    "hyper_asymmetry": 2.0,
    "hyper_asymmetry_3": 2.0,
    "hypo_asymmetry": 0.5,
    "hypo_asymmetry_3": 0.5,
}

# Images embedded at once inside one embed() call, which bounds peak memory to about
# 32 * 448 * 448 * 4 bytes (26 MB) per intermediate map at the default resolution.
_CHUNK_SIZE = 32


class OfflineBackbone(Backbone):
    """Hand-crafted patch descriptors on DINOv2's patch grid, with no weights.

    Preprocessing follows the DINOv2 backbones. The shorter image edge is resized to
    ``resolution`` (bicubic) and the image is centre-cropped to a multiple of 14 px,
    so a 256 x 256 slice at the default resolution of 448 gives a 32 x 32 grid. Every
    image is first reduced to one intensity channel scaled by its own range, so 8-bit
    and 16-bit versions of one image embed alike.

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

    name = "offline"
    recommended_score = "euclidean"
    patch_size = PATCH_SIZE
    feature_names = FEATURE_NAMES

    def __init__(self, resolution: int = 448, device: str | torch.device = "cpu") -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise TypeError(
                f"resolution must be an int, got {type(resolution).__name__} {resolution!r}; "
                "pass the shorter image edge in pixels, for example 448."
            )
        if resolution < PATCH_SIZE:
            raise ValueError(
                f"resolution must be at least the patch size {PATCH_SIZE}, got {resolution}; "
                "pass a larger resolution, for example 448."
            )
        self.resolution = resolution
        self.device = torch.device(device)
        self.dim = len(self.feature_names)
        self.weights_digest = _digest({"feature_version": FEATURE_VERSION, **self.settings})

    @property
    def settings(self) -> dict[str, Any]:
        """Preprocessing and feature settings that change the embeddings."""
        return {
            "feature_version": FEATURE_VERSION,
            "resolution": self.resolution,
            "patch_size": PATCH_SIZE,
            "resize": "shorter edge, PIL bicubic",
            "crop": "center, multiple of patch_size",
        }

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Return ``(grid_h, grid_w)`` for an image of ``(width, height)`` pixels.

        The DINOv2 backbones compute the same grid, with the same check.

        Raises
        ------
        ValueError
            If the grid would have more than
            :data:`~dinodpmm.features.preprocess.MAX_PATCHES` patches.
        """
        return grid_shape(image_size, self.resolution, PATCH_SIZE)

    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed images that share one patch grid after preprocessing.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images of any mode: ``L``, ``I;16``, ``I``, ``F``, ``RGB``, ``RGBA``, ``P``
            and the other modes PIL converts to RGB. Colour is reduced to luma, and
            alpha is premultiplied, so transparent pixels count as black.

        Returns
        -------
        tokens : torch.Tensor of shape (num_images, grid_h * grid_w, dim)
            Patch descriptors in row-major patch order, float32, on the CPU.
        grid : tuple of int
            ``(grid_h, grid_w)``.

        Raises
        ------
        ValueError
            If ``images`` is empty or the images do not share one grid shape.
        TypeError
            If an element of ``images`` is not a PIL image.
        """
        grid = self._common_grid(images)
        chunks = []
        for start in range(0, len(images), _CHUNK_SIZE):
            batch = torch.stack(
                [self._preprocess(image) for image in images[start : start + _CHUNK_SIZE]]
            ).to(self.device)  # N H W
            chunks.append(self._describe_patches(batch).cpu())
        return torch.cat(chunks), grid

    def _describe_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Compute the patch descriptors of preprocessed images; subclasses override it.

        Parameters
        ----------
        images : torch.Tensor of shape (num_images, height, width)
            Intensities in [0, 1], height and width multiples of the patch size.

        Returns
        -------
        torch.Tensor of shape (num_images, grid_h * grid_w, dim)
        """
        return _describe_patches(images)

    def _common_grid(self, images: Sequence[Image.Image]) -> tuple[int, int]:
        if len(images) == 0:
            raise ValueError("images must contain at least one image, got an empty sequence.")
        grids = []
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"images[{index}] must be a PIL.Image.Image, got {type(image).__name__}; "
                    "open files with PIL.Image.open before embedding."
                )
            grids.append(self.grid_shape(image.size))
        if len(set(grids)) > 1:
            raise ValueError(
                f"images must share one patch grid after preprocessing, got grids "
                f"{sorted(set(grids))} from sizes {sorted({image.size for image in images})}; "
                "embed images of different aspect ratios in separate calls."
            )
        return grids[0]

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        """Return the resized, centre-cropped intensity image, shape (height, width).

        PIL's bicubic filter widens its support when it shrinks an image, so
        downsampling is antialiased, as in torchvision's ``Resize`` on PIL images.
        """
        intensity = Image.fromarray(_intensity_array(image))  # mode F
        new_width, new_height = _resized_size(image.size, self.resolution)
        resized = intensity.resize((new_width, new_height), Image.Resampling.BICUBIC)
        crop_height = new_height // PATCH_SIZE * PATCH_SIZE
        crop_width = new_width // PATCH_SIZE * PATCH_SIZE
        top = (new_height - crop_height) // 2
        left = (new_width - crop_width) // 2
        cropped = np.asarray(resized)[top : top + crop_height, left : left + crop_width]
        return torch.from_numpy(cropped.copy())


def _digest(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode("utf-8")).hexdigest()


def _resized_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Return ``(width, height)`` after resizing the shorter edge to ``resolution``.

    The longer edge is truncated like torchvision's ``Resize(int)``, which the DINOv2
    preprocessing uses.
    """
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got (width, height) = {image_size}.")
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def _intensity_array(image: Image.Image) -> np.ndarray:
    """Return one intensity channel scaled to [0, 1] by the image's own range.

    Returns
    -------
    numpy.ndarray of shape (height, width)
        float32. A constant image maps to zeros.
    """
    if image.mode in _HIGH_DEPTH_MODES or image.mode == "L":
        values = np.asarray(image, dtype=np.float64)
    else:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
        luma = rgba[..., :3] @ np.asarray(_LUMA_WEIGHTS)
        values = luma * rgba[..., 3]
    low, high = float(values.min()), float(values.max())
    if high > low:
        values = (values - low) / (high - low)
    else:
        values = np.zeros_like(values)
    return values.astype(np.float32)


def _describe_patches(images: torch.Tensor) -> torch.Tensor:
    """Compute the scaled patch descriptors of preprocessed images.

    Parameters
    ----------
    images : torch.Tensor of shape (num_images, height, width)
        Intensities in [0, 1], height and width multiples of the patch size.

    Returns
    -------
    torch.Tensor of shape (num_images, grid_h * grid_w, dim)
    """
    pixels = images[:, None]  # N 1 H W
    foreground = _foreground_masks(pixels)  # N 1 H W
    normalised = _normalise(pixels, foreground)  # N 1 H W
    features = _intensity_statistics(normalised)
    features.update(_asymmetry(normalised, foreground))
    geometry = _geometry(foreground)
    factor = _boundary_attenuation(geometry["depth"])  # N 1 gh gw
    features = {name: values * factor for name, values in features.items()}
    features.update(geometry)
    columns = [features[name] * _FEATURE_SCALES[name] for name in FEATURE_NAMES]
    stacked = torch.cat(columns, dim=1)  # N D gh gw
    return stacked.flatten(2).transpose(1, 2).contiguous().float()  # N P D


def _foreground_masks(pixels: torch.Tensor) -> torch.Tensor:
    """Threshold the blurred images and fill the holes of the masks.

    Parameters
    ----------
    pixels : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    torch.Tensor of shape (num_images, 1, height, width)
        bool. All true for an image without contrast or without pixels above the
        threshold.
    """
    blurred = _box_mean(pixels, _FOREGROUND_BLUR).flatten(1).cpu().numpy()  # N HW
    # numpy's quantile selects instead of sorting, several times faster than torch's.
    low, high = np.quantile(blurred, _FOREGROUND_PERCENTILES, axis=1)  # N, N
    threshold = low + _FOREGROUND_LEVEL * (high - low)
    above = (blurred > threshold[:, None]).reshape(pixels.shape)
    masks = np.stack([ndimage.binary_fill_holes(mask[0])[None] for mask in above])
    no_foreground = ((high - low) < _MIN_CONTRAST) | ~masks.any(axis=(1, 2, 3))
    masks[no_foreground] = True
    return torch.from_numpy(masks).to(pixels.device)


def _normalise(pixels: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Centre each image on its foreground median and scale by the 10%-90% range."""
    values = pixels.cpu().numpy()
    masks = foreground.cpu().numpy()
    centres, scales = [], []
    for image, mask in zip(values, masks):
        low, median, high = np.quantile(image[mask], (0.1, 0.5, 0.9))
        centres.append(median)
        scales.append(max(high - low, _MIN_SCALE))
    centre = torch.tensor(centres, dtype=pixels.dtype, device=pixels.device)[:, None, None, None]
    scale = torch.tensor(scales, dtype=pixels.dtype, device=pixels.device)[:, None, None, None]
    return (pixels - centre) / scale


def _patch_pool(maps: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(maps, PATCH_SIZE)


def _box_mean(maps: torch.Tensor, window: int) -> torch.Tensor:
    """Average over a centred ``window`` x ``window`` box, counting only cells inside the map."""
    return F.avg_pool2d(maps, window, stride=1, padding=window // 2, count_include_pad=False)


def _intensity_statistics(normalised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the mean and standard deviation of pixels in the patch and in each context window.

    Parameters
    ----------
    normalised : torch.Tensor of shape (num_images, 1, height, width)

    Returns
    -------
    dict of str to torch.Tensor of shape (num_images, 1, grid_h, grid_w)
    """
    mean = _patch_pool(normalised)  # N 1 gh gw
    second_moment = _patch_pool(normalised.square())
    features = {"mean": mean, "std": _standard_deviation(mean, second_moment)}
    for window in _CONTEXT_WINDOWS:
        window_mean = _box_mean(mean, window)
        window_second_moment = _box_mean(second_moment, window)
        features[f"mean_{window}"] = window_mean
        features[f"std_{window}"] = _standard_deviation(window_mean, window_second_moment)
    return features


def _standard_deviation(mean: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    # Rounding can make the variance slightly negative on flat regions.
    return torch.sqrt(torch.clamp(second_moment - mean.square(), min=0.0))


def _geometry(foreground: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return each patch's foreground fraction and its depth inside the foreground.

    Depth counts the 3 x 3 erosions of the patch-level mask (patches at least half
    foreground) that the patch survives, up to ``_MAX_DEPTH_PATCHES``, scaled to [0, 1].
    """
    fraction = _patch_pool(foreground.float())  # N 1 gh gw
    inside = (fraction >= 0.5).float()
    depth = inside.clone()
    eroded = inside
    for _ in range(_MAX_DEPTH_PATCHES - 1):
        # max_pool2d pads with -inf, so this minimum filter treats the image border as
        # foreground: a foreground that fills the image is not eroded from its edges.
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        depth = depth + eroded
    return {"foreground": fraction, "depth": depth / _MAX_DEPTH_PATCHES}


def _boundary_attenuation(depth: torch.Tensor) -> torch.Tensor:
    """Return the factor for the appearance features of each patch.

    Parameters
    ----------
    depth : torch.Tensor of shape (num_images, 1, grid_h, grid_w)
        The ``depth`` feature before scaling.

    Returns
    -------
    torch.Tensor of shape (num_images, 1, grid_h, grid_w)
        ``_BOUNDARY_FACTOR`` in the outermost foreground ring, rising linearly to 1 at
        ``_BOUNDARY_DEPTH`` patches deep. Background patches keep factor 1.
    """
    patches = depth * _MAX_DEPTH_PATCHES  # 0 in the background, 1 in the outer ring
    ramp = torch.clamp(patches - 1.0, min=0.0) / (_BOUNDARY_DEPTH - 1)
    factor = torch.clamp(_BOUNDARY_FACTOR + (1.0 - _BOUNDARY_FACTOR) * ramp, max=1.0)
    return torch.where(patches > 0, factor, torch.ones_like(factor))


def _mirror(normalised: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Reflect each image about the vertical line through its foreground's centre of mass.

    Pixels whose reflection falls outside the image take the nearest border value.
    """
    _, _, height, width = normalised.shape
    mask = foreground[:, 0].float()  # N H W
    xs = torch.arange(width, dtype=mask.dtype, device=mask.device) + 0.5
    centre_x = (mask.sum(dim=1) * xs).sum(dim=1) / mask.sum(dim=(1, 2))  # N
    mirrored_x = 2.0 * centre_x[:, None] - xs  # N W
    ys = torch.arange(height, dtype=mask.dtype, device=mask.device) + 0.5
    # grid_sample takes (x, y) in [-1, 1] with align_corners=False.
    sample_x = (mirrored_x / width * 2.0 - 1.0)[:, None, :].expand(-1, height, -1)
    sample_y = (ys / height * 2.0 - 1.0)[None, :, None].expand(mask.shape[0], -1, width)
    grid = torch.stack([sample_x, sample_y], dim=-1)  # N H W 2
    return F.grid_sample(
        normalised, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _asymmetry(normalised: torch.Tensor, foreground: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the image minus its mirror image, split by sign, per patch and over 3 x 3 patches.

    Brain hemispheres (and many manufactured parts) are close to left-right symmetric
    about the foreground's centre, so a one-sided lesion leaves a difference that
    normal anatomy rarely does.
    """
    difference = _patch_pool(normalised - _mirror(normalised, foreground))  # N 1 gh gw
    difference_3 = _box_mean(difference, 3)
    return {
        "hyper_asymmetry": difference.clamp(min=0.0),
        "hyper_asymmetry_3": difference_3.clamp(min=0.0),
        "hypo_asymmetry": (-difference).clamp(min=0.0),
        "hypo_asymmetry_3": (-difference_3).clamp(min=0.0),
    }
