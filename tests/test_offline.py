"""Tests of the weight-free offline backbone."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from dinodpmm.features import load_backbone
from dinodpmm.features.base import Backbone
from dinodpmm.features.offline import FEATURE_NAMES, OfflineBackbone

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))
LGG = DATA_ROOT / "lgg_flair"
TILES = DATA_ROOT / "magnetic_tile"


@pytest.fixture(scope="module")
def backbone() -> OfflineBackbone:
    return OfflineBackbone()


def textured_image(seed: int, size: int = 256) -> np.ndarray:
    """Return a head-like test image in [0, 1]: a textured ellipse on a dark background.

    Returns
    -------
    numpy.ndarray of shape (size, size)
        float64.
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    ellipse = ((ys - 0.5) / 0.42) ** 2 + ((xs - 0.5) / 0.34) ** 2 <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=3.0)
    texture = 0.45 + 0.08 * texture / texture.std()
    return np.where(ellipse, texture, 0.02)


# Image.fromarray picks the mode from the dtype: uint8 gives "L", uint16 "I;16",
# int32 "I" and float32 "F".
def to_8bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(values * 255).astype(np.uint8))


def to_16bit(values: np.ndarray, maximum: int) -> Image.Image:
    return Image.fromarray(np.round(values * maximum).astype(np.uint16))


# Interface and preprocessing


def test_backbone_interface(backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.name == "offline"
    assert backbone.patch_size == 14
    assert backbone.dim == len(FEATURE_NAMES)
    assert backbone.recommended_score == "euclidean"
    assert backbone.device == torch.device("cpu")


def test_settings_json_serialisable(backbone):
    settings = json.loads(json.dumps(backbone.settings))
    assert settings["resolution"] == 448
    assert settings["patch_size"] == 14
    assert backbone.describe()["weights_digest"] == backbone.weights_digest


def test_digest_tracks_settings(backbone):
    assert len(backbone.weights_digest) == 64
    assert backbone.weights_digest == OfflineBackbone().weights_digest
    assert backbone.weights_digest != OfflineBackbone(resolution=224).weights_digest


@pytest.mark.parametrize(
    ("size", "resolution", "grid"),
    [
        ((256, 256), 448, (32, 32)),
        ((256, 256), 224, (16, 16)),
        # (width, height) = (248, 373): 248 -> 448, 373 -> int(448 * 373 / 248) = 673,
        # cropped to 672 = 48 * 14.
        ((248, 373), 448, (48, 32)),
        ((373, 248), 448, (32, 48)),
        # 449 -> 448, 500 -> int(448 * 500 / 449) = 498, cropped to 490 = 35 * 14.
        ((500, 449), 448, (32, 35)),
        # 100 -> 450 cropped to 448, 600 -> 2700 cropped to 2688 = 192 * 14.
        ((100, 600), 450, (192, 32)),
        # Grids smaller than the widest context window (9 patches).
        ((28, 60), 28, (4, 2)),
        ((5, 3), 14, (1, 1)),
    ],
    ids=["square", "square-224", "portrait", "landscape", "near-square", "narrow", "tiny", "single-patch"],
)
def test_grid_shape_dinov2_rule(size, resolution, grid):
    backbone = OfflineBackbone(resolution=resolution)
    assert backbone.grid_shape(size) == grid
    tokens, embedded_grid = backbone.embed([Image.new("L", size, 128)])
    assert embedded_grid == grid
    assert tokens.shape == (1, grid[0] * grid[1], backbone.dim)


def test_embed_deterministic(backbone):
    image = to_8bit(textured_image(seed=0))
    first, _ = backbone.embed([image])
    second, _ = OfflineBackbone().embed([image, image])
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[0], second[1])


def test_embed_batch_matches_single(backbone):
    images = [to_8bit(textured_image(seed)) for seed in range(3)]
    batch, _ = backbone.embed(images)
    for index, image in enumerate(images):
        single, _ = backbone.embed([image])
        torch.testing.assert_close(batch[index], single[0], rtol=0.0, atol=1e-6)


def rgb_image(values: np.ndarray) -> Image.Image:
    channels = np.stack([values, 0.8 * values, 0.6 * values], axis=-1)
    return Image.fromarray(np.round(channels * 255).astype(np.uint8))


def rgba_image(values: np.ndarray) -> Image.Image:
    rgb = np.asarray(rgb_image(values))
    alpha = np.full(values.shape + (1,), 255, dtype=np.uint8)
    alpha[:, :32] = 0
    return Image.fromarray(np.concatenate([rgb, alpha], axis=-1))


@pytest.mark.parametrize(
    "make_image",
    [
        to_8bit,
        rgb_image,
        rgba_image,
        lambda values: to_16bit(values, 65535),
        lambda values: Image.fromarray((values * 4095).astype(np.int32)),
        lambda values: Image.fromarray(values.astype(np.float32)),
        lambda values: to_8bit(values).convert("P"),
    ],
    ids=["L", "RGB", "RGBA", "I;16", "I", "F", "P"],
)
def test_embed_modes_dtype_finite(backbone, make_image, request):
    image = make_image(textured_image(seed=1))
    assert image.mode == request.node.callspec.id
    tokens, grid = backbone.embed([image])
    assert tokens.dtype == torch.float32
    assert tokens.shape == (1, grid[0] * grid[1], backbone.dim)
    assert torch.isfinite(tokens).all()
    assert tokens.device == torch.device("cpu")


@pytest.mark.parametrize("image", [Image.new("L", (64, 64), 0), Image.new("I;16", (64, 64), 7)],
                         ids=["black", "flat-16bit"])
def test_embed_constant_image_finite(backbone, image):
    tokens, _ = backbone.embed([image])
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("maximum", [65535, 4095], ids=["full-range", "12-bit"])
def test_16bit_matches_8bit_exactly(backbone, maximum):
    # Integer multiples of an 8-bit image scale to the same [0, 1] intensities, so
    # only float32 rounding separates the tokens. A 12-bit image clipped at 255
    # would be almost entirely saturated and embed very differently.
    values = np.asarray(to_8bit(textured_image(seed=2)), dtype=np.uint16)
    wide = Image.fromarray(values * (maximum // 255))
    narrow_tokens, _ = backbone.embed([Image.fromarray(values.astype(np.uint8))])
    wide_tokens, _ = backbone.embed([wide])
    torch.testing.assert_close(wide_tokens, narrow_tokens, rtol=0.0, atol=1e-5)


def test_16bit_close_to_8bit_rounding(backbone):
    values = textured_image(seed=3)
    tokens_16, _ = backbone.embed([to_16bit(values, 65535)])
    tokens_8, _ = backbone.embed([to_8bit(values)])
    # Rounding to 8 bits moves each [0, 1] intensity by at most 0.5 / 255. Intensity
    # features are in units of the foreground's 10%-90% range, and each mixes up to
    # four such errors (pixel, median, scale and the mirrored pixel), each scaled by
    # at most the largest feature weight, 2.
    foreground = values[values > 0.1]
    scale = np.quantile(foreground, 0.9) - np.quantile(foreground, 0.1)
    bound = 4 * 2.0 * (0.5 / 255) / scale
    intensity_columns = [i for i, name in enumerate(FEATURE_NAMES) if name not in {"foreground", "depth"}]
    difference = (tokens_16 - tokens_8)[0, :, intensity_columns].abs()
    assert difference.max().item() <= bound


def blob_patch_mask(centre: tuple[int, int], radius: int, grid: tuple[int, int]) -> np.ndarray:
    """Return the patches whose 14 px cell lies entirely inside a disc, in a 256 px image.

    Returns
    -------
    numpy.ndarray of shape (grid_h * grid_w,)
        bool.
    """
    cell = 256 / grid[0]
    rows, cols = np.mgrid[0 : grid[0], 0 : grid[1]]
    corners = [(rows + dy) * cell for dy in (0, 1)], [(cols + dx) * cell for dx in (0, 1)]
    inside = np.ones(grid, dtype=bool)
    for y in corners[0]:
        for x in corners[1]:
            inside &= (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2
    return inside.ravel()


def test_blob_patches_far_from_clean(backbone):
    reference, _ = backbone.embed([to_8bit(textured_image(seed=10))])
    clean_values = textured_image(seed=11)
    centre, radius = (100, 150), 30
    ys, xs = np.mgrid[0:256, 0:256]
    blob = (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2
    blob_values = np.where(blob, 0.9, clean_values)
    tokens, grid = backbone.embed([to_8bit(clean_values), to_8bit(blob_values)])

    # Normal variation: distances from a clean image's patches to the nearest patch
    # of another clean image with a different texture.
    clean_distance = torch.cdist(tokens[0], reference[0]).min(dim=1).values
    blob_distance = torch.cdist(tokens[1], reference[0]).min(dim=1).values
    inside = torch.from_numpy(blob_patch_mask(centre, radius, grid))
    assert inside.sum() >= 4
    assert blob_distance[inside].min() > clean_distance.max()


# Input validation


@pytest.mark.parametrize(("resolution", "error"), [(448.0, TypeError), (True, TypeError), (13, ValueError)],
                         ids=["float", "bool", "below-patch"])
def test_resolution_invalid(resolution, error):
    with pytest.raises(error, match="resolution must be"):
        OfflineBackbone(resolution=resolution)


def test_embed_rejects_empty(backbone):
    with pytest.raises(ValueError, match="at least one image"):
        backbone.embed([])


def test_embed_rejects_non_image(backbone):
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL.Image.Image, got ndarray"):
        backbone.embed([Image.new("L", (32, 32)), np.zeros((32, 32))])


def test_embed_rejects_mixed_grids(backbone):
    with pytest.raises(ValueError, match="share one patch grid"):
        backbone.embed([Image.new("L", (256, 256)), Image.new("L", (256, 400))])


# Real data


@pytest.mark.skipif(not TILES.is_dir(), reason=f"magnetic_tile not found under {DATA_ROOT}; set DINODPMM_DATA")
def test_magnetic_tile_finite(backbone):
    paths = sorted((TILES / "test").glob("*/*.png"))[::40][:6]
    for path in paths:
        image = Image.open(path)
        tokens, grid = backbone.embed([image])
        assert grid == backbone.grid_shape(image.size)
        assert torch.isfinite(tokens).all()
        # Every feature column varies somewhere except on a featureless image.
        assert (tokens[0].std(dim=0) > 0).sum() >= backbone.dim // 2


def lgg_tumour_images(count: int) -> list[Path]:
    """Return the ``count`` test tumour images with the largest masks."""
    paths = sorted((LGG / "test" / "Ungood" / "img").glob("*.png"))
    areas = [np.count_nonzero(np.asarray(Image.open(p.parent.parent / "label" / p.name))) for p in paths]
    order = np.argsort(areas, kind="stable")[::-1][:count]
    return [paths[i] for i in sorted(order)]


@pytest.mark.skipif(not LGG.is_dir(), reason=f"lgg_flair not found under {DATA_ROOT}; set DINODPMM_DATA")
def test_lgg_tumour_patches_score_higher(backbone):
    train = sorted((LGG / "train" / "good").glob("*.png"))[::36][:40]
    tumours = lgg_tumour_images(count=20)
    bank, _ = backbone.embed([Image.open(path) for path in train])
    tokens, grid = backbone.embed([Image.open(path) for path in tumours])
    references = bank.reshape(-1, backbone.dim)
    queries = tokens.reshape(-1, backbone.dim)
    scores = torch.cat([torch.cdist(chunk, references).min(dim=1).values for chunk in queries.split(1024)])

    masks = [np.asarray(Image.open(p.parent.parent / "label" / p.name)) > 127 for p in tumours]
    cell = 256 // grid[0]
    tumour_fraction = np.concatenate([m.reshape(grid[0], cell, grid[1], cell).mean(axis=(1, 3)).ravel() for m in masks])
    tumour = tumour_fraction >= 0.5
    normal = tumour_fraction == 0.0
    auroc = roc_auc_score(tumour[tumour | normal], scores.numpy()[tumour | normal])

    # Under the null hypothesis the AUROC (the Mann-Whitney statistic over n0 * n1)
    # has variance (n0 + n1 + 1) / (12 n0 n1). Patches of one image are correlated,
    # so the test counts one independent sample per image and class, n0 = n1 = 20,
    # which gives a standard deviation of 0.092. The bound is the null mean plus three
    # of those deviations, 0.78.
    count = len(tumours)
    null_std = math.sqrt((2 * count + 1) / (12 * count**2))
    assert auroc > 0.5 + 3 * null_std, f"patch AUROC {auroc:.3f}"


@pytest.mark.parametrize("name", ["offline", "offline-texture"], ids=["offline", "texture"])
@pytest.mark.parametrize("size", [(30000, 3), (3, 30000)], ids=["wide", "tall"])
def test_embed_rejects_extreme_aspect(name, size):
    backbone = load_backbone(name)
    message = r"would give a patch grid of \d+ x \d+ \(10,240,000 patches\) at resolution 448, more than"
    with pytest.raises(ValueError, match=message):
        backbone.grid_shape(size)
    with pytest.raises(ValueError, match=message):
        backbone.embed([Image.new("L", size)])
