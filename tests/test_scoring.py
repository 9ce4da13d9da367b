"""Tests of patch, image and pixel scoring and of the exact memory bank."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinodpmm.experiments.memory_bank import MemoryBank
from dinodpmm.experiments.scoring import (
    SCORE_NAMES,
    anomaly_map,
    image_score,
    image_scores,
    patch_scores,
    top_patch_count,
)
from dinodpmm.inference.posterior import Posterior

EPS32 = torch.finfo(torch.float32).eps


def diag_posterior(means: torch.Tensor, weights: torch.Tensor, precision: torch.Tensor | None = None) -> Posterior:
    if precision is None:
        precision = torch.ones_like(means)
    return Posterior(family="diag", params={"loc": means, "precision": precision}, log_weights=weights.log())


def unit_rows(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)


def nearest_cosine(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Brute-force cosine distance to the nearest reference, in float64."""
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(references.double(), dim=1).T
    return 1 - similarity.max(dim=1).values


def nearest_euclidean(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Brute-force L2 distance to the nearest reference by explicit differences, in float64."""
    distances = torch.cdist(queries.double(), references.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return distances.min(dim=1).values


# -- patch scores against a posterior -------------------------------------------------


def test_cosine_is_half_squared_euclidean():
    # On unit vectors ||x - m||^2 = 2 - 2 cos(x, m), so the nearest mean is the same.
    dim = 32
    means, patches = unit_rows(20, dim, seed=0), unit_rows(300, dim, seed=1)
    posterior = diag_posterior(means, torch.full((20,), 1 / 20))
    cosine = patch_scores(posterior, patches, "cosine")
    euclidean = patch_scores(posterior, patches, "euclidean")
    # A dot product of unit vectors rounds by at most about dim * eps in float32.
    assert torch.allclose(cosine, euclidean**2 / 2, rtol=0, atol=4 * dim * EPS32)


@pytest.mark.parametrize("score", ["cosine", "euclidean"], ids=["cosine", "euclidean"])
def test_patch_scores_match_brute_force(score):
    means = torch.randn(15, 24, generator=torch.Generator().manual_seed(2)) + 2
    patches = torch.randn(257, 24, generator=torch.Generator().manual_seed(3)) + 2
    posterior = diag_posterior(means, torch.full((15,), 1 / 15))
    result = patch_scores(posterior, patches, score, chunk_size=50)
    reference = nearest_cosine(patches, means) if score == "cosine" else nearest_euclidean(patches, means)
    scale = reference.abs().max().item()
    assert result.shape == (257,)
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), reference, rtol=0, atol=4 * 24 * EPS32 * max(1.0, scale**2))


def test_min_weight_skips_light_component():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    posterior = diag_posterior(means, torch.tensor([1e-8, 1.0 - 1e-8]))
    patch = torch.tensor([[1.0, 0.0]])  # on the light component's mean
    assert patch_scores(posterior, patch, "cosine").item() == pytest.approx(1.0, abs=EPS32)
    assert patch_scores(posterior, patch, "euclidean").item() == pytest.approx(math.sqrt(2), abs=4 * EPS32)
    assert patch_scores(posterior, patch, "mahalanobis").item() == pytest.approx(math.sqrt(2), abs=4 * EPS32)
    assert patch_scores(posterior, patch, "cosine", min_weight=0.0).item() == pytest.approx(0.0, abs=4 * EPS32)


def test_no_component_above_min_weight():
    posterior = diag_posterior(torch.zeros(3, 2), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match=r"no component has expected weight above min_weight=0.5; the largest weight is 0.333"):
        patch_scores(posterior, torch.zeros(4, 2), min_weight=0.5)


def test_unknown_score_name():
    posterior = diag_posterior(torch.zeros(2, 2), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"score must be one of \['cosine', 'euclidean', 'mahalanobis', 'nll'\], got 'l1'"):
        patch_scores(posterior, torch.zeros(4, 2), "l1")


def test_patch_dimension_mismatch():
    posterior = diag_posterior(torch.zeros(2, 3), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"patches must have shape \(num_patches, 3\).*got \(4, 2\)"):
        patch_scores(posterior, torch.zeros(4, 2))


def test_mahalanobis_full_matches_brute_force():
    generator = torch.Generator().manual_seed(4)
    dim, num_components = 5, 4
    means = torch.randn(num_components, dim, generator=generator, dtype=torch.float64)
    factors = torch.randn(num_components, dim, dim, generator=generator, dtype=torch.float64) * 0.3
    precision = factors @ factors.transpose(1, 2) + torch.eye(dim, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2 - 1e-9, 1e-9], dtype=torch.float64)
    posterior = Posterior(family="full", params={"loc": means, "precision_tril": torch.linalg.cholesky(precision)},
                          log_weights=weights.log())
    patches = torch.randn(40, dim, generator=generator, dtype=torch.float64)
    difference = patches[:, None, :] - means[None, :3, :]  # N K D, the three kept components
    squared = torch.einsum("nkd,kde,nke->nk", difference, precision[:3], difference)
    reference = squared.min(dim=1).values.sqrt()
    result = patch_scores(posterior, patches, "mahalanobis")
    assert torch.allclose(result.double(), reference, rtol=16 * EPS32, atol=0)


def test_nll_matches_mixture_density():
    generator = torch.Generator().manual_seed(5)
    means = torch.randn(3, 4, generator=generator)
    precision = torch.rand(3, 4, generator=generator) + 0.5
    weights = torch.tensor([0.6, 0.3, 0.1])
    patches = torch.randn(25, 4, generator=generator)
    components = torch.distributions.Normal(means.double(), precision.double().rsqrt())
    log_joint = components.log_prob(patches.double()[:, None, :]).sum(-1) + weights.double().log()  # N K
    reference = -torch.logsumexp(log_joint, dim=1)
    result = patch_scores(diag_posterior(means, weights, precision), patches, "nll")
    assert torch.allclose(result.double(), reference, rtol=64 * EPS32, atol=64 * EPS32)


@pytest.mark.parametrize("score", SCORE_NAMES, ids=list(SCORE_NAMES))
def test_float16_memmap_patches(score, tmp_path):
    generator = torch.Generator().manual_seed(6)
    patches = torch.randn(130, 8, generator=generator)
    stored = np.lib.format.open_memmap(tmp_path / "patches.npy", mode="w+", dtype=np.float16, shape=(130, 8))
    stored[:] = patches.numpy()
    stored.flush()
    posterior = diag_posterior(torch.randn(6, 8, generator=generator), torch.full((6,), 1 / 6))
    from_memmap = patch_scores(posterior, np.load(tmp_path / "patches.npy", mmap_mode="r"), score, chunk_size=32)
    from_tensor = patch_scores(posterior, torch.from_numpy(stored.astype(np.float32)), score, chunk_size=32)
    assert torch.equal(from_memmap, from_tensor)


# -- memory bank ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"], ids=["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 5000], ids=["c1", "c7", "c64", "c5000"])
def test_memory_bank_matches_cdist(metric, chunk_size):
    generator = torch.Generator().manual_seed(7)
    bank = torch.randn(203, 16, generator=generator) + 1
    queries = torch.randn(97, 16, generator=generator) + 1
    result = MemoryBank(bank, metric, chunk_size, backend="torch").score(queries)
    reference = nearest_cosine(queries, bank) if metric == "cosine" else nearest_euclidean(queries, bank)
    if metric == "cosine":
        assert torch.allclose(result.double(), reference, rtol=0, atol=4 * 16 * EPS32)
    else:
        # The expansion rounds the squared distance by about dim * eps * (||q - c||^2 + ||p - c||^2).
        scale = 2 * ((torch.cat([bank, queries]) - bank.mean(0)) ** 2).sum(1).max().item()
        assert torch.allclose(result.double() ** 2, reference**2, rtol=0, atol=4 * 16 * EPS32 * scale)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["float16", "float32"])
def test_memory_bank_read_only_memmap(dtype, tmp_path):
    generator = torch.Generator().manual_seed(8)
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=dtype, shape=(150, 12))
    bank[:] = torch.randn(150, 12, generator=generator).numpy()
    bank.flush()
    queries = torch.randn(30, 12, generator=generator).numpy().astype(dtype)
    loaded = np.load(tmp_path / "bank.npy", mmap_mode="r")
    result = MemoryBank(loaded, "euclidean", chunk_size=40, backend="torch").score(queries)
    reference = nearest_euclidean(torch.from_numpy(queries.astype(np.float32)), torch.from_numpy(bank.astype(np.float32)))
    assert torch.allclose(result.double(), reference, rtol=0, atol=1e-4 * reference.max().item())


def test_memory_bank_zero_vector_cosine():
    bank = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    result = MemoryBank(bank, "cosine", backend="torch").score(torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    assert result[0].item() == 1.0
    assert result[1].item() == pytest.approx(1.0)


def test_memory_bank_rejects_nan_query():
    bank = MemoryBank(torch.zeros(5, 3), "euclidean", chunk_size=2, backend="torch")
    queries = torch.zeros(6, 3)
    queries[4, 1] = math.nan
    with pytest.raises(ValueError, match=r"queries must be finite, but row 4 contains NaN"):
        bank.score(queries)


def test_memory_bank_rejects_bad_metric():
    with pytest.raises(ValueError, match=r"metric must be one of \['cosine', 'euclidean'\], got 'manhattan'"):
        MemoryBank(torch.zeros(5, 3), "manhattan")


def test_memory_bank_faiss_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    bank = MemoryBank(torch.zeros(5, 3), backend="auto")
    assert bank.backend == "torch"
    with pytest.raises(ValueError, match=r"backend='faiss' requires the faiss package"):
        MemoryBank(torch.zeros(5, 3), backend="faiss")


class _ExactFlatIndex:
    """A numpy stand-in for faiss.IndexFlatIP and faiss.IndexFlatL2 with their add and search calls."""

    def __init__(self, dim: int, inner_product: bool):
        self.rows = np.empty((0, dim), dtype=np.float32)
        self.inner_product = inner_product

    def add(self, rows):
        assert rows.dtype == np.float32
        assert rows.flags.c_contiguous
        self.rows = np.concatenate([self.rows, rows])

    def search(self, queries, k):
        if self.inner_product:
            values = queries @ self.rows.T
            order = np.argsort(-values, axis=1)[:, :k]
        else:
            values = ((queries[:, None, :] - self.rows[None]) ** 2).sum(-1)
            order = np.argsort(values, axis=1)[:, :k]
        return np.take_along_axis(values, order, axis=1).astype(np.float32), order


@pytest.mark.parametrize("metric", ["cosine", "euclidean"], ids=["cosine", "euclidean"])
def test_memory_bank_faiss_adapter(metric, monkeypatch):
    stand_in = types.SimpleNamespace(
        IndexFlatIP=lambda dim: _ExactFlatIndex(dim, True), IndexFlatL2=lambda dim: _ExactFlatIndex(dim, False)
    )
    monkeypatch.setitem(sys.modules, "faiss", stand_in)
    generator = torch.Generator().manual_seed(9)
    bank_rows, queries = torch.randn(60, 6, generator=generator), torch.randn(25, 6, generator=generator)
    bank = MemoryBank(bank_rows, metric, chunk_size=16, backend="faiss")
    reference = nearest_cosine(queries, bank_rows) if metric == "cosine" else nearest_euclidean(queries, bank_rows)
    assert bank.backend == "faiss"
    assert torch.allclose(bank.score(queries).double(), reference, rtol=0, atol=1e-5)


# -- image scores ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_patches", "expected_count"),
    [(1, 1), (99, 1), (100, 1), (199, 1), (200, 2), (1024, 10), (1369, 13)],
    ids=["n1", "n99", "n100", "n199", "n200", "n1024", "n1369"],
)
def test_top_patch_count(num_patches, expected_count):
    assert top_patch_count(num_patches, 0.01) == expected_count


def test_top_patch_count_rounding():
    assert top_patch_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in float64


def test_image_score_top_percent():
    scores = torch.randperm(1024, generator=torch.Generator().manual_seed(10)).float()
    assert image_score(scores) == pytest.approx(np.mean(np.arange(1014, 1024)))


def test_image_score_few_patches_is_max():
    scores = np.random.default_rng(11).normal(size=99)
    assert image_score(scores) == scores.max()


def test_image_scores_batched():
    scores = torch.randn(5, 450, generator=torch.Generator().manual_seed(12))
    batched = image_scores(scores, top_fraction=0.05)
    assert batched.shape == (5,)
    for row, value in zip(scores, batched):
        assert value == pytest.approx(image_score(row, top_fraction=0.05), rel=1e-12)


def test_image_score_rejects_fraction():
    with pytest.raises(ValueError, match=r"top_fraction must lie in \(0, 1\], got 0"):
        image_score(np.ones(10), top_fraction=0)


def test_image_score_rejects_nan():
    with pytest.raises(ValueError, match=r"patch_scores must be finite"):
        image_score(np.array([1.0, np.nan]))


# -- anomaly maps ----------------------------------------------------------------------


def test_anomaly_map_shape_and_dtype():
    result = anomaly_map(torch.rand(32 * 24), (32, 24), (256, 200))
    assert result.shape == (256, 200)
    assert result.dtype == np.float32


@pytest.mark.parametrize("sigma", [0.0, 4.0], ids=["raw", "smoothed"])
def test_anomaly_map_constant_grid(sigma):
    result = anomaly_map(np.full(16 * 16, 0.37), (16, 16), (240, 240), sigma=sigma)
    assert np.allclose(result, np.float32(0.37), rtol=4 * EPS32, atol=0)


def test_anomaly_map_bilinear_by_hand():
    # align_corners=False puts each grid value at the centre of a 2x2 block; the
    # outer half-blocks clamp to the edge value.
    result = anomaly_map(np.array([0.0, 1.0, 2.0, 3.0]), (2, 2), (4, 4))
    assert np.allclose(result[0], [0.0, 0.25, 0.75, 1.0])
    assert np.allclose(result[:, 0], [0.0, 0.5, 1.5, 2.0])


def test_anomaly_map_smoothing_lowers_peak():
    scores = np.zeros(8 * 8)
    scores[27] = 1.0
    raw, smoothed = anomaly_map(scores, (8, 8), (64, 64)), anomaly_map(scores, (8, 8), (64, 64), sigma=3.0)
    assert smoothed.max() < raw.max()
    assert smoothed.sum() == pytest.approx(raw.sum(), rel=1e-4)


def test_anomaly_map_grid_mismatch():
    with pytest.raises(ValueError, match=r"patch_scores must have grid_h \* grid_w = 12 entries for grid \(3, 4\), got 10"):
        anomaly_map(np.zeros(10), (3, 4), (30, 40))
