"""Embed the images of a split through the cache and assemble one patch matrix per split.

:func:`embed_split` computes only the cache misses and writes each entry as soon as its
batch is done, so an interrupted run resumes where it stopped. It then copies the
entries into one ``.npy`` patch matrix of shape (num_patches, dim) with a JSON index
next to it, the split bundle. A bundle is cached under a key over the split's entry
keys, image paths and labels, so a second run of the same split opens the bundle
without reading the entries.

NOTE: bundles duplicate the entries on disk, and a bundle stays until the cache is
cleared, even when no split uses it any more.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .base import Backbone
from .cache import EmbeddingCache, atomic_path, json_sha256, read_npy, write_json_atomic
from .datasets import Sample, image_size

logger = logging.getLogger(__name__)

# Version of the bundle index format. A bundle with another version is rebuilt.
BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class IndexRecord:
    """Location of one image's patches in a split bundle.

    Attributes
    ----------
    image : str
        Image file.
    row_start, row_stop : int
        The image's rows ``patches[row_start:row_stop]``, ``grid_h * grid_w`` of them in
        row-major patch order.
    grid : tuple of int
        ``(grid_h, grid_w)``.
    label : int
        0 normal, 1 anomalous.
    defect : str
        Defect type of the sample.
    mask : str or None
        Mask file, or None when the image has none.
    entry_key : str
        Cache key of the image's entry.
    """

    image: str
    row_start: int
    row_stop: int
    grid: tuple[int, int]
    label: int
    defect: str
    mask: str | None
    entry_key: str


class SplitEmbeddings:
    """The patch embeddings of one split, memory-mapped from a bundle.

    Attributes
    ----------
    patches : np.memmap of shape (num_patches, dim)
        Patch embeddings of every image, float16 or float32, read from disk on access.
        Random row access (``patches[rows]`` with an integer array) copies only those
        rows into memory.
    index : tuple of IndexRecord
        One record per image, in the order of the samples.
    backbone : dict
        ``Backbone.describe()`` of the backbone that computed the embeddings.
    path : pathlib.Path
        Bundle ``.npy`` file. Its index is the ``.json`` file with the same stem.
    """

    def __init__(
        self, patches: np.ndarray, index: Sequence[IndexRecord], backbone: dict[str, Any], path: Path
    ) -> None:
        self.patches = patches
        self.index = tuple(index)
        self.backbone = backbone
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> SplitEmbeddings:
        """Open a bundle from its ``.npy`` path.

        Raises
        ------
        FileNotFoundError
            If the bundle or its index is missing.
        ValueError
            If the bundle or its index is invalid or they disagree.
        """
        path = Path(path)
        for required in (path, path.with_suffix(".json")):
            if not required.is_file():
                raise FileNotFoundError(
                    f"bundle file {required} does not exist. Pass the .npy path of a bundle "
                    "that embed_split wrote"
                )
        bundle = _read_bundle(path, path.with_suffix(".json"))
        if bundle is None:
            raise ValueError(
                f"bundle {path} or its index {path.with_suffix('.json')} is invalid (the logged "
                "warning names the problem). Rerun embed_split to rebuild it"
            )
        return bundle

    @property
    def num_images(self) -> int:
        """Number of images in the split."""
        return len(self.index)

    @property
    def num_patches(self) -> int:
        """Number of rows of ``patches``."""
        return int(self.patches.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.patches.shape[1])

    @property
    def labels(self) -> np.ndarray:
        """Image labels, int64 of shape (num_images,): 0 normal, 1 anomalous."""
        return np.array([record.label for record in self.index], dtype=np.int64)

    def image_patches(self, i: int) -> np.ndarray:
        """Return the patches of image ``i``, a memory-mapped view of shape (grid_h * grid_w, dim)."""
        record = self.index[i]
        return self.patches[record.row_start : record.row_stop]

    def grid(self, i: int) -> tuple[int, int]:
        """Return ``(grid_h, grid_w)`` of image ``i``."""
        return self.index[i].grid

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"SplitEmbeddings({self.num_images} images, patches {self.num_patches}x{self.dim} "
            f"{self.patches.dtype}, backbone {self.backbone.get('name')!r}, path='{self.path}')"
        )


def embed_split(
    backbone: Backbone,
    samples: Sequence[Sample],
    cache: EmbeddingCache,
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "embed",
) -> SplitEmbeddings:
    """Embed the images of a split through the cache and return its memory-mapped bundle.

    Parameters
    ----------
    backbone : Backbone
        Backbone that embeds the cache misses.
    samples : sequence of Sample
        Images of the split, for example a :class:`~dinodpmm.features.datasets.Split`.
    cache : EmbeddingCache
        Cache to read and fill.
    batch_size : int
        Maximum number of images per ``backbone.embed`` call. Images of one batch share a
        patch grid.
    progress : bool
        Show a tqdm progress bar over the images to embed.
    description : str
        Label of the progress bar and the log lines, for example the split name.

    Returns
    -------
    SplitEmbeddings
        Patch matrix of shape (num_patches, dim) and per-image index.

    Raises
    ------
    ValueError
        If ``samples`` is empty or ``batch_size`` is not a positive integer.
    RuntimeError
        If the backbone returns tokens of the wrong shape or grid.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}. Pass e.g. 16")
    if len(samples) == 0:
        raise ValueError(f"samples of {description!r} is empty. Pass at least one Sample")

    keys = [cache.image_key(backbone, sample.image) for sample in samples]
    bundle_key = _bundle_key(cache, samples, keys)
    npy_path, index_path = cache.bundle_paths(backbone, bundle_key)
    if (bundle := _read_bundle(npy_path, index_path, quiet_if_missing=True)) is not None:
        logger.info("%s: %d images served from bundle %s", description, len(samples), npy_path)
        return bundle

    misses = [i for i, key in enumerate(keys) if cache.load(backbone, key) is None]
    logger.info(
        "%s: %d images, %d cached, %d to embed with %s",
        description,
        len(samples),
        len(samples) - len(misses),
        len(misses),
        backbone.name,
    )
    _embed_misses(backbone, samples, keys, misses, cache, batch_size, progress, description)
    return _write_bundle(backbone, samples, keys, cache, npy_path, index_path)


def _bundle_key(cache: EmbeddingCache, samples: Sequence[Sample], keys: Sequence[str]) -> str:
    images = [
        [key, str(sample.image), sample.label, sample.defect, _optional_str(sample.mask)]
        for key, sample in zip(keys, samples, strict=True)
    ]
    return json_sha256({"format": BUNDLE_FORMAT, "dtype": cache.dtype.name, "images": images})


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _batches_by_grid(
    backbone: Backbone, samples: Sequence[Sample], indices: Sequence[int], batch_size: int
) -> Iterator[tuple[tuple[int, int], list[int]]]:
    """Yield ``(grid, sample indices)`` batches whose images share a patch grid."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        grid = tuple(backbone.grid_shape(image_size(samples[i].image)))
        groups.setdefault(grid, []).append(i)
    for grid, members in groups.items():
        for start in range(0, len(members), batch_size):
            yield grid, members[start : start + batch_size]


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    return image


def _embed_misses(
    backbone: Backbone,
    samples: Sequence[Sample],
    keys: Sequence[str],
    misses: Sequence[int],
    cache: EmbeddingCache,
    batch_size: int,
    progress: bool,
    description: str,
) -> None:
    """Embed the images at ``misses`` and store each entry when its batch is done."""
    if not misses:
        return
    with tqdm(total=len(misses), desc=description, unit="image", disable=not progress) as bar:
        for grid, batch in _batches_by_grid(backbone, samples, misses, batch_size):
            images = [_load_image(samples[i].image) for i in batch]
            tokens, returned_grid = backbone.embed(images)
            _check_tokens(backbone, tokens.shape, tuple(returned_grid), len(batch), grid, samples[batch[0]])
            embeddings = tokens.detach().cpu().numpy().reshape(len(batch), *grid, backbone.dim)
            for i, embedding in zip(batch, embeddings, strict=True):
                cache.store(backbone, keys[i], embedding, source=samples[i].image)
            bar.update(len(batch))


def _check_tokens(
    backbone: Backbone,
    shape: Sequence[int],
    returned_grid: tuple[int, ...],
    num_images: int,
    grid: tuple[int, int],
    first: Sample,
) -> None:
    expected = (num_images, grid[0] * grid[1], backbone.dim)
    if tuple(shape) != expected or returned_grid != grid:
        raise RuntimeError(
            f"backbone {backbone.name!r} returned tokens of shape {tuple(shape)} and grid "
            f"{returned_grid} for a batch starting at {first.image}, but grid_shape() "
            f"predicts shape {expected} and grid {grid}, so grid_shape() and embed() disagree"
        )


def _write_bundle(
    backbone: Backbone,
    samples: Sequence[Sample],
    keys: Sequence[str],
    cache: EmbeddingCache,
    npy_path: Path,
    index_path: Path,
) -> SplitEmbeddings:
    """Copy the entries of a split into one patch matrix and write it with its index.

    Each entry is opened twice, once for its grid and once to copy it, and closed in
    between: every open memory map keeps a file descriptor, and a split can have more
    entries than the process may open files.
    """
    grids = [_load_entry(cache, backbone, key, sample).shape[:2] for key, sample in zip(keys, samples, strict=True)]
    index = _index_records(samples, keys, grids)
    num_patches = index[-1].row_stop

    with atomic_path(npy_path) as temporary:
        patches = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=cache.dtype, shape=(num_patches, backbone.dim)
        )
        for record, sample in zip(index, samples, strict=True):
            entry = _load_entry(cache, backbone, record.entry_key, sample)
            assert entry.shape[:2] == record.grid, f"entry {record.entry_key} changed its grid"
            patches[record.row_start : record.row_stop] = entry.reshape(-1, backbone.dim)
            del entry
        patches.flush()
        del patches
    # The index goes last: a bundle is complete only when both files exist and agree.
    write_json_atomic(index_path, _index_document(backbone, cache, num_patches, index))
    logger.info("wrote bundle %s: %d patches x %d", npy_path, num_patches, backbone.dim)
    bundle = _read_bundle(npy_path, index_path)
    assert bundle is not None, f"bundle {npy_path} failed validation right after it was written"
    return bundle


def _load_entry(cache: EmbeddingCache, backbone: Backbone, key: str, sample: Sample) -> np.ndarray:
    entry = cache.load(backbone, key)
    if entry is None:
        raise RuntimeError(
            f"cache entry {cache.entry_path(backbone, key)} of {sample.image} vanished "
            "while its split was assembled, probably because the cache was cleared. Rerun"
        )
    return entry


def _index_records(
    samples: Sequence[Sample], keys: Sequence[str], grids: Sequence[tuple[int, int]]
) -> list[IndexRecord]:
    records = []
    row = 0
    for key, sample, (grid_h, grid_w) in zip(keys, samples, grids, strict=True):
        records.append(
            IndexRecord(
                image=str(sample.image),
                row_start=row,
                row_stop=row + grid_h * grid_w,
                grid=(int(grid_h), int(grid_w)),
                label=int(sample.label),
                defect=sample.defect,
                mask=_optional_str(sample.mask),
                entry_key=key,
            )
        )
        row += grid_h * grid_w
    return records


def _index_document(
    backbone: Backbone, cache: EmbeddingCache, num_patches: int, index: Sequence[IndexRecord]
) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "backbone": backbone.describe(),
        "dtype": cache.dtype.name,
        "dim": backbone.dim,
        "num_patches": num_patches,
        "images": [asdict(record) for record in index],
    }


def _read_bundle(npy_path: Path, index_path: Path, *, quiet_if_missing: bool = False) -> SplitEmbeddings | None:
    """Open a bundle, or return None (with a log line) when it is missing or invalid."""
    try:
        document = json.loads(index_path.read_text(encoding="utf-8"))
        index = [
            IndexRecord(**{**record, "grid": tuple(record["grid"])}) for record in document["images"]
        ]
        dtype, dim, num_patches = np.dtype(document["dtype"]), document["dim"], document["num_patches"]
        if document["format"] != BUNDLE_FORMAT or not index:
            raise ValueError(f"format {document['format']} with {len(index)} images")
    except FileNotFoundError:
        if not quiet_if_missing:
            logger.warning("bundle index %s is missing", index_path)
        return None
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("bundle index %s is invalid (%s), so the bundle is rebuilt", index_path, error)
        return None
    patches = read_npy(npy_path, dtype=dtype, ndim=2, dim=dim)
    if patches is None or patches.shape[0] != num_patches or index[-1].row_stop != num_patches:
        logger.warning("bundle %s does not match its index %s, so it is rebuilt", npy_path, index_path)
        return None
    return SplitEmbeddings(patches, index, document["backbone"], npy_path)
