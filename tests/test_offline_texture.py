"""Tests of the weight-free texture backbone."""

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

from dinodpmm.features.backbones import available_backbones, load_backbone
from dinodpmm.features.base import Backbone
from dinodpmm.features.offline import OfflineBackbone
from dinodpmm.features.offline_texture import FEATURE_NAMES, OfflineTextureBackbone

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))
TILES = DATA_ROOT / "magnetic_tile"

# Images of SIZE px embedded at resolution SIZE are not resized, so a pixel of the
# test image is a pixel of the preprocessed image and patch (row, col) covers rows
# 14 * row to 14 * row + 13.
SIZE = 224
GRID = SIZE // 14


@pytest.fixture(scope="module")
def backbone() -> OfflineTextureBackbone:
    return OfflineTextureBackbone(resolution=SIZE)


def streak_texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Return a surface with vertical streaks in [0, 1], like a brushed or ground part.

    Returns
    -------
    numpy.ndarray of shape (size, size)
        float64.
    """
    rng = np.random.default_rng(seed)
    streaks = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=(12.0, 0.8))
    grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=1.0)
    texture = 0.5 + 0.06 * streaks / streaks.std() + 0.02 * grain / grain.std()
    return np.clip(texture, 0.0, 1.0)


def to_8bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(values * 255).astype(np.uint8))


# Interface and preprocessing


def test_backbone_interface(backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.name == "offline-texture"
    assert backbone.patch_size == 14
    assert backbone.dim == len(FEATURE_NAMES)
    assert backbone.recommended_score == "euclidean"


def test_describe_names_backbone(backbone):
    description = json.loads(json.dumps(backbone.describe()))
    assert description["name"] == "offline-texture"
    assert description["feature_version"].startswith("offline-texture")
    assert description["dim"] == len(FEATURE_NAMES)
    assert description["weights_digest"] == backbone.weights_digest


def test_digest_differs_from_offline():
    texture = OfflineTextureBackbone()
    assert texture.weights_digest != OfflineBackbone().weights_digest
    assert texture.weights_digest == OfflineTextureBackbone().weights_digest
    assert texture.weights_digest != OfflineTextureBackbone(resolution=224).weights_digest


@pytest.mark.parametrize(
    ("size", "resolution", "grid"),
    [
        ((256, 256), 448, (32, 32)),
        # (width, height) = (248, 373): 248 -> 448, 373 -> int(448 * 373 / 248) = 673,
        # cropped to 672 = 48 * 14.
        ((248, 373), 448, (48, 32)),
        ((373, 248), 448, (32, 48)),
        # Grids smaller than the widest context window (9 patches) and than the
        # widest Gaussian kernel (radius 24 px).
        ((28, 60), 28, (4, 2)),
        ((5, 3), 14, (1, 1)),
    ],
    ids=["square", "portrait", "landscape", "tiny", "single-patch"],
)
def test_grid_shape_and_tokens(size, resolution, grid):
    backbone = OfflineTextureBackbone(resolution=resolution)
    image = to_8bit(streak_texture(seed=0, size=max(size))).crop((0, 0, *size))
    tokens, embedded_grid = backbone.embed([image])
    assert backbone.grid_shape(size) == grid
    assert embedded_grid == grid
    assert tokens.shape == (1, grid[0] * grid[1], backbone.dim)
    assert tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (64, 64), 0), Image.new("I;16", (64, 64), 7)],
    ids=["black", "flat-16bit"],
)
def test_constant_image_finite(backbone, image):
    tokens, _ = backbone.embed([image])
    assert torch.isfinite(tokens).all()


def test_embed_deterministic(backbone):
    image = to_8bit(streak_texture(seed=1))
    first, _ = backbone.embed([image])
    second, _ = OfflineTextureBackbone(resolution=SIZE).embed([image, image])
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[0], second[1])


def test_batch_matches_single(backbone):
    images = [to_8bit(streak_texture(seed)) for seed in range(3)]
    batch, _ = backbone.embed(images)
    for index, image in enumerate(images):
        single, _ = backbone.embed([image])
        torch.testing.assert_close(batch[index], single[0], rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("maximum", [65535, 4095], ids=["full-range", "12-bit"])
def test_16bit_matches_8bit(backbone, maximum):
    # Integer multiples of an 8-bit image scale to the same [0, 1] intensities, so
    # only float32 rounding separates the tokens.
    values = np.asarray(to_8bit(streak_texture(seed=2)), dtype=np.uint16)
    wide = Image.fromarray(values * (maximum // 255))
    assert wide.mode == "I;16"
    narrow_tokens, _ = backbone.embed([Image.fromarray(values.astype(np.uint8))])
    wide_tokens, _ = backbone.embed([wide])
    torch.testing.assert_close(wide_tokens, narrow_tokens, rtol=0.0, atol=1e-4)


# Local defects


def token_change(backbone: OfflineTextureBackbone, clean: np.ndarray, defect: np.ndarray) -> np.ndarray:
    """Return the Euclidean distance between the tokens of two images, patch by patch.

    Returns
    -------
    numpy.ndarray of shape (grid_h, grid_w)
    """
    tokens, grid = backbone.embed([to_8bit(clean), to_8bit(defect)])
    return (tokens[1] - tokens[0]).norm(dim=1).reshape(grid).numpy()


def dark_spot(values: np.ndarray, centre: tuple[int, int], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0 : values.shape[0], 0 : values.shape[1]]
    inside = (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2
    return np.where(inside, 0.15, values)


@pytest.mark.parametrize(
    ("row", "col"),
    [(5, 7), (10, 3), (0, 8)],
    ids=["interior", "near-edge", "top-edge"],
)
def test_dark_spot_changes_its_patch(backbone, row, col):
    clean = streak_texture(seed=3)
    centre = (14 * row + 7, 14 * col + 7)
    change = token_change(backbone, clean, dark_spot(clean, centre, radius=4.0))
    covered = np.zeros((GRID, GRID), dtype=bool)
    covered[row, col] = True
    assert change[covered].min() > change[~covered].max()


def test_dark_line_changes_its_patches(backbone):
    clean = streak_texture(seed=4)
    line = clean.copy()
    # A horizontal scratch 2 px wide across patch columns 3 to 11 of patch row 8,
    # across the vertical streaks.
    line[14 * 8 + 6 : 14 * 8 + 8, 14 * 3 : 14 * 12] = 0.2
    change = token_change(backbone, clean, line)
    covered = np.zeros((GRID, GRID), dtype=bool)
    covered[8, 3:12] = True
    assert change[covered].min() > change[~covered].max()


# Registry


def test_registry_lists_texture():
    assert "offline-texture" in available_backbones()


def test_load_backbone_texture():
    backbone = load_backbone("offline-texture", resolution=SIZE)
    assert isinstance(backbone, OfflineTextureBackbone)
    assert backbone.name == "offline-texture"
    assert backbone.grid_shape((SIZE, SIZE)) == (GRID, GRID)


def test_load_backbone_rejects_weights(tmp_path):
    with pytest.raises(ValueError, match="weights must be None for the offline backbone 'offline-texture'"):
        load_backbone("offline-texture", weights=tmp_path / "x.pth")


# Real data


def tile_paths(folder: str, count: int) -> list[Path]:
    paths = sorted((TILES / folder).glob("*.png"))
    return paths[:: max(1, len(paths) // count)][:count]


@pytest.mark.skipif(not TILES.is_dir(), reason=f"magnetic_tile not found under {DATA_ROOT}; set DINODPMM_DATA")
def test_blowhole_patches_score_higher():
    backbone = OfflineTextureBackbone()
    train = tile_paths("train/good", 30)
    defects = tile_paths("test/blowhole", 15)
    bank = torch.cat([backbone.embed([Image.open(path)])[0][0] for path in train])
    scores, labels = [], []
    for path in defects:
        image = Image.open(path)
        tokens, grid = backbone.embed([image])
        patch_scores = torch.cat([torch.cdist(chunk, bank).min(dim=1).values for chunk in tokens[0].split(1024)])
        mask = TILES / "ground_truth" / "blowhole" / f"{path.stem}_mask.png"
        scores.append(patch_scores.numpy())
        labels.append(patch_defect_fraction(backbone, Image.open(mask), grid))
    fraction = np.concatenate(labels)
    defect, normal = fraction >= 0.5, fraction == 0.0
    auroc = roc_auc_score(defect[defect | normal], np.concatenate(scores)[defect | normal])

    # Under the null hypothesis the AUROC has variance (n0 + n1 + 1) / (12 n0 n1).
    # Patches of one image are correlated, so the bound counts one independent sample
    # per image and class, n0 = n1 = 15: a standard deviation of 0.107 and a bound of
    # the null mean plus three of those deviations, 0.82.
    count = len(defects)
    null_std = math.sqrt((2 * count + 1) / (12 * count**2))
    assert defect.sum() >= count
    assert auroc > 0.5 + 3 * null_std, f"patch AUROC {auroc:.3f}"


def patch_defect_fraction(backbone: OfflineTextureBackbone, mask: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """Return the defect fraction of each patch after the backbone's resize and crop.

    Returns
    -------
    numpy.ndarray of shape (grid_h * grid_w,)
    """
    # The shorter edge becomes the resolution and the longer one is truncated, the
    # rule of torchvision's Resize(int) that the backbone follows.
    width, height = mask.size
    resolution = backbone.resolution
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    resized = mask.convert("L").resize(size, Image.Resampling.BILINEAR)
    values = np.asarray(resized, dtype=np.float64) / 255.0
    top = (values.shape[0] - 14 * grid[0]) // 2
    left = (values.shape[1] - 14 * grid[1]) // 2
    cropped = values[top : top + 14 * grid[0], left : left + 14 * grid[1]]
    return cropped.reshape(grid[0], 14, grid[1], 14).mean(axis=(1, 3)).ravel()
