"""Image loading and DINOv2 preprocessing: intensity scaling, resizing, cropping, normalisation.

The pipeline for one image, in order:

1. Drop the alpha channel (``RGBA``, ``LA``, ``PA``, and ``P`` with a transparent palette
   entry). Transparent pixels keep their colour values; nothing is composited.
2. Scale intensities to ``[0, 1]`` in float32 by one of two rules (``intensity=``):

   ``"dtype"`` (default)
       Divide by the maximum of the storage type: 255 for 8-bit modes (``L``, ``RGB``,
       ``P``, ...) and 65535 for 16-bit modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``).
       Mode ``I`` (32-bit integer, which some readers return for 16-bit PNG and TIFF
       files) is treated as 16-bit and must lie in ``[0, 65535]``. Mode ``F`` (32-bit
       float) must already lie in ``[0, 1]``. Out-of-range ``I`` or ``F`` images raise
       ValueError, so that no value is clipped without notice.
   ``"minmax"``
       Map each image's minimum to 0 and its maximum to 1 (over all channels). A constant
       image maps to all zeros. Use it for float images in physical units (for example CT
       in Hounsfield units) or integer images whose range is unknown.

3. Replicate a single channel to three.
4. Resize so that the shorter edge equals ``resolution`` (bicubic, antialiased, in float),
   computing the longer edge as ``int(resolution * long / short)`` as torchvision's
   ``Resize`` does, then clamp to ``[0, 1]`` to remove bicubic overshoot. Before the
   resize, an image whose patch grid would exceed :data:`MAX_PATCHES` raises ValueError,
   because the longer edge grows with the aspect ratio.
5. Centre-crop each side to the largest multiple of ``patch_size`` (the crop removes the
   same number of pixels from both ends, one more from the bottom or right when the
   excess is odd). A 256x256 slice becomes 448x448 and a 32x32 patch grid.
6. Normalise with the ImageNet mean and standard deviation that DINOv2 was trained with.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IntensityRule = Literal["dtype", "minmax"]
INTENSITY_RULES: tuple[str, ...] = ("dtype", "minmax")
CROP_RULE = "center"
RESIZE_RULE = "shorter-edge bicubic antialias, long edge truncated"

DEFAULT_RESOLUTION = 448
DEFAULT_PATCH_SIZE = 14

# Largest patch grid an image may produce: 65,536 patches, a 256 x 256 grid. At the
# default resolution of 448 the shorter side has 32 patches, so the limit admits aspect
# ratios up to 64:1, and square images up to resolution 3584. At the limit the
# preprocessed float32 RGB image has 65,536 * 14 * 14 pixels (12.8 million, 154 MB).
# Without a limit, a 30000 x 3 pixel image resizes to 4,480,000 x 448 pixels and a
# grid of 10,240,000 patches, which exhausts memory.
MAX_PATCHES = 65_536

_EIGHT_BIT_MAX = 255.0
_SIXTEEN_BIT_MAX = 65535.0
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_RGB_CONVERTIBLE_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L"}


class ImageReadError(OSError):
    """An image file that does not exist or that Pillow cannot decode."""


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and decode an image file, keeping its mode (``L``, ``I;16``, ``RGB``, ...).

    Decoding happens here, so a truncated or corrupt file fails at this call rather than
    later inside a batch.

    Raises
    ------
    ImageReadError
        If the file is missing or cannot be decoded; the message names the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"cannot read image file '{os.fspath(path)}': {_sentence(err)}. Crop or tile the "
            "image, or, if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS."
        ) from err
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow raises SyntaxError for some malformed headers and ValueError for some
        # truncated payloads, besides OSError.
        raise ImageReadError(
            f"cannot read image file '{os.fspath(path)}': {_sentence(err)}. Check that the "
            "file exists and is an image Pillow can open (PNG, JPEG, TIFF, ...)."
        ) from err
    return image


def _sentence(err: Exception) -> str:
    """Return an exception's message without a final period, to embed it in a sentence."""
    return str(err).rstrip(".")


def grid_shape(
    image_size: tuple[int, int],
    resolution: int = DEFAULT_RESOLUTION,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> tuple[int, int]:
    """Return the patch grid ``(grid_h, grid_w)`` of an image after :func:`preprocess`.

    Parameters
    ----------
    image_size : tuple of int
        ``(width, height)`` in pixels, as ``PIL.Image.Image.size`` gives it.
    resolution : int
        Length of the shorter edge after resizing, in pixels.
    patch_size : int
        Side of one patch in pixels.

    Raises
    ------
    ValueError
        If a size is invalid, or the grid would have more than :data:`MAX_PATCHES`
        patches (an extreme aspect ratio or resolution).
    """
    _check_geometry(resolution, patch_size)
    grid = _unchecked_grid_shape(image_size, resolution, patch_size)
    if grid[0] * grid[1] > MAX_PATCHES:
        raise ValueError(_too_many_patches_message(image_size, grid, resolution, patch_size))
    return grid


def _unchecked_grid_shape(
    image_size: tuple[int, int], resolution: int, patch_size: int
) -> tuple[int, int]:
    resized_h, resized_w = resized_shape(image_size, resolution)
    return resized_h // patch_size, resized_w // patch_size


def _too_many_patches_message(
    image_size: tuple[int, int], grid: tuple[int, int], resolution: int, patch_size: int
) -> str:
    width, height = image_size
    problem = (
        f"image of {width} x {height} pixels (width x height) would give a patch grid of "
        f"{grid[0]} x {grid[1]} ({grid[0] * grid[1]:,} patches) at resolution {resolution}, "
        f"more than the limit of {MAX_PATCHES:,} patches"
    )
    largest = _largest_resolution_within_limit(image_size, resolution, patch_size)
    if largest is None:
        return f"{problem}; crop or tile the image into pieces of a less extreme aspect ratio."
    return (
        f"{problem}; crop or tile the image into pieces of a less extreme aspect ratio, or "
        f"lower the resolution (backbone.resolution in a config) to at most {largest}."
    )


def _largest_resolution_within_limit(
    image_size: tuple[int, int], resolution: int, patch_size: int
) -> int | None:
    """Return the largest resolution below ``resolution`` whose grid fits, or None if none does.

    The number of patches never decreases as the resolution grows, so bisection finds it.
    """
    low, high = patch_size, resolution - 1
    largest = None
    while low <= high:
        middle = (low + high) // 2
        grid_h, grid_w = _unchecked_grid_shape(image_size, middle, patch_size)
        if grid_h * grid_w <= MAX_PATCHES:
            largest, low = middle, middle + 1
        else:
            high = middle - 1
    return largest


def resized_shape(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Return ``(height, width)`` after resizing the shorter edge to ``resolution``.

    The longer edge is ``int(resolution * long / short)``, the truncation that
    ``torchvision.transforms.Resize(resolution)`` uses.
    """
    width, height = _check_image_size(image_size)
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def preprocess(
    image: Image.Image,
    resolution: int = DEFAULT_RESOLUTION,
    patch_size: int = DEFAULT_PATCH_SIZE,
    intensity: IntensityRule = "dtype",
) -> torch.Tensor:
    """Turn one PIL image into a normalised DINOv2 input tensor.

    The steps and both intensity rules are described in the module docstring.

    Parameters
    ----------
    image : PIL.Image.Image
        Image of any common mode: ``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``,
        ``CMYK``, ``YCbCr``, ``I;16`` (and its byte-order variants), ``I`` or ``F``.
    resolution : int
        Length of the shorter edge after resizing, in pixels; at least ``patch_size``.
    patch_size : int
        Side of one patch in pixels; both output sides are multiples of it.
    intensity : {"dtype", "minmax"}
        Rule that scales stored values to ``[0, 1]``.

    Returns
    -------
    torch.Tensor of shape (3, grid_h * patch_size, grid_w * patch_size)
        Float32 pixels normalised with the ImageNet mean and standard deviation.

    Raises
    ------
    TypeError
        If ``image`` is not a PIL image.
    ValueError
        If the mode is unsupported, the sizes are invalid, the patch grid would have more
        than :data:`MAX_PATCHES` patches, or an ``I`` or ``F`` image is out of range for
        ``intensity="dtype"``.
    """
    _check_geometry(resolution, patch_size)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a PIL.Image.Image, got {type(image).__name__}; open files with "
            "dinodpmm.features.preprocess.load_image."
        )
    grid_shape(image.size, resolution, patch_size)  # rejects grids above MAX_PATCHES
    pixels = torch.from_numpy(to_unit_array(image, intensity)).permute(2, 0, 1)  # C H W
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    resized = _resize_shorter_edge(pixels, resolution)
    cropped = _center_crop_to_multiple(resized, patch_size)
    return _normalize_imagenet(cropped)


def to_unit_array(image: Image.Image, intensity: IntensityRule = "dtype") -> np.ndarray:
    """Drop alpha and scale an image's values to ``[0, 1]`` by the given rule.

    Returns
    -------
    numpy.ndarray of shape (height, width, channels)
        Float32 values in ``[0, 1]``; ``channels`` is 1 for grayscale and 3 for colour.
    """
    if intensity not in INTENSITY_RULES:
        raise ValueError(
            f"intensity must be one of {INTENSITY_RULES}, got {intensity!r}; use 'dtype' to "
            "divide by the storage maximum or 'minmax' for per-image min-max scaling."
        )
    image = _drop_alpha(_to_supported_mode(image))
    values = np.asarray(image)
    if values.ndim == 2:
        values = values[:, :, None]
    values = values.astype(np.float32)
    if intensity == "minmax":
        return _scale_min_max(values)
    return _scale_by_dtype(values, image.mode)


def _to_supported_mode(image: Image.Image) -> Image.Image:
    """Convert modes without a direct array rule (``1``, ``P``, ``CMYK``, ...) to L or RGB(A)."""
    mode = image.mode
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        # Converting straight to RGB makes Pillow warn about transparency given as bytes.
        has_alpha = "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode == "PA":
        return image.convert("RGBA")
    if mode in _RGB_CONVERTIBLE_MODES:
        return image.convert("RGB")
    supported = ("L", "RGB", "I", "F", *_SIXTEEN_BIT_MODES, *_ALPHA_MODES)
    if mode not in supported:
        raise ValueError(
            f"image mode {mode!r} is not supported; supported modes are {supported} and "
            f"{('1', 'P', 'PA', *_RGB_CONVERTIBLE_MODES)}. Convert the image first, for "
            "example with image.convert('RGB')."
        )
    return image


def _drop_alpha(image: Image.Image) -> Image.Image:
    if image.mode not in _ALPHA_MODES:
        return image
    colour_bands = image.split()[:-1]
    return Image.merge(_ALPHA_MODES[image.mode], colour_bands)


def _scale_by_dtype(values: np.ndarray, mode: str) -> np.ndarray:
    """Divide by the storage maximum; see the module docstring for modes ``I`` and ``F``."""
    if mode in _SIXTEEN_BIT_MODES:
        return values / _SIXTEEN_BIT_MAX
    if mode == "I":
        _check_range(values, mode, 0.0, _SIXTEEN_BIT_MAX, "16-bit data")
        return values / _SIXTEEN_BIT_MAX
    if mode == "F":
        _check_range(values, mode, 0.0, 1.0, "float data already scaled to [0, 1]")
        return values
    return values / _EIGHT_BIT_MAX


def _check_range(values: np.ndarray, mode: str, low: float, high: float, meaning: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(
            f"image of mode {mode!r} contains NaN or infinite values; replace them before "
            "embedding."
        )
    minimum, maximum = float(values.min()), float(values.max())
    if minimum < low or maximum > high:
        raise ValueError(
            f"image of mode {mode!r} has values in [{minimum:g}, {maximum:g}], outside "
            f"[{low:g}, {high:g}], so intensity='dtype' cannot treat it as {meaning}; "
            "pass intensity='minmax' to scale each image by its own range."
        )


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ValueError(
            "image contains NaN or infinite values, so intensity='minmax' has no finite "
            "range; replace them before embedding."
        )
    minimum, maximum = values.min(), values.max()
    if maximum == minimum:
        return np.zeros_like(values)
    return (values - minimum) / (maximum - minimum)


def _resize_shorter_edge(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize ``(3, height, width)`` pixels so that the shorter edge is ``resolution``."""
    height, width = pixels.shape[-2:]
    target = resized_shape((width, height), resolution)
    if target == (height, width):
        return pixels
    resized = F.interpolate(
        pixels[None], size=target, mode="bicubic", antialias=True, align_corners=False
    )[0]
    # Bicubic kernels overshoot at edges; 8-bit resizers (PIL) clip there too.
    return resized.clamp_(0.0, 1.0)


def _center_crop_to_multiple(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    crop_h = height // patch_size * patch_size
    crop_w = width // patch_size * patch_size
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    return pixels[:, top : top + crop_h, left : left + crop_w]


def _normalize_imagenet(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=pixels.dtype)[:, None, None]
    return ((pixels - mean) / std).contiguous()


def _check_geometry(resolution: int, patch_size: int) -> None:
    for parameter, value in (("resolution", resolution), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{parameter} must be a positive integer, got {value!r}.")
    if resolution < patch_size:
        raise ValueError(
            f"resolution must be at least patch_size ({patch_size}) so that the grid has a "
            f"patch, got resolution={resolution}; use a larger resolution such as "
            f"{DEFAULT_RESOLUTION}."
        )


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(
            f"image_size must be (width, height) with both sides at least 1 pixel, got "
            f"{tuple(image_size)}; skip empty images."
        )
    return int(width), int(height)
