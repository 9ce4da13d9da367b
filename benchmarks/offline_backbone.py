"""Measure how well the offline backbone's features separate tumours on lgg_flair.

Protocol: embed a seeded subsample of ``train/good`` and the whole evaluation split
(``test`` by default, ``valid`` with ``--split valid``): ``<split>/good/img`` and
``<split>/Ungood/img``, with masks from ``<split>/Ungood/label``. Fit two models of
the normal patches:

- memory bank: all training patches (subsampled to ``--bank-size``), score = Euclidean
  distance to the nearest bank patch;
- mixture: k-means means (``--components``), score = Euclidean distance to the
  nearest mean, which is how a mixture-model pipeline scores with Euclidean
  embeddings.

Patch scores form an anomaly map, upsampled bilinearly to the mask size. The image
score is the mean of the top 1% of patch scores (the maximum below 100 patches).
The script prints image AUROC (good = 0, Ungood = 1), pixel AUROC over the pixels of
the evaluation images and the embedding time per image.

Run from the repository root::

    .venv/bin/python benchmarks/offline_backbone.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score

from dinodpmm.features.offline import OfflineBackbone

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """Return ``$DINODPMM_DATA`` if set, else ``../shared/data`` next to the repository."""
    return Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_root(),
                        help="folder that contains lgg_flair/ (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=300,
                        help="normal training images to embed, drawn with --seed")
    parser.add_argument("--bank-size", type=int, default=100_000,
                        help="training patches kept in the memory bank and fed to k-means")
    parser.add_argument("--components", type=int, default=100,
                        help="k-means clusters standing in for mixture components")
    parser.add_argument("--pixel-subsample", type=int, default=0,
                        help="test pixels drawn for pixel AUROC; 0 uses every pixel")
    parser.add_argument("--resolution", type=int, default=448,
                        help="shorter image edge after resizing, in pixels")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="evaluation split of lgg_flair (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random draw")
    return parser.parse_args(argv)


def list_split(root: Path, split: str, train_images: int, seed: int) -> dict[str, list[Path]]:
    """Return the training subsample and the evaluation images with their masks."""
    train = sorted((root / "train" / "good").glob("*.png"))
    if not train:
        raise FileNotFoundError(f"no training images found under {root / 'train' / 'good'}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train), size=min(train_images, len(train)), replace=False)
    abnormal = sorted((root / split / "Ungood" / "img").glob("*.png"))
    return {
        "train": [train[i] for i in sorted(chosen)],
        "normal": sorted((root / split / "good" / "img").glob("*.png")),
        "abnormal": abnormal,
        "masks": [path.parent.parent / "label" / path.name for path in abnormal],
    }


def embed_paths(backbone: OfflineBackbone, paths: list[Path], batch_size: int = 32):
    """Embed images in batches; return tokens (num_images, num_patches, dim), grid, seconds."""
    chunks = []
    grid = None
    start = time.perf_counter()
    for offset in range(0, len(paths), batch_size):
        images = [Image.open(path) for path in paths[offset : offset + batch_size]]
        tokens, grid = backbone.embed(images)
        chunks.append(tokens)
    return torch.cat(chunks), grid, time.perf_counter() - start


def nearest_distance(queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Return each query's Euclidean distance to its nearest reference.

    Parameters
    ----------
    queries : torch.Tensor of shape (num_points, dim)
    references : torch.Tensor of shape (num_references, dim)

    Returns
    -------
    torch.Tensor of shape (num_points,)
    """
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        distances = torch.cdist(queries[start : start + chunk], references)  # C R
        out[start : start + chunk] = distances.min(dim=1).values
    return out


def image_scores(patch_scores: torch.Tensor) -> np.ndarray:
    """Return the mean of the top 1% patch scores per image, the maximum below 100 patches."""
    num_patches = patch_scores.shape[1]
    top = max(1, math.floor(0.01 * num_patches)) if num_patches >= 100 else 1
    return patch_scores.topk(top, dim=1).values.mean(dim=1).numpy()


def pixel_auroc(patch_scores: torch.Tensor, grid, labels: np.ndarray, subsample: int, seed: int) -> float:
    """Return the AUROC of bilinearly upsampled anomaly maps against pixel labels (num_images, H, W)."""
    maps = patch_scores.view(-1, 1, *grid)
    upsampled = F.interpolate(maps, size=labels.shape[1:], mode="bilinear", align_corners=False)
    values = upsampled[:, 0].numpy().ravel()
    targets = labels.ravel()
    if subsample:
        rng = np.random.default_rng(seed)
        keep = rng.choice(values.size, size=min(subsample, values.size), replace=False)
        values, targets = values[keep], targets[keep]
    return float(roc_auc_score(targets, values))


def load_labels(files: dict[str, list[Path]], size: tuple[int, int]) -> np.ndarray:
    """Return pixel labels for the evaluation images, normal first: (num_images, H, W) uint8."""
    normal = np.zeros((len(files["normal"]), *size), dtype=np.uint8)
    abnormal = np.stack([np.asarray(Image.open(path).convert("L")) > 127 for path in files["masks"]])
    return np.concatenate([normal, abnormal.astype(np.uint8)])


def evaluate(name: str, scores: torch.Tensor, grid, image_labels, pixel_labels, args) -> dict:
    return {
        "model": name,
        "image_auroc": float(roc_auc_score(image_labels, image_scores(scores))),
        "pixel_auroc": pixel_auroc(scores, grid, pixel_labels, args.pixel_subsample, args.seed),
    }


def main(args: argparse.Namespace) -> list[dict]:
    """Run the protocol in the module docstring; print and return one row per model."""
    torch.manual_seed(args.seed)
    files = list_split(args.data / "lgg_flair", args.split, args.train_images, args.seed)
    backbone = OfflineBackbone(resolution=args.resolution)

    train, grid, train_seconds = embed_paths(backbone, files["train"])
    test_paths = files["normal"] + files["abnormal"]
    test, test_grid, test_seconds = embed_paths(backbone, test_paths)
    assert test_grid == grid, "lgg_flair images all share one size"

    generator = torch.Generator().manual_seed(args.seed)
    bank = train.reshape(-1, train.shape[-1])
    if bank.shape[0] > args.bank_size:
        bank = bank[torch.randperm(bank.shape[0], generator=generator)[: args.bank_size]]
    queries = test.reshape(-1, test.shape[-1])

    fit_start = time.perf_counter()
    kmeans = KMeans(n_clusters=args.components, n_init=1, random_state=args.seed).fit(bank.numpy())
    means = torch.from_numpy(kmeans.cluster_centers_).float()
    fit_seconds = time.perf_counter() - fit_start

    image_labels = np.r_[np.zeros(len(files["normal"])), np.ones(len(files["abnormal"]))]
    pixel_labels = load_labels(files, Image.open(test_paths[0]).size[::-1])
    rows = []
    for name, references in (("memory bank", bank), (f"k-means {args.components}", means)):
        scores = nearest_distance(queries, references).view(test.shape[0], -1)
        rows.append(evaluate(name, scores, grid, image_labels, pixel_labels, args))

    per_image_ms = 1000.0 * (train_seconds + test_seconds) / (len(files["train"]) + len(test_paths))
    print(f"backbone {backbone.name} dim {backbone.dim} grid {grid} digest {backbone.weights_digest[:12]}")
    print(f"embedding: {per_image_ms:.1f} ms per image ({len(test_paths)} {args.split} images in {test_seconds:.1f} s), "
          f"k-means fit {fit_seconds:.1f} s, bank {bank.shape[0]} patches")
    subsample = f"{args.pixel_subsample} sampled" if args.pixel_subsample else "all"
    print(f"{'model':<16} {'image AUROC':>12} {'pixel AUROC':>12}   (pixels: {subsample})")
    for row in rows:
        print(f"{row['model']:<16} {row['image_auroc']:>12.4f} {row['pixel_auroc']:>12.4f}")
    return rows


if __name__ == "__main__":
    main(parse_args())
