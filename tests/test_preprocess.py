"""Tests for image loading, intensity scaling, resizing, cropping and grid shapes."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dinodpmm.features.preprocess import (
    MAX_PATCHES,
    ImageReadError,
    grid_shape,
    load_image,
    preprocess,
    to_unit_array,
)

# dinodpmm.features exports the function preprocess, which hides the submodule of that name.
preprocess_module = importlib.import_module("dinodpmm.features.preprocess")

# Outputs computed by different routes that should agree up to float32 rounding of a few
# operations: the tolerance is a few units of float32 machine epsilon (1.2e-7) relative to
# values of order 1 to 3 after ImageNet normalisation.
FLOAT32_ATOL = 1e-5

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]


def _unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    return pixels * STD + MEAN


def _random_uint8(height: int, width: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _data_root() -> Path | None:
    candidates = [os.environ.get("DINODPMM_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


GRID_CASES = [
    ((256, 256), 448, (32, 32)),
    ((1024, 512), 448, (32, 64)),
    ((512, 1024), 448, (64, 32)),
    ((100, 37), 448, (32, 86)),
    ((37, 100), 448, (86, 32)),
    ((448, 448), 448, (32, 32)),
    ((500, 300), 448, (32, 53)),
    ((256, 256), 224, (16, 16)),
    ((256, 256), 450, (32, 32)),
]


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    GRID_CASES,
    ids=[f"{w}x{h}-at-{r}" for (w, h), r, _ in GRID_CASES],
)
def test_grid_shape_cases(size, resolution, expected):
    assert grid_shape(size, resolution, 14) == expected


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    GRID_CASES,
    ids=[f"{w}x{h}-at-{r}" for (w, h), r, _ in GRID_CASES],
)
def test_preprocess_matches_grid(size, resolution, expected):
    width, height = size
    pixels = preprocess(Image.fromarray(_random_uint8(height, width)), resolution, 14)
    assert pixels.shape == (3, expected[0] * 14, expected[1] * 14)
    assert pixels.dtype == torch.float32


def test_grid_shape_rejects_small_resolution():
    with pytest.raises(ValueError, match="resolution must be at least patch_size"):
        grid_shape((256, 256), resolution=10, patch_size=14)


def test_grid_shape_rejects_empty_image():
    with pytest.raises(ValueError, match="image_size must be"):
        grid_shape((0, 256))


EXTREME_CASES = [((30000, 3), 448, (32, 320000)), ((3, 30000), 448, (320000, 32)), ((9000, 20), 448, (32, 14400))]


@pytest.mark.parametrize(
    ("size", "resolution", "grid"), EXTREME_CASES, ids=["wide", "tall", "line-scan"]
)
def test_grid_shape_rejects_extreme_aspect(size, resolution, grid):
    width, height = size
    message = (
        rf"image of {width} x {height} pixels \(width x height\) would give a patch grid of "
        rf"{grid[0]} x {grid[1]} \({grid[0] * grid[1]:,} patches\) at resolution {resolution}, "
        rf"more than the limit of {MAX_PATCHES:,} patches; crop or tile the image into pieces of a "
        r"less extreme aspect ratio, or lower the resolution \(backbone\.resolution in a config\) "
        r"to at most \d+\.$"
    )
    with pytest.raises(ValueError, match=message):
        grid_shape(size, resolution)


@pytest.mark.parametrize("size", [(30000, 3), (9000, 20)], ids=["wide", "line-scan"])
def test_suggested_resolution_is_largest(size):
    with pytest.raises(ValueError) as caught:
        grid_shape(size, 448)
    suggested = int(str(caught.value).rsplit(" ", 1)[1].rstrip("."))
    grid_h, grid_w = grid_shape(size, suggested)
    assert grid_h * grid_w <= MAX_PATCHES
    with pytest.raises(ValueError, match="more than the limit"):
        grid_shape(size, suggested + 1)


def test_no_resolution_fits_suggests_crop():
    with pytest.raises(ValueError, match=r"1,000,000 patches.*aspect ratio\.$") as caught:
        grid_shape((1_000_000, 1), resolution=14)
    assert "lower the resolution" not in str(caught.value)


# At resolution 448 the shorter side has 32 patches, so 2048 patches along a 28672-pixel
# longer side reach MAX_PATCHES exactly, and 14 more pixels add a column of patches.
@pytest.mark.parametrize(
    ("width", "grid_w"), [(28672, 2048), (28685, 2048)], ids=["at-limit", "below-next-column"]
)
def test_grid_at_limit_accepted(width, grid_w):
    assert grid_shape((width, 448), 448) == (32, grid_w)


def test_grid_above_limit_rejected():
    with pytest.raises(ValueError, match=r"patch grid of 32 x 2049 \(65,568 patches\)"):
        grid_shape((28686, 448), 448)


def test_preprocess_rejects_grid_before_resize(monkeypatch):
    resized = []
    monkeypatch.setattr(preprocess_module, "_resize_shorter_edge", lambda *args: resized.append(args))
    with pytest.raises(ValueError, match="more than the limit of 65,536 patches"):
        preprocess(Image.new("L", (30000, 3)))
    assert resized == []


def test_preprocess_rejects_non_image():
    with pytest.raises(TypeError, match="image must be a PIL.Image.Image, got ndarray"):
        preprocess(_random_uint8(16, 16))


def test_preprocess_rejects_unknown_rule():
    with pytest.raises(ValueError, match="intensity must be one of"):
        preprocess(Image.fromarray(_random_uint8(16, 16)), intensity="percentile")


def test_sixteen_bit_matches_eight_bit():
    eight = _random_uint8(64, 80)
    sixteen = eight.astype(np.uint16) * 257  # 255 * 257 == 65535
    image16 = Image.fromarray(sixteen)
    assert image16.mode == "I;16"
    expected = preprocess(Image.fromarray(eight), resolution=112)
    torch.testing.assert_close(preprocess(image16, resolution=112), expected, rtol=0, atol=FLOAT32_ATOL)


def test_sixteen_bit_not_clipped():
    values = np.array([[0, 255, 32768, 65535]], dtype=np.uint16)
    scaled = to_unit_array(Image.fromarray(values))[0, :, 0]
    np.testing.assert_allclose(scaled, values[0] / 65535.0, rtol=1e-6)
    assert scaled.max() == 1.0


def test_big_endian_matches_little_endian():
    values = (_random_uint8(32, 48).astype(np.uint16) * 251).astype(np.uint16)
    big_endian = Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(to_unit_array(big_endian), to_unit_array(Image.fromarray(values)))


def test_mode_i_treated_as_sixteen_bit():
    values = (_random_uint8(32, 48).astype(np.int32) * 257)
    image = Image.fromarray(values)
    assert image.mode == "I"
    expected = to_unit_array(Image.fromarray(values.astype(np.uint16)))
    np.testing.assert_allclose(to_unit_array(image), expected, rtol=1e-6)


def test_mode_i_out_of_range_rejected():
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ValueError, match=r"values in \[0, 70000\].*intensity='minmax'"):
        to_unit_array(image)


def test_float_image_in_unit_range():
    eight = _random_uint8(32, 48)
    image = Image.fromarray(eight.astype(np.float32) / 255.0)
    assert image.mode == "F"
    expected = preprocess(Image.fromarray(eight), resolution=28)
    torch.testing.assert_close(preprocess(image, resolution=28), expected, rtol=0, atol=FLOAT32_ATOL)


def test_float_out_of_range_rejected():
    image = Image.fromarray(np.array([[-1000.0, 3000.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        to_unit_array(image)


def test_float_nan_rejected():
    image = Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_unit_array(image)


def test_minmax_invariant_to_affine():
    base = _random_uint8(32, 48).astype(np.float32)
    hounsfield = Image.fromarray(base * 7.5 - 1000.0)
    scaled = to_unit_array(hounsfield, intensity="minmax")
    expected = (base - base.min()) / (base.max() - base.min())
    np.testing.assert_allclose(scaled[:, :, 0], expected, atol=1e-6)


def test_minmax_range_is_unit():
    image = Image.fromarray(np.array([[-1000.0, 0.0, 3000.0]], dtype=np.float32))
    scaled = to_unit_array(image, intensity="minmax")
    assert scaled.min() == 0.0
    assert scaled.max() == 1.0


def test_minmax_constant_is_zero():
    image = Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16))
    assert not to_unit_array(image, intensity="minmax").any()


def test_grayscale_replicated_to_rgb():
    pixels = _unnormalize(preprocess(Image.fromarray(_random_uint8(40, 40)), resolution=28))
    torch.testing.assert_close(pixels[0], pixels[1], rtol=0, atol=FLOAT32_ATOL)
    torch.testing.assert_close(pixels[0], pixels[2], rtol=0, atol=FLOAT32_ATOL)


def test_grayscale_equals_gray_rgb():
    gray = _random_uint8(40, 40)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    torch.testing.assert_close(
        preprocess(Image.fromarray(gray), resolution=28),
        preprocess(Image.fromarray(rgb), resolution=28),
        rtol=0,
        atol=FLOAT32_ATOL,
    )


def test_rgba_alpha_dropped():
    rgb = _random_uint8(40, 40, 3)
    alpha = np.zeros((40, 40, 1), dtype=np.uint8)  # fully transparent: colours still count
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    assert rgba.mode == "RGBA"
    expected = preprocess(Image.fromarray(rgb), resolution=28)
    torch.testing.assert_close(preprocess(rgba, resolution=28), expected, rtol=0, atol=0)


def test_la_alpha_dropped():
    gray = _random_uint8(40, 40)
    la = Image.merge("LA", [Image.fromarray(gray), Image.new("L", (40, 40), 0)])
    expected = preprocess(Image.fromarray(gray), resolution=28)
    torch.testing.assert_close(preprocess(la, resolution=28), expected, rtol=0, atol=0)


def test_palette_transparency_dropped():
    rgb = Image.fromarray(_random_uint8(40, 40, 3))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    expected = preprocess(palette.convert("RGB"), resolution=28)
    torch.testing.assert_close(preprocess(palette, resolution=28), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["1", "CMYK", "YCbCr"], ids=["bilevel", "cmyk", "ycbcr"])
def test_other_modes_supported(mode):
    image = Image.fromarray(_random_uint8(40, 40, 3)).convert(mode)
    pixels = preprocess(image, resolution=28)
    assert pixels.shape == (3, 28, 28)
    assert torch.isfinite(pixels).all()


def test_uniform_image_normalised():
    value = 200
    pixels = preprocess(Image.new("L", (30, 30), value), resolution=28)
    expected = ((value / 255.0 - MEAN) / STD).expand(3, 28, 28)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=FLOAT32_ATOL)


def test_resize_output_in_unit_range():
    # A checkerboard makes bicubic overshoot; the clamp keeps values inside [0, 1].
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    pixels = _unnormalize(preprocess(Image.fromarray(board), resolution=56))
    assert pixels.min() >= -FLOAT32_ATOL
    assert pixels.max() <= 1 + FLOAT32_ATOL


def test_crop_is_centred():
    # 30 x 14 pixels at resolution 14 needs no resize; the width crops from 30 to 28,
    # dropping column 0 and column 29.
    columns = np.tile(np.arange(30, dtype=np.float32) / 29.0, (14, 1))
    pixels = _unnormalize(preprocess(Image.fromarray(columns), resolution=14, patch_size=14))
    torch.testing.assert_close(pixels[0, 0], torch.from_numpy(columns[0, 1:29]), rtol=0, atol=FLOAT32_ATOL)


def test_load_image_sixteen_bit_png(tmp_path):
    values = (_random_uint8(20, 30).astype(np.uint16) * 257)
    path = tmp_path / "slice.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(image), values)


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ImageReadError, match="missing.png"):
        load_image(path)


def test_load_image_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        load_image(path)


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("L", (30, 10)).save(path)
    # Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS: 300 > 2 * 100.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"large\.png': Image size \(300 pixels\) exceeds") as caught:
        load_image(path)
    message = str(caught.value)
    assert "DOS attack. Crop or tile the image" in message
    assert ".." not in message


def test_real_slice_preprocess():
    root = _data_root()
    if root is None or not (root / "lgg_flair" / "train" / "good").is_dir():
        pytest.skip("lgg_flair data not found under ../shared/data or $DINODPMM_DATA")
    path = sorted((root / "lgg_flair" / "train" / "good").glob("*.png"))[0]
    image = load_image(path)
    pixels = preprocess(image)
    grid_h, grid_w = grid_shape(image.size)
    assert pixels.shape == (3, grid_h * 14, grid_w * 14)
    assert torch.isfinite(pixels).all()
