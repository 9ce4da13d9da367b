"""A self-contained demo: the whole pipeline on texture photographs shipped with scikit-image.

The ``grass`` and ``brick`` photographs (512 x 512, 8-bit grayscale) are files inside
the scikit-image package, so the demo needs no download. Normal tiles are random crops
of ``grass``. Anomalous test tiles are grass crops with an elliptical patch of
``brick`` pasted in; the ellipse is the exact ground-truth mask. The defects are
therefore synthetic, and the footer of every demo figure states it.

The tiles are written in the MVTec layout and the run uses the weight-free
``offline-texture`` backbone, SVI and the memory-bank baseline, as
:func:`~dinodpmm.experiments.runner.run_experiment` does for any dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from .config import load_config
from .runner import FIGURES_DIR, run_experiment

logger = logging.getLogger(__name__)

DEMO_NOTE = "defects are synthetic: brick texture pasted into grass tiles (scikit-image sample images)"
DEFECT_NAME = "pasted_brick"
TILE_SIZE = 96
# Rows of the grass photograph used for training tiles; test tiles come from the rows
# below, so no test pixel was seen in training.
TRAIN_ROWS = 400
# Semi-axes of the pasted ellipse, in pixels.
ELLIPSE_AXES = (10, 26)

# Tile counts and fit length of the full demo and of the --fast demo.
FULL = {"train": 120, "test_normal": 30, "test_anomalous": 30, "num_steps": 400}
FAST = {"train": 30, "test_normal": 8, "test_anomalous": 8, "num_steps": 60}


def _random_tile(image: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Crop a (TILE_SIZE, TILE_SIZE) tile with its top row in ``rows``, then flip and rotate it at random."""
    top = int(rng.integers(rows[0], rows[1] - TILE_SIZE + 1))
    left = int(rng.integers(0, image.shape[1] - TILE_SIZE + 1))
    tile = image[top : top + TILE_SIZE, left : left + TILE_SIZE]
    tile = np.rot90(tile, k=int(rng.integers(4)))
    return np.ascontiguousarray(tile[:, ::-1] if rng.random() < 0.5 else tile)


def _ellipse_mask(rng: np.random.Generator) -> np.ndarray:
    """Return a bool (TILE_SIZE, TILE_SIZE) mask of a randomly placed, rotated ellipse."""
    semi_a, semi_b = rng.uniform(*ELLIPSE_AXES, size=2)
    margin = max(semi_a, semi_b)
    center = rng.uniform(margin, TILE_SIZE - margin, size=2)
    angle = rng.uniform(0, np.pi)
    rows, cols = np.mgrid[:TILE_SIZE, :TILE_SIZE]
    dy, dx = rows - center[0], cols - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / semi_a) ** 2 + (v / semi_b) ** 2 <= 1.0


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def make_demo_dataset(root: str | Path, *, fast: bool = False, seed: int = 0) -> Path:
    """Write the demo tiles under ``root`` in the MVTec layout and return ``root``.

    ``train/good`` contains normal tiles from the top rows of ``grass``, ``test/good``
    normal tiles from the bottom rows, ``test/pasted_brick`` bottom-row tiles with a
    brick ellipse, and ``ground_truth/pasted_brick/<stem>_mask.png`` their masks (0/255).
    """
    root = Path(root)
    counts = FAST if fast else FULL
    rng = np.random.default_rng(seed)
    grass, brick = skimage_data.grass(), skimage_data.brick()
    test_rows = (TRAIN_ROWS, grass.shape[0])
    # Distinct file-name prefixes per split, so that figure titles tell the tiles apart.
    for i in range(counts["train"]):
        _save(_random_tile(grass, (0, TRAIN_ROWS), rng), root / "train" / "good" / f"train_{i:03d}.png")
    for i in range(counts["test_normal"]):
        _save(_random_tile(grass, test_rows, rng), root / "test" / "good" / f"good_{i:03d}.png")
    for i in range(counts["test_anomalous"]):
        tile, patch, mask = _random_tile(grass, test_rows, rng), _random_tile(brick, (0, brick.shape[0]), rng), _ellipse_mask(rng)
        tile = np.where(mask, patch, tile)
        _save(tile, root / "test" / DEFECT_NAME / f"brick_{i:03d}.png")
        _save(mask * 255, root / "ground_truth" / DEFECT_NAME / f"brick_{i:03d}_mask.png")
    logger.info("wrote %d training and %d test tiles to %s", counts["train"],
                counts["test_normal"] + counts["test_anomalous"], root)
    return root


def demo_overrides(data_root: Path, *, fast: bool) -> list[str]:
    """Return the config overrides of the demo run on the tiles at ``data_root``."""
    counts = FAST if fast else FULL
    return [
        f"data.root={json.dumps(str(data_root))}",
        "data.layout=mvtec",
        "backbone.name=offline-texture",
        # A 96 px tile resized to 224 px gives a 16 x 16 patch grid.
        "backbone.resolution=224",
        # The full demo's 27,648 training patches occupy about 190 components (94%
        # interval 183 to 194) under this truncation. The fast demo's shorter fit
        # leaves all of them occupied, and the run logs a warning about it.
        "fit.truncation=200",
        "fit.batch_size=2048",
        f"fit.num_steps={counts['num_steps']}",
        "score.sigma=2",
        # Every training patch is in the bank: the demo is small enough for an exact search over all.
        "baseline.max_patches=null",
        f"plots.note={json.dumps(DEMO_NOTE)}",
    ]


def run_demo(out_dir: str | Path, *, fast: bool = False, progress: bool = False,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write the demo tiles to ``out_dir/data`` and run the experiment into ``out_dir``.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Run directory; the tiles go to its ``data`` folder.
    fast : bool
        Fewer tiles and SVI steps.
    progress : bool
        Show progress bars.
    overrides : sequence of str
        Further ``key=value`` config overrides, for example ``cache.dir=/tmp/cache``.

    Returns
    -------
    dict
        The run's ``metrics.json`` content, plus ``figures_dir`` and ``note``.
    """
    out_dir = Path(out_dir).absolute()
    data_root = make_demo_dataset(out_dir / "data", fast=fast)
    config = load_config(None, [*demo_overrides(data_root, fast=fast), *overrides])
    metrics = run_experiment(config, out_dir, progress=progress)
    return {**metrics, "figures_dir": str(out_dir / FIGURES_DIR), "note": DEMO_NOTE}
