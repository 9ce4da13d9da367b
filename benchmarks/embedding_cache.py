"""Time embedding extraction and the cache: images per second, first run against cached run.

Prints a markdown table with one row per backbone: the first extraction into an empty
cache (backbone forward passes plus writes), the second extraction of the same images
(served from the cache) and their ratio. Both runs happen in this process, one after the
other, so the ratio is robust to a noisy machine.

Example::

    python benchmarks/embedding_cache.py --data ../shared/data/lgg_flair --num-images 16
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from dinodpmm.features import EmbeddingCache, embed_split, load_backbone, open_dataset


def time_extraction(backbone, samples, cache_root: Path) -> tuple[float, float]:
    """Return the seconds of a cold and of a cached extraction of ``samples``."""
    cache = EmbeddingCache(cache_root)
    started = time.perf_counter()
    embed_split(backbone, samples, cache, progress=False)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    embed_split(backbone, samples, EmbeddingCache(cache_root), progress=False)
    return cold, time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    samples = list(open_dataset(args.data).test)[: args.num_images]
    print(f"{len(samples)} images from {args.data}, resolution {args.resolution}\n")
    print("| backbone | first run (images/s) | cached run (images/s) | speed-up |")
    print("|---|---|---|---|")
    for name in args.backbones:
        weights = "random" if name.startswith("dinov2") else None
        backbone = load_backbone(name, weights=weights, resolution=args.resolution, progress=False)
        with tempfile.TemporaryDirectory() as root:
            cold, warm = time_extraction(backbone, samples, Path(root))
        label = f"{name} (random weights)" if weights == "random" else name
        print(f"| {label} | {len(samples) / cold:.2f} | {len(samples) / warm:.1f} | {cold / warm:.0f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lgg_flair"), help="dataset root")
    parser.add_argument("--num-images", type=int, default=16, help="test images to embed")
    parser.add_argument("--resolution", type=int, default=448, help="shorter image edge in pixels")
    parser.add_argument("--backbones", nargs="+", default=["offline", "dinov2_vits14"], help="registry names")
    logging.basicConfig(level=logging.ERROR)
    main(parser.parse_args())
