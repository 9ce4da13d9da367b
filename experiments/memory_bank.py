"""Exact nearest-neighbour distances to a bank of patch embeddings.

:class:`MemoryBank` scores query patches by their distance to the nearest bank patch,
the PatchCore-style baseline without coreset subsampling. The same kernel scores
patches against the component means of a fitted mixture (see
:func:`dinodpmm.experiments.scoring.patch_scores`), where the "bank" is the means.

The torch path works on blocks of ``chunk_size`` queries by ``chunk_size`` bank rows:
one matrix product per block and a running minimum per query, so no
(num_queries, num_bank) or (num_queries, num_bank, dim) tensor is ever built. When
``faiss`` is installed and ``backend="auto"``, an exact faiss flat index is used instead.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[str, ...] = ("cosine", "euclidean")
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")

DEFAULT_CHUNK_SIZE = 4096

# Floor on vector norms before dividing by them, the same as the default of
# torch.nn.functional.normalize: an all-zero vector then has cosine similarity 0 with
# every other vector (cosine distance 1) instead of producing NaN.
_NORM_EPS = 1e-12


class MemoryBank:
    """A bank of patch embeddings that scores queries by distance to the nearest bank patch.

    Parameters
    ----------
    patches : torch.Tensor or np.ndarray of shape (num_bank, dim)
        Bank patches. Any float dtype, including float16 ``np.memmap`` arrays: rows are
        converted to float32 one chunk at a time, and the bank keeps a reference to
        ``patches`` instead of a copy, so do not modify it while the bank is in use.
    metric : {"cosine", "euclidean"}
        ``"cosine"`` is ``1 - cos(query, patch)``, in [0, 2]; ``"euclidean"`` is the L2
        distance, computed through ``||q - c||^2 - 2 (q - c)(p - c)^T + ||p - c||^2``
        with ``c`` the bank mean, clamped at 0 before the square root.
    chunk_size : int
        Rows per block, for queries and bank alike. The torch path holds at most one
        (chunk_size, chunk_size) float32 block plus two (chunk_size, dim) chunks at a
        time, that is ``4 * chunk_size * (chunk_size + 2 * dim)`` bytes, plus a
        (num_bank,) norm vector and the (num_queries,) result. The default 4096 needs
        about 80 MB at dim 384.
    backend : {"auto", "torch", "faiss"}
        ``"auto"`` uses faiss when it can be imported and the torch path otherwise.
        The faiss path copies the whole bank into a float32 index
        (``4 * num_bank * dim`` bytes), so its memory is not bounded by ``chunk_size``.
    device : str or torch.device or None
        Device of the torch path. None means the device of ``patches`` when it is a
        tensor, the CPU otherwise.

    Raises
    ------
    TypeError
        If ``patches`` is neither a tensor nor a numpy array.
    ValueError
        If ``metric``, ``backend`` or ``chunk_size`` is invalid, ``patches`` is not a
        non-empty 2-D array, or contains NaN or infinity.
    """

    def __init__(
        self,
        patches: torch.Tensor | np.ndarray,
        metric: Metric = "cosine",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        backend: str = "auto",
        device: str | torch.device | None = None,
    ) -> None:
        _check_choice("metric", metric, METRICS)
        _check_choice("backend", backend, BACKENDS)
        _check_chunk_size(chunk_size)
        _check_matrix("patches", patches)
        if patches.shape[0] == 0:
            raise ValueError("patches must contain at least one bank patch, got shape "
                             f"{tuple(patches.shape)}; build the bank from non-empty embeddings.")
        self.patches = patches
        self.metric = metric
        self.chunk_size = int(chunk_size)
        self.device = _default_device(patches, device)
        self._faiss_index = _build_faiss_index(patches, metric, chunk_size) if backend != "torch" else None
        if backend == "faiss" and self._faiss_index is None:
            raise ValueError("backend='faiss' requires the faiss package, which cannot be imported; "
                             "install faiss-cpu or faiss-gpu, or use backend='torch'.")
        if self._faiss_index is None:
            self._center, self._row_norms = self._summarise_bank()

    @property
    def num_bank(self) -> int:
        """Number of bank patches."""
        return int(self.patches.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.patches.shape[1])

    @property
    def backend(self) -> str:
        """Backend in use, ``"torch"`` or ``"faiss"``."""
        return "torch" if self._faiss_index is None else "faiss"

    def score(self, queries: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Compute each query's distance to its nearest bank patch.

        Parameters
        ----------
        queries : torch.Tensor or np.ndarray of shape (num_queries, dim)
            Query patches, any float dtype (float16 memmaps are converted per chunk).

        Returns
        -------
        torch.Tensor of shape (num_queries,)
            Exact nearest-neighbour distance under :attr:`metric`, float32, on the CPU.

        Raises
        ------
        ValueError
            If ``queries`` is not 2-D with ``dim`` columns or contains NaN or infinity.
        """
        _check_matrix("queries", queries, dim=self.dim)
        if self._faiss_index is not None:
            return _search_faiss(self._faiss_index, queries, self.metric, self.chunk_size)
        pieces = []
        for start in range(0, queries.shape[0], self.chunk_size):
            query = _to_float32(queries, start, self.chunk_size, self.device, "queries")
            pieces.append(self._score_chunk(query).cpu())
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32)

    # -- torch path ------------------------------------------------------------------

    def _summarise_bank(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Return the centre of the euclidean expansion and the norm term of each bank row."""
        center = None
        if self.metric == "euclidean":
            total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
            for _, chunk in self._bank_chunks():
                total += chunk.sum(0, dtype=torch.float64)
            # Centring removes the common offset of the embeddings, which would otherwise
            # cancel catastrophically in ||q||^2 - 2 q p^T + ||p||^2.
            center = (total / self.num_bank).float()
        norms = []
        for _, chunk in self._bank_chunks():
            if self.metric == "cosine":
                norms.append(chunk.norm(dim=1).clamp_min(_NORM_EPS))  # B
            else:
                chunk = chunk - center
                norms.append((chunk * chunk).sum(1))  # B, squared norms
        return center, torch.cat(norms)

    def _bank_chunks(self):
        for start in range(0, self.num_bank, self.chunk_size):
            yield start, _to_float32(self.patches, start, self.chunk_size, self.device, "patches")

    def _score_chunk(self, query: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return 1.0 - self._max_cosine(query)
        return self._min_euclidean(query)

    def _max_cosine(self, query: torch.Tensor) -> torch.Tensor:
        query = query / query.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        best = torch.full((query.shape[0],), -float("inf"), device=self.device)  # Q
        for start, chunk in self._bank_chunks():
            # cos = q . p / ||p||, with q already unit-norm.
            block = torch.mm(query, chunk.T).div_(self._row_norms[start : start + chunk.shape[0]])  # Q B
            best = torch.maximum(best, block.max(dim=1).values)
        return best

    def _min_euclidean(self, query: torch.Tensor) -> torch.Tensor:
        query = query - self._center
        best = torch.full((query.shape[0],), float("inf"), device=self.device)  # Q
        for start, chunk in self._bank_chunks():
            squared_norms = self._row_norms[start : start + chunk.shape[0]]
            # ||p||^2 - 2 q . p; the ||q||^2 term is the same for every p and is added last.
            block = torch.addmm(squared_norms, query, (chunk - self._center).T, alpha=-2.0)  # Q B
            best = torch.minimum(best, block.min(dim=1).values)
        return (best + (query * query).sum(1)).clamp_min(0.0).sqrt()


# -- faiss path ------------------------------------------------------------------------


def _import_faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _build_faiss_index(patches, metric: str, chunk_size: int) -> Any | None:
    # NOTE: faiss is not a dependency and this path has not been run against a real faiss
    # build; the torch path is the tested one. Use backend="torch" for reproducible scores.
    faiss = _import_faiss()
    if faiss is None:
        return None
    index = faiss.IndexFlatIP(patches.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(patches.shape[1])
    for start in range(0, patches.shape[0], chunk_size):
        chunk = _to_float32(patches, start, chunk_size, torch.device("cpu"), "patches")
        if metric == "cosine":
            chunk = chunk / chunk.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        index.add(np.ascontiguousarray(chunk.numpy()))
    logger.info("built a faiss %s index of %d patches", type(index).__name__, patches.shape[0])
    return index


def _search_faiss(index, queries, metric: str, chunk_size: int) -> torch.Tensor:
    pieces = []
    for start in range(0, queries.shape[0], chunk_size):
        query = _to_float32(queries, start, chunk_size, torch.device("cpu"), "queries")
        if metric == "cosine":
            query = query / query.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        nearest, _ = index.search(np.ascontiguousarray(query.numpy()), 1)  # Q 1
        nearest = torch.from_numpy(np.asarray(nearest, dtype=np.float32)[:, 0])
        # IndexFlatIP returns the largest inner product, IndexFlatL2 the squared distance.
        pieces.append(1.0 - nearest if metric == "cosine" else nearest.clamp_min(0.0).sqrt())
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32)


# -- input handling ----------------------------------------------------------------------


def _to_float32(array, start: int, chunk_size: int, device: torch.device, name: str) -> torch.Tensor:
    """Return rows ``start:start + chunk_size`` of ``array`` as a float32 tensor on ``device``."""
    rows = array[start : start + chunk_size]
    if isinstance(rows, torch.Tensor):
        chunk = rows.detach().to(device=device, dtype=torch.float32)
    else:
        # np.array copies, because torch cannot wrap the read-only arrays of np.load(mmap_mode="r").
        chunk = torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)
    finite = torch.isfinite(chunk).all(dim=1)
    if not bool(finite.all()):
        row = start + int(torch.nonzero(~finite)[0, 0])
        raise ValueError(f"{name} must be finite, but row {row} contains NaN or infinity; "
                         "check the embeddings that produced it.")
    return chunk


def _check_matrix(name: str, array, dim: int | None = None) -> None:
    if not isinstance(array, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(array).__name__}.")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape (num_rows, dim), got shape {tuple(array.shape)}.")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns to match the bank's embedding dimension, "
                         f"got shape {tuple(array.shape)}; embed them with the same backbone.")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}.")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def _default_device(patches, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return patches.device if isinstance(patches, torch.Tensor) else torch.device("cpu")
