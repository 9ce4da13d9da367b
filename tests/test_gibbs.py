"""Tests of the conjugate cluster statistics and the collapsed Gibbs sampler.

Distributional tests compare sampler frequencies with exact probabilities by a chi-square
or Kolmogorov-Smirnov test at a fixed significance level. Under a correct sampler each
fails with probability ``SIGNIFICANCE``, and every test is seeded, so a pass is reproducible.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import gammaln

from dinodpmm.inference.conjugate import (
    DowndateError,
    NormalGamma,
    NormalInverseWishart,
    rank_one_inverse_cholesky_update,
)
from dinodpmm.inference.gibbs import (
    CollapsedGibbsChain,
    component_count,
    crp_log_probability,
    expected_num_clusters,
    fit_gibbs,
    update_alpha,
)
from dinodpmm.inference.posterior import Posterior

SIGNIFICANCE = 1e-3
# Rounding error of float64 sums of a few hundred terms of order 100.
FLOAT_TOLERANCE = 1e-9


def small_prior(family, dim):
    if family == "diag":
        return NormalGamma(np.zeros(dim), kappa0=0.5, shape=2.0, rate=np.ones(dim))
    return NormalInverseWishart(np.zeros(dim), kappa0=0.5, nu0=dim + 2.0, scale=np.eye(dim))


def separated_data(num_points=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    labels = rng.integers(0, 3, num_points)
    return centers[labels] + 0.7 * rng.standard_normal((num_points, 2)), labels


def set_partitions(num_points):
    """Yield every partition of ``range(num_points)`` as labels in order of first appearance."""
    if num_points == 0:
        yield ()
        return
    for head in set_partitions(num_points - 1):
        for label in range(max(head, default=-1) + 2):
            yield (*head, label)


def exact_partition_posterior(points, prior, alpha):
    partitions = list(set_partitions(len(points)))
    log_joint = []
    for partition in partitions:
        labels = np.array(partition)
        log_likelihood = sum(prior.log_marginal(points[labels == k]) for k in range(labels.max() + 1))
        log_joint.append(crp_log_probability(np.bincount(labels), alpha) + log_likelihood)
    log_joint = np.array(log_joint)
    return partitions, np.exp(log_joint - np.logaddexp.reduce(log_joint))


def unsigned_stirling_first(n):
    """Return |s(n, k)| for k = 0 .. n."""
    table = np.zeros(n + 1)
    table[0] = 1.0
    for m in range(n):
        table[1:] = table[:-1] + m * table[1:]
        table[0] = 0.0
    return table


def chi_square_pvalue(observed, expected):
    return stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


# -- conjugate statistics ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["diag", "full"], ids=["normal-gamma", "normal-inverse-wishart"])
def test_predictive_chain_rule(family):
    rng = np.random.default_rng(0)
    points = rng.standard_normal((6, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 0.0]
    prior = small_prior(family, 3)
    statistics = prior.cluster_statistics(capacity=2)
    sequential = statistics.log_predictive_new(points[0])
    statistics.add(0, points[0])
    for x in points[1:]:
        sequential += statistics.log_predictive(x, 1)[0]
        statistics.add(0, x)
    assert sequential == pytest.approx(prior.log_marginal(points), abs=FLOAT_TOLERANCE)
    assert statistics.log_marginal(np.array([0]))[0] == pytest.approx(prior.log_marginal(points), abs=FLOAT_TOLERANCE)


@pytest.mark.parametrize("family", ["diag", "full"], ids=["normal-gamma", "normal-inverse-wishart"])
def test_predictive_normalised(family):
    # One-dimensional predictive integrates to one on a fine grid.
    prior = small_prior(family, 1)
    statistics = prior.cluster_statistics(capacity=1)
    for x in (0.3, -0.5, 1.2):
        statistics.add(0, np.array([x]))
    grid = np.linspace(-200, 200, 400_001)
    density = np.exp([statistics.log_predictive(np.array([g]), 1)[0] for g in grid[::100]])
    mass = np.trapezoid(density, grid[::100])
    # Student-t tails beyond |200| hold well under 1e-3 of the mass at these degrees of freedom.
    assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("family", ["diag", "full"], ids=["normal-gamma", "normal-inverse-wishart"])
def test_rank_one_updates_match_refactorisation(family):
    rng = np.random.default_rng(1)
    points = rng.standard_normal((60, 4)) @ rng.standard_normal((4, 4)) + 3.0
    prior = (NormalGamma if family == "diag" else NormalInverseWishart).from_data(points)
    labels = rng.integers(0, 3, len(points))
    updated = prior.cluster_statistics(capacity=3)
    for x, label in zip(points, labels):
        updated.add(label, x)
    for index in rng.integers(0, len(points), 200):
        updated.remove(labels[index], points[index])
        labels[index] = rng.integers(0, 3)
        updated.add(labels[index], points[index])
    direct = prior.cluster_statistics(capacity=3)
    direct.reset(points, labels, num_slots=3)
    slot_arrays = ["counts", "kappa", "loc"] + (
        ["gamma_rate"] if family == "diag" else ["inverse_cholesky", "log_det_scale"]
    )
    for name in slot_arrays:
        np.testing.assert_allclose(getattr(updated, name)[:3], getattr(direct, name)[:3], rtol=1e-9, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(updated.log_predictive(points[0], 3), direct.log_predictive(points[0], 3), rtol=1e-10)


def test_inverse_cholesky_downdate():
    rng = np.random.default_rng(2)
    root = rng.standard_normal((5, 5))
    matrix = root @ root.T + np.eye(5)
    vector = rng.standard_normal(5)
    inverse_cholesky = np.linalg.inv(np.linalg.cholesky(matrix + np.outer(vector, vector)))
    updated, log_ratio = rank_one_inverse_cholesky_update(inverse_cholesky, inverse_cholesky @ vector, -1.0)
    np.testing.assert_allclose(updated, np.linalg.inv(np.linalg.cholesky(matrix)), atol=1e-10)
    expected_ratio = np.linalg.slogdet(matrix)[1] - np.linalg.slogdet(matrix + np.outer(vector, vector))[1]
    assert log_ratio == pytest.approx(expected_ratio, abs=1e-10)


def test_inverse_cholesky_downdate_singular():
    vector = np.array([1.0, 2.0])
    matrix = np.outer(vector, vector) + 1e-12 * np.eye(2)
    inverse_cholesky = np.linalg.inv(np.linalg.cholesky(matrix))
    with pytest.raises(DowndateError, match="determinant ratio"):
        rank_one_inverse_cholesky_update(inverse_cholesky, inverse_cholesky @ vector, -1.0)


# -- exactness of the sampler ------------------------------------------------------------


def partition_frequencies(chain, partitions, num_samples, thin, move):
    index = {partition: i for i, partition in enumerate(partitions)}
    counts = np.zeros(len(partitions))
    for step in range(num_samples * thin):
        move(chain)
        if step % thin == thin - 1:
            counts[index[chain.partition()]] += 1
    return counts


def gibbs_move(chain):
    chain.gibbs_scan()


def split_merge_move(chain):
    chain.split_merge_move()


ENUMERATION_CASES = [
    # family, number of points, dimension, move, samples, thinning
    ("diag", 5, 1, gibbs_move, 2500, 5),
    ("full", 4, 2, gibbs_move, 2000, 5),
    ("diag", 4, 1, split_merge_move, 1500, 5),
]


@pytest.mark.parametrize(
    "family, num_points, dim, move, num_samples, thin",
    ENUMERATION_CASES,
    ids=["gibbs-diag-5", "gibbs-full-4", "split-merge-diag-4"],
)
def test_partition_frequencies_exact(family, num_points, dim, move, num_samples, thin):
    rng = np.random.default_rng(3)
    points = rng.standard_normal((num_points, dim))
    prior = small_prior(family, dim)
    alpha = 1.3
    partitions, probability = exact_partition_posterior(points, prior, alpha)
    chain = CollapsedGibbsChain(points, prior, alpha, np.random.default_rng(4))
    chain.initialise()
    observed = partition_frequencies(chain, partitions, num_samples, thin, move)
    # Thinning makes successive kept partitions close to independent, as the chi-square
    # test assumes; every expected count is at least 5 for this data.
    assert (probability * num_samples).min() >= 5
    assert chi_square_pvalue(observed, probability) > SIGNIFICANCE


def test_prior_only_matches_crp():
    num_points, alpha, num_samples, thin = 8, 1.5, 3000, 3
    points = np.random.default_rng(5).standard_normal((num_points, 1))
    chain = CollapsedGibbsChain(points, small_prior("diag", 1), alpha, np.random.default_rng(6), likelihood=False)
    chain.initialise()
    observed = np.zeros(num_points + 1)
    for step in range(num_samples * thin):
        chain.gibbs_scan()
        if step % thin == thin - 1:
            observed[chain.num_clusters] += 1
    # P(K = k) = alpha^k |s(n, k)| Gamma(alpha) / Gamma(alpha + n).
    k = np.arange(num_points + 1)
    with np.errstate(divide="ignore"):
        log_pmf = k * math.log(alpha) + np.log(unsigned_stirling_first(num_points))
    pmf = np.exp(log_pmf + gammaln(alpha) - gammaln(alpha + num_points))
    assert pmf.sum() == pytest.approx(1.0, abs=FLOAT_TOLERANCE)
    # Pool the rare large counts into one cell so that every expected count is at least 5.
    cutoff = 5
    observed_cells = np.append(observed[1:cutoff], observed[cutoff:].sum())
    expected_cells = np.append(pmf[1:cutoff], pmf[cutoff:].sum())
    assert chi_square_pvalue(observed_cells, expected_cells) > SIGNIFICANCE
    mean_error = 4 * math.sqrt(thin * (pmf * k**2).sum() / num_samples)  # 4 standard errors, loose for autocorrelation
    assert observed @ k / num_samples == pytest.approx(expected_num_clusters(alpha, num_points), abs=mean_error)


def draw_crp_num_clusters(alpha, num_points, rng):
    num_clusters = 1
    for i in range(1, num_points):
        num_clusters += rng.random() < alpha / (alpha + i)
    return num_clusters


def alpha_posterior_cdf(shape, rate, num_clusters, num_points, grid):
    # p(alpha | k) is proportional to Gamma(alpha; shape, rate) alpha^k Gamma(alpha) / Gamma(alpha + n).
    log_density = (
        (shape - 1 + num_clusters) * np.log(grid) - rate * grid + gammaln(grid) - gammaln(grid + num_points)
    )
    density = np.exp(log_density - log_density.max())
    cdf = np.concatenate(([0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))))
    return cdf / cdf[-1]


def test_alpha_update_calibrated():
    # Draw (alpha, k) from the joint prior and apply the update a few times: the result is
    # again a draw from p(alpha | k), so its CDF value under that posterior is uniform.
    shape, rate, num_points, num_replicates, num_updates = 2.0, 1.0, 50, 1000, 3
    rng = np.random.default_rng(7)
    grid = np.linspace(1e-6, 40.0, 40_001)  # Gamma(2, 1) puts under 1e-15 of its mass above 40
    cdfs = {}
    pit = np.empty(num_replicates)
    for replicate in range(num_replicates):
        alpha = rng.gamma(shape, 1.0 / rate)
        num_clusters = draw_crp_num_clusters(alpha, num_points, rng)
        for _ in range(num_updates):
            alpha = update_alpha(alpha, num_clusters, num_points, shape, rate, rng)
        if num_clusters not in cdfs:
            cdfs[num_clusters] = alpha_posterior_cdf(shape, rate, num_clusters, num_points, grid)
        pit[replicate] = np.interp(alpha, grid, cdfs[num_clusters])
    assert stats.kstest(pit, "uniform").pvalue > SIGNIFICANCE


def test_alpha_update_ignoring_clusters_fails():
    # The calibration statistic detects an update that ignores the data: redrawing alpha
    # from the prior keeps the prior marginal but not p(alpha | k).
    shape, rate, num_points, num_replicates = 2.0, 1.0, 50, 1000
    rng = np.random.default_rng(8)
    grid = np.linspace(1e-6, 40.0, 40_001)
    cdfs = {}
    pit = np.empty(num_replicates)
    for replicate in range(num_replicates):
        alpha = rng.gamma(shape, 1.0 / rate)
        num_clusters = draw_crp_num_clusters(alpha, num_points, rng)
        wrong = rng.gamma(shape, 1.0 / rate)
        if num_clusters not in cdfs:
            cdfs[num_clusters] = alpha_posterior_cdf(shape, rate, num_clusters, num_points, grid)
        pit[replicate] = np.interp(wrong, grid, cdfs[num_clusters])
    assert stats.kstest(pit, "uniform").pvalue < SIGNIFICANCE


# -- fit_gibbs ---------------------------------------------------------------------------


def test_separated_clusters_converge():
    points, _ = separated_data()
    posterior = fit_gibbs(points, num_chains=4, num_sweeps=100, burn_in=30, seed=1, progress=False)
    count = component_count(posterior)
    assert count.pmf().get(3, 0.0) > 0.9
    kept_counts = np.array(posterior.trace["num_clusters"], dtype=np.float64)[:, 30:]  # chain draw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23 warns about its refactor on import
        import arviz
    assert float(arviz.rhat(kept_counts)) < 1.01


def test_effective_components_per_chain():
    # Four chains each settle on the three clusters. The pooled weights contain twelve
    # clusters of about 1/12, while each draw needs three for 99% of its mass.
    points, _ = separated_data()
    posterior = fit_gibbs(points, num_chains=4, num_sweeps=40, burn_in=20, seed=1, progress=False)
    pooled = torch.sort(posterior.weights, descending=True).values
    assert torch.cumsum(pooled, 0)[2] < 0.5
    assert posterior.effective_components(0.99) == 3


@pytest.fixture(scope="module")
def small_posterior():
    points, _ = separated_data(num_points=120, seed=2)
    posterior = fit_gibbs(
        torch.as_tensor(points, dtype=torch.float32), covariance="full", alpha_prior=(1.0, 1.0),
        num_chains=2, num_sweeps=12, burn_in=4, thin=2, split_merge=True, seed=3, progress=False,
    )
    return posterior, points


def test_fit_gibbs_posterior_fields(small_posterior):
    posterior, points = small_posterior
    num_kept = 2 * len(range(4, 12, 2))
    assert posterior.algorithm == "gibbs"
    assert posterior.family == "full"
    assert posterior.weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert posterior.params["precision_tril"].shape == (posterior.truncation, 2, 2)
    assert posterior.draws["weights"].shape[0] == num_kept
    assert posterior.draws["loc"].shape[:2] == posterior.draws["weights"].shape
    np.testing.assert_allclose(posterior.draws["weights"].sum(1).numpy(), 1.0, atol=1e-5)
    assert len(posterior.alpha["samples"]) == num_kept
    assert [len(trace) for trace in posterior.trace["num_clusters"]] == [12, 12]
    assert posterior.settings["num_points"] == 120
    assert posterior.settings["split_merge"] == 1


def test_fit_gibbs_scoring(small_posterior):
    posterior, points = small_posterior
    log_density = posterior.log_density(points)
    assert log_density.shape == (len(points),)
    assert torch.isfinite(log_density).all()
    assert posterior.assign(points).shape == (len(points),)
    assert posterior.num_components(len(points), num_samples=50).samples.min() >= 1


def test_fit_gibbs_save_load(small_posterior, tmp_path):
    posterior, points = small_posterior
    path = tmp_path / "gibbs.safetensors"
    posterior.save(path)
    loaded = Posterior.load(path)
    torch.testing.assert_close(loaded.log_density(points), posterior.log_density(points))
    assert loaded.trace == posterior.trace
    assert loaded.settings == posterior.settings


def test_fit_gibbs_deterministic():
    points, _ = separated_data(num_points=60, seed=4)
    first = fit_gibbs(points, num_chains=2, num_sweeps=5, burn_in=1, seed=11, progress=False)
    second = fit_gibbs(points, num_chains=2, num_sweeps=5, burn_in=1, seed=11, progress=False)
    assert first.trace == second.trace
    torch.testing.assert_close(first.draws["loc"], second.draws["loc"])


def test_fit_gibbs_memmap_subsample(tmp_path):
    points, _ = separated_data(num_points=400, seed=5)
    path = tmp_path / "embeddings.f16"
    stored = np.memmap(path, dtype=np.float16, mode="w+", shape=points.shape)
    stored[:] = points
    stored.flush()
    data = np.memmap(path, dtype=np.float16, mode="r", shape=points.shape)
    posterior = fit_gibbs(data, num_chains=1, num_sweeps=3, burn_in=1, subsample=150, progress=False)
    assert posterior.settings["subsample"] == 150
    assert posterior.settings["num_points"] == 150
    assert posterior.settings["total_points"] == 400


def test_fit_gibbs_subsample_too_large_warns():
    points, _ = separated_data(num_points=30, seed=6)
    with pytest.warns(UserWarning, match="exceeds the 30 points"):
        posterior = fit_gibbs(points, num_chains=1, num_sweeps=2, burn_in=0, subsample=50, progress=False)
    assert posterior.settings["num_points"] == 30


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"covariance": "spherical"}, "covariance must be one of"),
        ({"alpha": 0.0}, "alpha must be a positive number"),
        ({"alpha_prior": (1.0, -1.0)}, "alpha_prior must be a"),
        ({"num_chains": 0}, "num_chains must be an integer of at least 1"),
        ({"num_sweeps": 10, "burn_in": 10}, r"burn_in must be an integer in \[0, num_sweeps\)"),
        ({"thin": 0}, "thin must be an integer of at least 1"),
        ({"subsample": 1}, "subsample must be None or an integer of at least 2"),
        ({"split_merge": -1}, "split_merge must be a bool or a non-negative integer"),
        ({"prior": NormalGamma(np.zeros(2), 0.1, 1.0, np.ones(2)), "covariance": "full"}, "prior is a NormalGamma"),
        ({"prior": NormalGamma(np.zeros(3), 0.1, 1.0, np.ones(3))}, "prior has dimension 3"),
    ],
    ids=["covariance", "alpha", "alpha-prior", "chains", "burn-in", "thin", "subsample", "split-merge",
         "prior-family", "prior-dim"],
)
def test_fit_gibbs_invalid_arguments(arguments, message):
    points, _ = separated_data(num_points=20, seed=7)
    with pytest.raises(ValueError, match=message):
        fit_gibbs(points, progress=False, **arguments)


def test_fit_gibbs_rejects_nonfinite():
    points, _ = separated_data(num_points=20, seed=8)
    points[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_gibbs(points, progress=False)
