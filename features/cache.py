"""On-disk cache of patch embeddings, one memory-mappable ``.npy`` file per image.

Directory layout under the cache root::

    <root>/CACHEDIR.TAG
    <root>/<backbone name>/<first 16 hex digits of weights_digest>/<key>.npy
    <root>/<backbone name>/<first 16 hex digits of weights_digest>/<key>.json
    <root>/<backbone name>/<first 16 hex digits of weights_digest>/bundles/...

An entry's ``.npy`` file is an array of shape (grid_h, grid_w, dim) in the cache's storage
dtype. Its ``.json`` sidecar describes the backbone, the grid and the image the entry was
computed from. The ``bundles`` folder contains the per-split patch matrices that
:func:`dinodpmm.features.extract.embed_split` assembles.

The key of an entry is a sha256 over the backbone name, its ``weights_digest``, the JSON
of its ``settings`` with sorted keys, the storage dtype and the sha256 of the image
file's bytes. The same image file in two datasets is therefore one entry, and changing
any of these inputs is a cache miss.

Every file is written to a temporary file in its final directory and moved into place
with :func:`os.replace`, so a reader sees either no file or a complete one. An
interrupted extraction therefore resumes from the entries already written, and two
processes that fill the same cache overwrite each other's entries with the same
embeddings (up to the backbone's own nondeterminism, on a GPU for example).
Entry and bundle files are fsynced before the move. Sidecars and directories are not,
so a power loss can undo the last renames, which makes those entries misses.
Temporary files are named ``.<final name>.<random>.tmp``. A killed process can leave
them behind, and :meth:`EmbeddingCache.clear` removes them.

NOTE: this has been run on Linux only. On Windows, :func:`os.replace` fails while
another process has the target file open or memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import platformdirs

if TYPE_CHECKING:
    # Imported for annotations only: base imports torch, and the CLI's parser, which
    # imports this module, must build without it.
    from .base import Backbone

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "DINODPMM_CACHE"
STORAGE_DTYPES = ("float16", "float32")
BUNDLE_DIR = "bundles"
# Largest finite float16 value (65504). Larger embedding values would be stored as inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Hex digits of weights_digest in the directory name. Keys contain the full digest, so a
# shared prefix only puts two weights in one directory.
_DIGEST_PREFIX_LENGTH = 16
_HASH_CHUNK_BYTES = 1 << 20
# Marks the root as a cache for backup tools, following https://bford.info/cachedir/.
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by dinodpmm.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def default_cache_root() -> Path:
    """Return ``$DINODPMM_CACHE`` if set, else ``<user cache dir>/dinodpmm/embeddings``."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("dinodpmm")) / "embeddings"


def file_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """Return the hex sha256 of ``value`` as compact JSON with sorted keys."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block exits without error.

    The caller writes the complete file to the yielded path and closes it. On success the
    file is fsynced (if ``durable``) and moved onto ``path`` with :func:`os.replace`. On
    an exception, including KeyboardInterrupt, the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        if durable:
            _fsync_file(temporary_path)
        # mkstemp makes the file readable only by its owner. Cache files get the usual 0644.
        os.chmod(temporary_path, 0o644)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: Path, value: Any, *, durable: bool = True) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    with atomic_path(path, durable=durable) as temporary, open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, sort_keys=True)


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a ``.npy`` file to ``path`` atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array, allow_pickle=False)


def read_npy(path: Path, *, dtype: np.dtype, ndim: int, dim: int) -> np.ndarray | None:
    """Open a ``.npy`` file memory-mapped and check its dtype and shape.

    Returns None when the file is missing. A file that is truncated, has an invalid
    header, or has another dtype, number of dimensions or last axis is logged as a
    warning and also returns None, so the caller recomputes it.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError) as error:
        logger.warning("cached file %s is unreadable (%s), so it is recomputed", path, error)
        return None
    expected = f"{np.dtype(dtype).name} with {ndim} dimensions and last axis {dim}"
    if array.dtype != dtype or array.ndim != ndim or array.shape[-1] != dim or array.size == 0:
        logger.warning(
            "cached file %s contains %s of shape %s, expected %s, so it is recomputed",
            path,
            array.dtype,
            array.shape,
            expected,
        )
        return None
    return array


def _safe_directory_name(name: str) -> str:
    """Return ``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


@dataclass(frozen=True)
class CacheInfo:
    """Size and contents of an embedding cache.

    Attributes
    ----------
    root : pathlib.Path
        Cache root.
    total_bytes : int
        Total size of the entries, their sidecars, the bundles and temporary files.
    num_entries : int
        Number of per-image entries.
    entries_per_backbone : dict of str to int
        Number of per-image entries per backbone directory name.
    num_bundles : int
        Number of assembled split bundles.
    num_temporary_files : int
        Temporary files that killed writers left behind.
    """

    root: Path
    total_bytes: int = 0
    num_entries: int = 0
    entries_per_backbone: dict[str, int] = field(default_factory=dict)
    num_bundles: int = 0
    num_temporary_files: int = 0


class EmbeddingCache:
    """Per-image patch embeddings on disk, keyed by backbone, settings, dtype and image bytes.

    Parameters
    ----------
    root : str or pathlib.Path, optional
        Cache root. Defaults to :func:`default_cache_root`: ``$DINODPMM_CACHE`` if set,
        else ``embeddings`` in the user cache directory of ``platformdirs``.
    dtype : {"float16", "float32"}
        Storage dtype. float16 halves the disk space and the size of every bundle.
        Embeddings whose magnitude exceeds 65504 need float32.

    Raises
    ------
    NotADirectoryError
        If ``root``, or the nearest of its ancestors that exists, is a file.
    """

    def __init__(self, root: str | Path | None = None, *, dtype: str = "float16") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}. "
                "Pass 'float16' (default) or 'float32'"
            )
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        _check_directory_path(self.root)
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"EmbeddingCache(root='{self.root}', dtype={self.dtype.name!r})"

    def backbone_directory(self, backbone: Backbone) -> Path:
        """Return the directory of the entries of ``backbone``."""
        prefix = _safe_directory_name(backbone.weights_digest[:_DIGEST_PREFIX_LENGTH])
        return self.root / _safe_directory_name(backbone.name) / prefix

    def entry_key(self, backbone: Backbone, image_sha256: str) -> str:
        """Return the key of the entry for an image with the given sha256 of its bytes."""
        payload = {
            "backbone": backbone.name,
            "weights_digest": backbone.weights_digest,
            "settings": backbone.settings,
            "dtype": self.dtype.name,
            "image_sha256": image_sha256,
        }
        try:
            return json_sha256(payload)
        except TypeError as error:
            raise TypeError(
                f"settings of backbone {backbone.name!r} must be JSON-serialisable to key the "
                f"cache, got {backbone.settings!r} ({error}). Convert them to str, int, float, "
                "bool, list or dict"
            ) from error

    def image_key(self, backbone: Backbone, image: str | Path) -> str:
        """Return the key of the entry for an image file, hashing its bytes."""
        return self.entry_key(backbone, file_sha256(image))

    def entry_path(self, backbone: Backbone, key: str) -> Path:
        """Return the ``.npy`` path of an entry."""
        return self.backbone_directory(backbone) / f"{key}.npy"

    def load(self, backbone: Backbone, key: str) -> np.ndarray | None:
        """Open an entry memory-mapped.

        Returns
        -------
        np.memmap of shape (grid_h, grid_w, dim) or None
            None on a miss. A truncated or invalid entry is logged and is a miss too.
        """
        return read_npy(self.entry_path(backbone, key), dtype=self.dtype, ndim=3, dim=backbone.dim)

    def store(
        self, backbone: Backbone, key: str, embedding: np.ndarray, *, source: str | Path
    ) -> Path:
        """Write an entry and its sidecar atomically and return the entry's path.

        Parameters
        ----------
        backbone : Backbone
            Backbone that computed ``embedding``.
        key : str
            Entry key from :meth:`image_key`.
        embedding : np.ndarray of shape (grid_h, grid_w, dim)
            Patch embeddings of one image, cast to the storage dtype.
        source : str or pathlib.Path
            Image file the embedding was computed from, recorded in the sidecar.

        Raises
        ------
        ValueError
            If ``embedding`` has the wrong shape, is not finite, or exceeds the float16
            range in a float16 cache.
        """
        self._check_embedding(backbone, embedding, source)
        path = self.entry_path(backbone, key)
        self._ensure_root()
        sidecar = {
            "key": key,
            "backbone": backbone.describe(),
            "dtype": self.dtype.name,
            "grid": list(embedding.shape[:2]),
            "image": str(source),
        }
        # The sidecar goes first, so after a process crash every .npy entry has one. Readers
        # never need it, so it skips the fsync, which costs milliseconds per file.
        write_json_atomic(path.with_suffix(".json"), sidecar, durable=False)
        write_npy_atomic(path, np.ascontiguousarray(embedding, dtype=self.dtype))
        return path

    def _check_embedding(self, backbone: Backbone, embedding: np.ndarray, source: str | Path) -> None:
        if embedding.ndim != 3 or embedding.shape[-1] != backbone.dim:
            raise ValueError(
                f"embedding of {source} must have shape (grid_h, grid_w, {backbone.dim}) for "
                f"backbone {backbone.name!r}, got {embedding.shape}. Reshape the tokens to the grid"
            )
        if not np.isfinite(embedding).all():
            raise ValueError(
                f"embedding of {source} by backbone {backbone.name!r} contains NaN or inf. "
                "Check the image and the backbone weights"
            )
        largest = float(np.abs(embedding).max())
        if self.dtype == np.float16 and largest > FLOAT16_MAX:
            raise ValueError(
                f"embedding of {source} by backbone {backbone.name!r} has magnitude {largest:g}, "
                f"above the float16 maximum {FLOAT16_MAX:g}. Use a float32 cache "
                "(EmbeddingCache(dtype='float32'))"
            )

    def _ensure_root(self) -> None:
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tag.write_text(_CACHEDIR_TAG, encoding="ascii")

    def bundle_paths(self, backbone: Backbone, bundle_key: str) -> tuple[Path, Path]:
        """Return the ``.npy`` patch matrix and ``.json`` index paths of a split bundle."""
        directory = self.backbone_directory(backbone) / BUNDLE_DIR
        return directory / f"{bundle_key}.npy", directory / f"{bundle_key}.json"

    def info(self) -> CacheInfo:
        """Return the size and contents of the cache; an empty one if the root is missing."""
        if not self.root.is_dir():
            return CacheInfo(self.root)
        total_bytes = num_temporary = num_bundles = 0
        per_backbone: dict[str, int] = {}
        for path in _cache_files(self.root):
            total_bytes += path.stat().st_size
            if _TEMPORARY_NAME.match(path.name):
                num_temporary += 1
            elif path.suffix != ".npy":
                continue
            elif path.parent.name == BUNDLE_DIR:
                num_bundles += 1
            else:
                backbone = path.relative_to(self.root).parts[0]
                per_backbone[backbone] = per_backbone.get(backbone, 0) + 1
        return CacheInfo(
            root=self.root,
            total_bytes=total_bytes,
            num_entries=sum(per_backbone.values()),
            entries_per_backbone=dict(sorted(per_backbone.items())),
            num_bundles=num_bundles,
            num_temporary_files=num_temporary,
        )

    def clear(self, backbone: str | None = None) -> int:
        """Delete the cached files of one backbone name, or of all backbones.

        Only files named like cache entries, bundles or their temporary files are
        deleted, followed by the directories left empty.

        Returns
        -------
        int
            Number of per-image entries deleted.

        Raises
        ------
        ValueError
            If the root is not empty but lacks the ``CACHEDIR.TAG`` that this cache
            writes, which suggests that it points at an unrelated folder.
        """
        if not self.root.is_dir() or not any(self.root.iterdir()):
            return 0
        if not (self.root / "CACHEDIR.TAG").is_file():
            raise ValueError(
                f"{self.root} has no CACHEDIR.TAG, so it is not an embedding cache that "
                "dinodpmm created; nothing was deleted. Check the cache root"
            )
        directory = self.root if backbone is None else self.root / _safe_directory_name(backbone)
        removed = 0
        for path in _cache_files(directory):
            if path.suffix == ".npy" and path.parent.name != BUNDLE_DIR:
                removed += 1
            path.unlink(missing_ok=True)
        _remove_empty_directories(directory, keep=self.root)
        return removed


def _check_directory_path(root: Path) -> None:
    """Raise NotADirectoryError if ``root`` or its nearest existing ancestor is not a directory.

    A missing root is fine: the first write creates it.
    """
    for path in (root, *root.parents):
        if not path.exists():
            continue
        if path.is_dir():
            return
        problem = "is a file, not a directory" if path == root else f"cannot be created because {path} is a file"
        raise NotADirectoryError(
            f"embedding cache root {root} {problem}; pass the path of a directory (it is created "
            "when missing) or move the file away."
        )


# Entry and bundle files are named by a sha256 key. Temporary files, as atomic_path names
# them, add a leading dot and a random part with a .tmp suffix.
_CACHE_FILE_NAME = re.compile(r"[0-9a-f]{64}\.(npy|json)")
_TEMPORARY_NAME = re.compile(r"\.[0-9a-f]{64}\.(npy|json)\.\w+\.tmp")


def _cache_files(directory: Path) -> Iterator[Path]:
    """Yield the entry, bundle and temporary files at their cache depth under ``directory``."""
    if not directory.is_dir():
        return
    for path in directory.rglob("*"):
        name_matches = _CACHE_FILE_NAME.fullmatch(path.name) or _TEMPORARY_NAME.fullmatch(path.name)
        if name_matches and path.is_file():
            yield path


def _remove_empty_directories(directory: Path, keep: Path) -> None:
    """Remove empty directories under ``directory`` bottom-up, and ``directory`` unless it is ``keep``."""
    if not directory.is_dir():
        return
    subdirectories = sorted((path for path in directory.rglob("*") if path.is_dir()), reverse=True)
    for path in [*subdirectories, directory]:
        if path != keep:
            with contextlib.suppress(OSError):
                path.rmdir()
