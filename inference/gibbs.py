"""Collapsed Gibbs sampling for the Dirichlet process mixture of Gaussians.

The sampler is Algorithm 3 of Neal (2000), "Markov chain sampling methods for Dirichlet
process mixture models". The component parameters are integrated out under a conjugate
prior (:mod:`dinodpmm.inference.conjugate`) and the mixture weights under the Chinese
restaurant process (CRP). Each point is then reassigned in turn given all others, with
probability proportional to ``n_k p(x | cluster k)`` for an existing cluster and
``alpha p(x)`` for a new one.

Optional moves on top of the point-wise scan:

- the concentration ``alpha`` under a Gamma(shape, rate) prior, resampled once per sweep
  with the auxiliary-variable step of Escobar and West (1995);
- split-merge proposals with a restricted Gibbs launch state (Jain and Neal 2004,
  "A split-merge Markov chain Monte Carlo procedure for the Dirichlet process mixture
  model", conjugate case), which move whole clusters where single-point moves would have
  to pass through low-probability states.

Sequential sampling costs one Python-level step per point, so :func:`fit_gibbs` runs on a
random subsample when the data are large.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import gammaln
from sklearn.cluster import kmeans_plusplus
from tqdm.auto import tqdm

from .conjugate import ConjugatePrior, DowndateError, NormalGamma, NormalInverseWishart
from .posterior import ComponentCount, Posterior

logger = logging.getLogger(__name__)

_PRIORS = {"diag": NormalGamma, "full": NormalInverseWishart}

# Split-merge proposals per sweep when `split_merge=True`, and restricted Gibbs scans
# that move the launch state towards a plausible split before the final proposal scan.
# Both are estimates: each proposal costs about (scans + 1) x (size of the two clusters)
# point updates, so one proposal with 5 scans already costs a few sweeps on balanced data.
_DEFAULT_SPLIT_MERGE_PROPOSALS = 1
_INTERMEDIATE_SCANS = 5

# Floor on the per-dimension standard deviation when standardising for the k-means++
# seeding, so a constant dimension does not divide by zero.
_STD_FLOOR = 1e-12


def update_alpha(
    alpha: float, num_clusters: int, num_points: int, shape: float, rate: float, rng: np.random.Generator
) -> float:
    """Draw the concentration given the number of clusters (Escobar and West 1995).

    With ``alpha ~ Gamma(shape, rate)`` and ``k`` clusters among ``n`` points, draw
    ``eta ~ Beta(alpha + 1, n)``, then ``alpha`` from the two-component mixture
    ``pi Gamma(shape + k, rate - log eta) + (1 - pi) Gamma(shape + k - 1, rate - log eta)``
    with ``pi / (1 - pi) = (shape + k - 1) / (n (rate - log eta))``. The step leaves
    ``p(alpha | k, n)`` invariant.
    """
    eta = rng.beta(alpha + 1.0, num_points)
    posterior_rate = rate - math.log(eta)
    odds = (shape + num_clusters - 1) / (num_points * posterior_rate)
    posterior_shape = shape + num_clusters if rng.random() < odds / (1.0 + odds) else shape + num_clusters - 1
    return float(rng.gamma(posterior_shape, 1.0 / posterior_rate))


def expected_num_clusters(alpha: float, num_points: int) -> float:
    """Return the CRP prior mean of the number of clusters, ``sum_{i<n} alpha / (alpha + i)``."""
    return float((alpha / (alpha + np.arange(num_points))).sum())


def crp_log_probability(counts: Sequence[int], alpha: float) -> float:
    """Return the CRP log-probability of a partition with cluster sizes ``counts``.

    ``log p = k log alpha + sum_j log Gamma(n_j) + log Gamma(alpha) - log Gamma(alpha + n)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    num_points = counts.sum()
    return float(
        len(counts) * math.log(alpha) + gammaln(counts).sum() + gammaln(alpha) - gammaln(alpha + num_points)
    )


class CollapsedGibbsChain:
    """One Markov chain over partitions of ``points`` (Neal 2000, Algorithm 3).

    Clusters live in numbered slots of a :class:`~dinodpmm.inference.conjugate.ClusterStatistics`;
    slots ``0 .. num_slots - 1`` are in use and empty ones among them are reused for new
    clusters. :meth:`compact` renumbers the clusters by decreasing size and rebuilds every
    slot from its points.

    Parameters
    ----------
    points : np.ndarray of shape (num_points, dim)
        Data, float64.
    prior : ConjugatePrior
        Base measure of the component parameters.
    alpha : float
        Concentration, or its initial value when ``alpha_prior`` is set.
    alpha_prior : tuple of float or None
        ``(shape, rate)`` of a Gamma prior on ``alpha``.
    split_merge_proposals : int
        Split-merge proposals per :meth:`sweep`; 0 disables them.
    rng : np.random.Generator
    likelihood : bool
        False replaces every predictive density by 1, so the chain samples the CRP prior;
        this is for testing the sampler against closed-form CRP results.
    """

    def __init__(
        self,
        points: np.ndarray,
        prior: ConjugatePrior,
        alpha: float,
        rng: np.random.Generator,
        *,
        alpha_prior: tuple[float, float] | None = None,
        split_merge_proposals: int = 0,
        likelihood: bool = True,
    ):
        self.points = points
        self.num_points = len(points)
        self.prior = prior
        self.alpha = float(alpha)
        self.alpha_prior = alpha_prior
        self.split_merge_proposals = split_merge_proposals
        self.rng = rng
        self.likelihood = likelihood
        self.statistics = prior.cluster_statistics(capacity=16)
        self._scratch = prior.cluster_statistics(capacity=2)  # the two clusters of a split-merge proposal
        self.labels = np.full(self.num_points, -1, dtype=np.int64)
        self.num_slots = 0
        self._free_slots: list[int] = []
        self._log_counts = np.full(self.statistics.capacity, -np.inf)
        self.num_accepted_splits = 0
        self.num_accepted_merges = 0

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def num_clusters(self) -> int:
        return int(np.count_nonzero(self.statistics.counts[: self.num_slots]))

    def _open_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        slot = self.num_slots
        self.num_slots += 1
        self._ensure_spare_slot()
        return slot

    def _ensure_spare_slot(self) -> None:
        # Slot `num_slots` must exist and hold the prior: `_reassign` reads the new-cluster
        # predictive from it.
        if self.num_slots + 1 > self.statistics.capacity:
            self.statistics.grow(self.num_slots + 1)
        if len(self._log_counts) < self.statistics.capacity:
            grown = np.full(self.statistics.capacity, -np.inf)
            grown[: len(self._log_counts)] = self._log_counts
            self._log_counts = grown

    def _add(self, index: int, slot: int) -> None:
        self.statistics.add(slot, self.points[index])
        self.labels[index] = slot
        self._log_counts[slot] = math.log(self.statistics.counts[slot])

    def _remove(self, index: int) -> None:
        slot = self.labels[index]

        def members():
            indices = np.flatnonzero(self.labels == slot)
            return self.points[indices[indices != index]]

        _remove_point(self.statistics, slot, self.points[index], members)
        self.labels[index] = -1
        count = self.statistics.counts[slot]
        if count == 0:
            self._free_slots.append(slot)
            self._log_counts[slot] = -np.inf
        else:
            self._log_counts[slot] = math.log(count)

    def compact(self) -> None:
        """Renumber the clusters ``0 .. K - 1`` by decreasing size and rebuild their statistics."""
        counts = self.statistics.counts[: self.num_slots]
        occupied = np.flatnonzero(counts)
        occupied = occupied[np.argsort(-counts[occupied], kind="stable")]
        mapping = np.full(max(self.num_slots, 1), -1, dtype=np.int64)
        mapping[occupied] = np.arange(len(occupied))
        self.labels = mapping[self.labels]
        assert np.all(self.labels >= 0), "every point must belong to an occupied slot"
        self.num_slots = len(occupied)
        self._free_slots = []
        self.statistics.reset(self.points, self.labels, self.num_slots)
        self._ensure_spare_slot()
        self._log_counts = np.full(self.statistics.capacity, -np.inf)
        self._log_counts[: self.num_slots] = np.log(self.statistics.counts[: self.num_slots])

    # -- point-wise moves ----------------------------------------------------------------

    def initialise(self, num_clusters: int | None = None) -> None:
        """Start from a k-means++ seeding: each point joins its nearest of ``num_clusters`` seeds.

        The seeds are drawn on the standardised data with this chain's generator, so chains
        start from different partitions. The default ``num_clusters`` is twice the CRP prior
        mean of the number of clusters. Starting high is deliberate: single-point moves
        empty a surplus cluster easily but seldom open a new one, because under a vague
        prior (small ``kappa0``) a new singleton pays a large Occam penalty.

        NOTE: a surplus cluster that splits a true cluster in two drains by a random walk
        of single points, which takes many sweeps when both halves contain hundreds of
        points; split-merge proposals shorten this.
        """
        if num_clusters is None:
            num_clusters = 2 * math.ceil(expected_num_clusters(self.alpha, self.num_points))
        num_clusters = max(1, min(int(num_clusters), self.num_points))
        scaled = (self.points - self.points.mean(0)) / np.maximum(self.points.std(0), _STD_FLOOR)
        centers, _ = kmeans_plusplus(scaled, num_clusters, random_state=int(self.rng.integers(2**31)))
        squared_distance = (scaled**2).sum(1)[:, None] - 2 * scaled @ centers.T + (centers**2).sum(1)  # N K
        self.labels = np.argmin(squared_distance, axis=1).astype(np.int64)
        self.num_slots = num_clusters
        self.statistics.reset(self.points, self.labels, num_clusters)
        self.compact()

    def gibbs_scan(self) -> None:
        """Reassign every point once, in random order, given all other points."""
        log_alpha = math.log(self.alpha)
        uniforms = self.rng.random(self.num_points)
        for index, uniform in zip(self.rng.permutation(self.num_points), uniforms):
            self._remove(index)
            self._reassign(index, log_alpha, uniform)

    def _reassign(self, index: int, log_alpha: float, uniform: float) -> None:
        # Slot `num_slots` is empty, so its predictive is the prior predictive of a new cluster.
        num_slots = self.num_slots
        log_prob = self._log_counts[: num_slots + 1].copy()
        log_prob[num_slots] = log_alpha
        if self.likelihood:
            log_prob += self.statistics.log_predictive(self.points[index], num_slots + 1)
        choice = _sample_log_categorical(log_prob, uniform)
        self._add(index, self._open_slot() if choice == num_slots else choice)

    # -- split-merge -------------------------------------------------------------------

    def split_merge_move(self) -> bool:
        """Propose one split or merge (Jain and Neal 2004); return whether it was accepted."""
        first = int(self.rng.integers(self.num_points))
        second = int(self.rng.integers(self.num_points - 1))
        second += second >= first  # uniform over the other points
        slot_first, slot_second = self.labels[first], self.labels[second]
        members = np.flatnonzero((self.labels == slot_first) | (self.labels == slot_second))
        others = members[(members != first) & (members != second)]
        group = np.concatenate(([first, second], others))
        # Launch state: `first` in scratch slot 0, `second` in slot 1, the others at random,
        # then a few restricted Gibbs scans.
        group_labels = np.concatenate(([0, 1], self.rng.integers(0, 2, size=len(others))))
        scratch = self._scratch
        scratch.reset(self.points[group], group_labels, num_slots=2)
        for _ in range(_INTERMEDIATE_SCANS):
            self._restricted_scan(scratch, group, group_labels)
        if slot_first == slot_second:
            return self._propose_split(scratch, group, group_labels, slot_first)
        return self._propose_merge(scratch, group, group_labels, slot_first, slot_second)

    def _restricted_scan(self, scratch, group, group_labels, target=None) -> float:
        """Reassign ``group[2:]`` between the two scratch slots; return the log transition probability.

        With ``target`` (labels for the whole group) the scan moves each point to its target
        slot instead of sampling, and returns the probability of that path.
        """
        log_probability = 0.0
        uniforms = self.rng.random(len(group))
        for position in range(2, len(group)):
            index = group[position]
            x = self.points[index]
            slot = group_labels[position]

            def members():
                positions = np.flatnonzero(group_labels == slot)
                return self.points[group[positions[positions != position]]]

            _remove_point(scratch, slot, x, members)
            log_prob = np.log(scratch.counts[:2].astype(np.float64))
            if self.likelihood:
                log_prob = log_prob + scratch.log_predictive(x, 2)
            log_prob = log_prob - np.logaddexp(log_prob[0], log_prob[1])
            choice = int(uniforms[position] >= math.exp(log_prob[0])) if target is None else int(target[position])
            log_probability += log_prob[choice]
            scratch.add(choice, x)
            group_labels[position] = choice
        return log_probability

    def _log_marginals(self, statistics, slots) -> float:
        return float(statistics.log_marginal(np.asarray(slots)).sum()) if self.likelihood else 0.0

    def _propose_split(self, scratch, group, group_labels, slot) -> bool:
        log_proposal = self._restricted_scan(scratch, group, group_labels)
        sizes = scratch.counts[:2].astype(np.float64)
        log_prior_ratio = math.log(self.alpha) + gammaln(sizes).sum() - gammaln(sizes.sum())
        log_likelihood_ratio = self._log_marginals(scratch, [0, 1]) - self._log_marginals(self.statistics, [slot])
        if math.log(self.rng.random()) >= log_prior_ratio + log_likelihood_ratio - log_proposal:
            return False
        new_slot = self._open_slot()
        for scratch_slot, target_slot in ((0, new_slot), (1, slot)):
            indices = group[group_labels == scratch_slot]
            self.labels[indices] = target_slot
            self.statistics.rebuild_slot(target_slot, self.points[indices])
            self._log_counts[target_slot] = math.log(len(indices))
        self.num_accepted_splits += 1
        return True

    def _propose_merge(self, scratch, group, group_labels, slot_first, slot_second) -> bool:
        # Probability that one restricted scan from the launch state reproduces the current split.
        current = (self.labels[group] == slot_second).astype(np.int64)
        log_reverse = self._restricted_scan(scratch, group, group_labels, target=current)
        sizes = self.statistics.counts[[slot_first, slot_second]].astype(np.float64)
        log_prior_ratio = gammaln(sizes.sum()) - math.log(self.alpha) - gammaln(sizes).sum()
        scratch.reset(self.points[group], np.zeros(len(group), dtype=np.int64), num_slots=1)
        merged = self._log_marginals(scratch, [0])
        log_likelihood_ratio = merged - self._log_marginals(self.statistics, [slot_first, slot_second])
        if math.log(self.rng.random()) >= log_prior_ratio + log_likelihood_ratio + log_reverse:
            return False
        self.labels[group] = slot_first
        self.statistics.rebuild_slot(slot_first, self.points[group])
        self._log_counts[slot_first] = math.log(len(group))
        self.statistics.clear(np.array([slot_second]))
        self._log_counts[slot_second] = -np.inf
        self._free_slots.append(int(slot_second))
        self.num_accepted_merges += 1
        return True

    # -- full sweep ----------------------------------------------------------------------

    def sweep(self) -> None:
        """Run one Gibbs scan, the split-merge proposals, a compaction and the alpha update."""
        self.gibbs_scan()
        for _ in range(self.split_merge_proposals):
            self.split_merge_move()
        self.compact()
        if self.alpha_prior is not None:
            shape, rate = self.alpha_prior
            self.alpha = update_alpha(self.alpha, self.num_clusters, self.num_points, shape, rate, self.rng)

    def log_likelihood(self) -> float:
        """Return ``sum_k log p(points of cluster k)``, the marginal likelihood of the partition."""
        return self._log_marginals(self.statistics, np.flatnonzero(self.statistics.counts[: self.num_slots]))

    def partition(self) -> tuple[int, ...]:
        """Return the labels renumbered in order of first appearance, a canonical partition key."""
        _, first_seen, inverse = np.unique(self.labels, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first_seen))
        return tuple(int(r) for r in rank[inverse])


def _remove_point(statistics, slot, x, members) -> None:
    """Remove ``x`` from ``slot``; if the downdate fails, rebuild the slot from ``members()``.

    ``members`` returns the points of the slot without ``x``, shape (num_members, dim). It is
    called only when a full-covariance downdate loses precision, which is rare.
    """
    try:
        statistics.remove(slot, x)
    except DowndateError:
        remaining = members()
        logger.debug("refactorising cluster slot %d (%d points) after a failed downdate", slot, len(remaining))
        if len(remaining):
            statistics.rebuild_slot(slot, remaining)
        else:
            statistics.clear(np.array([slot]))


def _sample_log_categorical(log_prob: np.ndarray, uniform: float) -> int:
    """Return index k with probability proportional to ``exp(log_prob[k])``, by inverse CDF."""
    cumulative = np.cumsum(np.exp(log_prob - log_prob.max()))
    choice = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    # `uniform * total` can round up to `total`; the last entry then has positive mass.
    return min(choice, len(log_prob) - 1)


# -- public entry point ---------------------------------------------------------------------


def fit_gibbs(
    data,
    covariance: str = "diag",
    alpha: float = 1.0,
    alpha_prior: tuple[float, float] | None = None,
    num_chains: int = 4,
    num_sweeps: int = 200,
    burn_in: int = 50,
    thin: int = 1,
    subsample: int | None = None,
    split_merge: bool | int = False,
    seed: int = 0,
    progress: bool = True,
    prior: ConjugatePrior | None = None,
) -> Posterior:
    """Sample the DP mixture posterior with collapsed Gibbs chains.

    NOTE: the chains run one after another in this process, and one sweep over N points
    costs N Python-level steps, so expect seconds per sweep at N = 10,000; use ``subsample``.

    Parameters
    ----------
    data : torch.Tensor or np.ndarray of shape (num_points, dim)
        Embeddings; a (float16) ``np.memmap`` works, and only the subsample is read.
    covariance : {"diag", "full"}
        Component family: Normal-Gamma or Normal-inverse-Wishart base measure.
    alpha : float
        Concentration, or its initial value when ``alpha_prior`` is set.
    alpha_prior : tuple of float or None
        ``(shape, rate)`` of a Gamma prior on ``alpha``; ``alpha`` is then resampled every
        sweep (Escobar and West 1995).
    num_chains : int
        Independent chains, run one after another, each with its own seed.
    num_sweeps : int
        Sweeps per chain, burn-in included. One sweep reassigns every point once.
    burn_in : int
        Sweeps discarded at the start of each chain.
    thin : int
        Keep every ``thin``-th sweep after burn-in.
    subsample : int or None
        Number of points drawn at random without replacement; None uses all points.
    split_merge : bool or int
        Split-merge proposals per sweep: False or 0 for none, True for
        ``_DEFAULT_SPLIT_MERGE_PROPOSALS``, or a positive number.
    seed : int
        Seeds the subsample and every chain, so the result is deterministic.
    progress : bool
        Show a progress bar over all sweeps.
    prior : ConjugatePrior or None
        Base measure; None builds the data-scaled default from the subsample
        (:meth:`NormalGamma.from_data` or :meth:`NormalInverseWishart.from_data`).

    Returns
    -------
    Posterior
        ``algorithm="gibbs"``. ``params`` and ``log_weights`` pool the clusters of every
        chain's final state, each cluster weighted by ``count / (num_points * num_chains)``,
        with posterior-mean parameters (``E[mu]``, ``E[precision]``). ``draws`` contains one
        entry per kept sweep and chain: ``weights`` (num_samples, max_clusters) drawn from
        ``Dirichlet(counts)``, the posterior of the relative weights of the occupied
        clusters, and ``loc`` (num_samples, max_clusters, dim) drawn from each cluster's
        Student-t posterior; clusters are ordered by decreasing size, and padding entries
        have weight 0 and loc 0. ``trace`` has ``num_clusters``, ``alpha`` and
        ``log_likelihood`` as one list per chain with one value per sweep (burn-in
        included). ``alpha`` is ``{"value": a}`` when fixed and ``{"samples": [...]}``
        (kept sweeps of all chains) otherwise.
    """
    settings = _check_settings(
        covariance, alpha, alpha_prior, num_chains, num_sweeps, burn_in, thin, subsample, split_merge
    )
    chain_seeds = np.random.SeedSequence(seed).spawn(num_chains + 1)
    points, total_points = _load_points(data, subsample, np.random.default_rng(chain_seeds[0]))
    prior = _resolve_prior(prior, covariance, points)
    settings.update(
        seed=seed, num_points=len(points), total_points=total_points, prior=prior.describe()
    )

    runs = []
    with tqdm(total=num_chains * num_sweeps, disable=not progress, desc="gibbs", unit="sweep") as bar:
        for chain_index, chain_seed in enumerate(chain_seeds[1:]):
            runs.append(
                _run_chain(points, prior, settings, chain_seed, chain_index, bar)
            )
    return _build_posterior(runs, prior.family, settings)


def _check_settings(covariance, alpha, alpha_prior, num_chains, num_sweeps, burn_in, thin, subsample, split_merge):
    if covariance not in _PRIORS:
        raise ValueError(f"covariance must be one of {sorted(_PRIORS)}, got {covariance!r}.")
    if not (isinstance(alpha, numbers.Real) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if alpha_prior is not None:
        alpha_prior = _check_alpha_prior(alpha_prior)
    for name, value, low in (("num_chains", num_chains, 1), ("num_sweeps", num_sweeps, 1), ("thin", thin, 1)):
        if not (isinstance(value, (int, np.integer)) and value >= low):
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}.")
    if not (isinstance(burn_in, (int, np.integer)) and 0 <= burn_in < num_sweeps):
        raise ValueError(
            f"burn_in must be an integer in [0, num_sweeps) = [0, {num_sweeps}), got {burn_in!r}; "
            "raise num_sweeps or lower burn_in so that some sweeps are kept."
        )
    if subsample is not None and not (isinstance(subsample, (int, np.integer)) and subsample >= 2):
        raise ValueError(f"subsample must be None or an integer of at least 2, got {subsample!r}.")
    proposals = _DEFAULT_SPLIT_MERGE_PROPOSALS if split_merge is True else int(split_merge)
    if proposals < 0:
        raise ValueError(f"split_merge must be a bool or a non-negative integer, got {split_merge!r}.")
    return {
        # Lists, not tuples, so that the settings survive a JSON round trip unchanged.
        "covariance": covariance, "alpha": float(alpha), "alpha_prior": None if alpha_prior is None else list(alpha_prior),
        "num_chains": int(num_chains), "num_sweeps": int(num_sweeps), "burn_in": int(burn_in),
        "thin": int(thin), "subsample": None if subsample is None else int(subsample),
        "split_merge": proposals,
    }


def _check_alpha_prior(alpha_prior) -> tuple[float, float]:
    message = f"alpha_prior must be a (shape, rate) pair of positive numbers, got {alpha_prior!r}."
    try:
        shape, rate = (float(v) for v in alpha_prior)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (shape > 0 and rate > 0):
        raise ValueError(message)
    return shape, rate


def _load_points(data, subsample, rng) -> tuple[np.ndarray, int]:
    """Return the (sub)sampled rows of ``data`` as float64 numpy, and the total number of rows."""
    if not isinstance(data, torch.Tensor) and not hasattr(data, "shape"):
        data = np.asarray(data)
    if len(data.shape) != 2:
        raise ValueError(f"data must have shape (num_points, dim), got shape {tuple(data.shape)}.")
    total = int(data.shape[0])
    if total < 2:
        raise ValueError(f"data must contain at least 2 points, got {total}.")
    if subsample is not None and subsample > total:
        warnings.warn(
            f"subsample={subsample} exceeds the {total} points in data; sampling all of them.",
            stacklevel=3,
        )
    if subsample is None or subsample >= total:
        rows = data[:]
    else:
        # Sorted rows read a memory-mapped array in file order.
        rows = data[np.sort(rng.choice(total, size=subsample, replace=False))]
    if isinstance(rows, torch.Tensor):
        points = rows.detach().cpu().to(torch.float64).numpy()
    else:
        points = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(points)):
        raise ValueError("data contains NaN or infinite values in the sampled rows; clean the embeddings first.")
    return points, total


def _resolve_prior(prior, covariance, points) -> ConjugatePrior:
    if prior is None:
        return _PRIORS[covariance].from_data(points)
    if prior.family != covariance:
        raise ValueError(
            f"prior is a {type(prior).__name__} for the {prior.family!r} family, but covariance="
            f"{covariance!r}; pass a {_PRIORS[covariance].__name__} or change covariance."
        )
    if prior.dim != points.shape[1]:
        raise ValueError(
            f"prior has dimension {prior.dim}, but data has dimension {points.shape[1]}; "
            "build the prior from the same embeddings, or pass prior=None."
        )
    return prior


def _run_chain(points, prior, settings, seed_sequence, chain_index, bar) -> dict[str, Any]:
    """Run one chain and return its trace, kept draws and final cluster parameters."""
    chain_rng, draw_rng = (np.random.default_rng(s) for s in seed_sequence.spawn(2))
    chain = CollapsedGibbsChain(
        points, prior, settings["alpha"], chain_rng,
        alpha_prior=settings["alpha_prior"], split_merge_proposals=settings["split_merge"],
    )
    start = time.perf_counter()
    chain.initialise()

    trace = {"num_clusters": [], "alpha": [], "log_likelihood": []}
    kept_draws = {"weights": [], "loc": [], "alpha": []}
    for sweep in range(settings["num_sweeps"]):
        chain.sweep()
        trace["num_clusters"].append(chain.num_clusters)
        trace["alpha"].append(chain.alpha)
        trace["log_likelihood"].append(chain.log_likelihood())
        if sweep >= settings["burn_in"] and (sweep - settings["burn_in"]) % settings["thin"] == 0:
            _record_draw(chain, kept_draws, draw_rng)
        bar.update(1)

    elapsed = time.perf_counter() - start
    logger.info(
        "gibbs chain %d: %d sweeps over %d points in %.1f s (%.2f sweeps/s), %d clusters at the end, "
        "%d splits and %d merges accepted",
        chain_index, settings["num_sweeps"], len(points), elapsed, settings["num_sweeps"] / elapsed,
        chain.num_clusters, chain.num_accepted_splits, chain.num_accepted_merges,
    )
    slots = np.arange(chain.num_slots)
    final = chain.statistics.posterior_mean_params(slots)
    final["counts"] = chain.statistics.counts[slots].copy()
    return {"trace": trace, "kept": kept_draws, "final": final}


def _record_draw(chain, kept_draws, rng) -> None:
    """Append Dirichlet(counts) weights, Student-t means and alpha of the chain's current state."""
    slots = np.arange(chain.num_slots)
    kept_draws["weights"].append(rng.dirichlet(chain.statistics.counts[slots].astype(np.float64)))
    kept_draws["loc"].append(chain.statistics.sample_loc(slots, rng))
    kept_draws["alpha"].append(chain.alpha)


def _build_posterior(runs, family, settings) -> Posterior:
    dtype = torch.get_default_dtype()
    keys = [k for k in runs[0]["final"] if k != "counts"]
    params = {k: torch.as_tensor(np.concatenate([r["final"][k] for r in runs]), dtype=dtype) for k in keys}
    counts = np.concatenate([r["final"]["counts"] for r in runs]).astype(np.float64)
    log_weights = torch.as_tensor(np.log(counts / counts.sum()), dtype=dtype)

    weights = [w for r in runs for w in r["kept"]["weights"]]
    locs = [loc for r in runs for loc in r["kept"]["loc"]]
    max_clusters = max(len(w) for w in weights)
    padded_weights = np.zeros((len(weights), max_clusters))
    padded_loc = np.zeros((len(weights), max_clusters, locs[0].shape[-1]))
    for row, (w, loc) in enumerate(zip(weights, locs)):
        padded_weights[row, : len(w)] = w
        padded_loc[row, : len(w)] = loc
    draws = {"weights": torch.as_tensor(padded_weights, dtype=dtype), "loc": torch.as_tensor(padded_loc, dtype=dtype)}

    if settings["alpha_prior"] is None:
        alpha = {"value": settings["alpha"]}
    else:
        alpha = {"samples": [a for r in runs for a in r["kept"]["alpha"]]}
    trace = {key: [r["trace"][key] for r in runs] for key in ("num_clusters", "alpha", "log_likelihood")}
    return Posterior(
        family=family, params=params, log_weights=log_weights, draws=draws, alpha=alpha,
        algorithm="gibbs", settings=settings, trace=trace,
    )


def component_count(posterior: Posterior) -> ComponentCount:
    """Return the sampled number of clusters of a :func:`fit_gibbs` posterior.

    Unlike :meth:`Posterior.num_components`, which redraws assignments from sampled
    weights, this reads the number of occupied clusters of each kept sweep directly.
    """
    if posterior.algorithm != "gibbs":
        raise ValueError(f"posterior must come from fit_gibbs, got algorithm {posterior.algorithm!r}.")
    settings = posterior.settings
    samples, chains = [], []
    for chain_index, trace in enumerate(posterior.trace["num_clusters"]):
        kept = trace[settings["burn_in"] :: settings["thin"]]
        samples.extend(kept)
        chains.extend([chain_index] * len(kept))
    return ComponentCount(
        np.asarray(samples, dtype=np.int64), settings["num_points"], "gibbs", np.asarray(chains, dtype=np.int64)
    )
