"""Peak memory and time of the exact pixel metrics at the size of a BMAD test set.

Feeds :class:`dinodpmm.experiments.PixelMetrics` synthetic 512 x 512 anomaly maps
(normal pixels N(0, 1), anomalous pixels N(1, 1), one square defect in every other
image) until the requested number of pixels is reached, then computes every pixel
metric. Each size runs in a fresh process so that its peak resident set size is its
own. Prints one row per size: pixels, bytes the accumulator stores, peak RSS above the
interpreter's baseline, their ratio, and the seconds spent in ``update`` and ``compute``.

Run by hand, for example::

    OMP_NUM_THREADS=1 python benchmarks/pixel_metrics_memory.py --pixels 2e7 2e8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

SIDE = 512
DEFECT_SIDE = 64
# Bytes per stored pixel: a float32 score and a bool mask.
STORED_BYTES_PER_PIXEL = 5


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kibibytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(num_pixels: int, seed: int = 0) -> dict:
    """Fill a PixelMetrics with ``num_pixels`` pixels, compute the metrics, return sizes and timings."""
    from dinodpmm.experiments import PixelMetrics

    baseline = _peak_rss_bytes()
    rng = np.random.default_rng(seed)
    pixels = PixelMetrics()
    num_images = max(1, num_pixels // (SIDE * SIDE))
    started = time.perf_counter()
    for i in range(num_images):
        mask = np.zeros((SIDE, SIDE), dtype=bool)
        if i % 2:
            row, col = rng.integers(0, SIDE - DEFECT_SIDE, size=2)
            mask[row:row + DEFECT_SIDE, col:col + DEFECT_SIDE] = True
        heat = rng.standard_normal((SIDE, SIDE), dtype=np.float32) + mask
        pixels.update(heat, mask)
    update_s = time.perf_counter() - started
    started = time.perf_counter()
    metrics = pixels.compute()
    compute_s = time.perf_counter() - started
    peak = _peak_rss_bytes() - baseline
    stored = pixels.num_pixels * STORED_BYTES_PER_PIXEL
    return {"pixels": pixels.num_pixels, "stored_gb": stored / 1e9, "peak_gb": peak / 1e9, "ratio": peak / stored,
            "update_s": update_s, "compute_s": compute_s, "pixel_auroc": metrics["pixel_auroc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", nargs="+", type=float, default=[2e7, 2e8], help="pixel counts to measure")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(int(args.child))))
        return
    print(f"{'pixels':>12} {'stored GB':>10} {'peak GB':>9} {'peak/stored':>12} {'update s':>9} {'compute s':>10}"
          f" {'pixel AUROC':>12}")
    for size in args.pixels:
        output = subprocess.run([sys.executable, __file__, "--child", str(size)], check=True,
                                capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{row['pixels']:>12,} {row['stored_gb']:>10.2f} {row['peak_gb']:>9.2f} {row['ratio']:>12.2f}"
              f" {row['update_s']:>9.1f} {row['compute_s']:>10.1f} {row['pixel_auroc']:>12.4f}")


if __name__ == "__main__":
    main()
