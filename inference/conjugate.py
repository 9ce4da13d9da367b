"""Conjugate base measures and cluster sufficient statistics for collapsed Gibbs sampling.

Two priors on the parameters of a Gaussian component, one per component family:

- :class:`NormalGamma` (family ``"diag"``): independently per dimension,
  ``tau_d ~ Gamma(shape, rate_d)`` and ``mu_d | tau_d ~ Normal(mean_d, 1 / (kappa0 tau_d))``.
- :class:`NormalInverseWishart` (family ``"full"``): ``Sigma ~ InverseWishart(nu0, Psi0)``
  and ``mu | Sigma ~ Normal(mean, Sigma / kappa0)``.

Each prior builds a :class:`ClusterStatistics` object that stores the posterior
hyperparameters of many clusters in preallocated slots. Adding or removing a point updates
one slot in O(dim) (diag) or O(dim^2) (full), and one vectorised call evaluates the
posterior predictive (Student-t) log-density of a point under every slot.
These are the standard conjugate updates, as collected in Murphy (2007), "Conjugate
Bayesian analysis of the Gaussian distribution"; the tests check every predictive against
ratios of marginal likelihoods.

All arithmetic is numpy float64: the sampler calls these methods once per point, where
numpy's per-call overhead is several times lower than torch's.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
from scipy.special import gammaln, multigammaln

LOG_PI = math.log(math.pi)

# Relative floor on the data variance: a constant dimension would otherwise give a zero
# prior scale and an infinite predictive density.
_VARIANCE_FLOOR = 1e-12

# A rank-one downdate whose determinant ratio falls below this value has lost most of its
# significant digits to cancellation. The caller then refactorises the cluster from its points.
_DOWNDATE_MIN_RATIO = 1e-8


class DowndateError(ArithmeticError):
    """A rank-one Cholesky downdate would leave a matrix that is not positive definite."""


def _check_sample(sample: np.ndarray) -> np.ndarray:
    sample = np.asarray(sample, dtype=np.float64)
    if sample.ndim != 2 or sample.shape[0] < 2:
        raise ValueError(
            f"sample must have shape (num_points, dim) with at least 2 points, got shape "
            f"{sample.shape}; pass the data or a random subsample of it."
        )
    return sample


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return value


class ConjugatePrior(abc.ABC):
    """A conjugate prior on the mean and covariance of one Gaussian component.

    Attributes
    ----------
    family : str
        Name of the component family whose parameters the prior describes.
    mean : np.ndarray of shape (dim,)
        Prior mean of the component means.
    kappa0 : float
        Prior pseudo-count on the component mean: ``Cov[mu | Sigma] = Sigma / kappa0``.
    """

    family: str

    def __init__(self, mean: np.ndarray, kappa0: float):
        self.mean = np.asarray(mean, dtype=np.float64)
        if self.mean.ndim != 1:
            raise ValueError(f"mean must have shape (dim,), got shape {self.mean.shape}.")
        self.kappa0 = _check_positive("kappa0", kappa0)
        self.dim = int(self.mean.shape[0])

    @abc.abstractmethod
    def cluster_statistics(self, capacity: int = 16) -> ClusterStatistics:
        """Return empty statistics with ``capacity`` preallocated cluster slots."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Return the scalar hyperparameters as a JSON-serialisable dictionary."""

    def log_marginal(self, points: np.ndarray) -> float:
        """Return the log marginal likelihood ``log p(points)`` of one cluster.

        Parameters
        ----------
        points : np.ndarray of shape (num_points, dim)
            Points assumed to come from one component; ``num_points = 0`` gives 0.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dim)
        statistics = self.cluster_statistics(capacity=1)
        statistics.reset(points, np.zeros(len(points), dtype=np.int64), num_slots=1)
        return float(statistics.log_marginal(np.array([0]))[0])


class NormalGamma(ConjugatePrior):
    """Independent Normal-Gamma prior per dimension, the conjugate prior of the ``"diag"`` family.

    ``tau_d ~ Gamma(shape, rate_d)`` (rate parametrisation) and
    ``mu_d | tau_d ~ Normal(mean_d, 1 / (kappa0 * tau_d))``.

    Parameters
    ----------
    mean : np.ndarray of shape (dim,)
    kappa0 : float
    shape : float
        Gamma shape ``a0`` of every precision.
    rate : np.ndarray of shape (dim,)
        Gamma rate ``b0_d``; the prior mean precision is ``shape / rate_d``.
    """

    family = "diag"

    def __init__(self, mean: np.ndarray, kappa0: float, shape: float, rate: np.ndarray):
        super().__init__(mean, kappa0)
        self.shape = _check_positive("shape", shape)
        self.rate = np.broadcast_to(np.asarray(rate, dtype=np.float64), (self.dim,)).copy()
        if not np.all(self.rate > 0):
            raise ValueError(f"rate must be positive in every dimension, got minimum {self.rate.min()!r}.")

    @classmethod
    def from_data(cls, sample: np.ndarray, *, kappa0: float = 0.01, shape: float = 1.0) -> NormalGamma:
        """Build the prior scaled to the data, matching :class:`~dinodpmm.models.components.DiagonalGaussian`.

        The component means are centred on the empirical mean, and
        ``tau_d ~ Gamma(shape, shape * var_d)`` so that ``E[tau_d] = 1 / var_d``, the same
        precision prior as the variational model. ``kappa0 = 0.01`` makes the prior
        standard deviation of a mean ``1 / sqrt(kappa0 tau_d)``, ten times the component's
        own standard deviation, so the prior covers the data for components down to about
        a tenth of the data's spread. A larger ``kappa0`` favours fewer, broader clusters.

        Parameters
        ----------
        sample : np.ndarray of shape (num_points, dim)
            Data or a random subsample of it.
        """
        sample = _check_sample(sample)
        variance = np.maximum(sample.var(0), _VARIANCE_FLOOR)
        return cls(sample.mean(0), kappa0, shape, shape * variance)

    def cluster_statistics(self, capacity: int = 16) -> DiagonalClusterStatistics:
        return DiagonalClusterStatistics(self, capacity)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "kappa0": self.kappa0, "shape": self.shape, "dim": self.dim}


class NormalInverseWishart(ConjugatePrior):
    """Normal-inverse-Wishart prior, the conjugate prior of the ``"full"`` family.

    ``Sigma ~ InverseWishart(nu0, scale)`` and ``mu | Sigma ~ Normal(mean, Sigma / kappa0)``.

    Parameters
    ----------
    mean : np.ndarray of shape (dim,)
    kappa0 : float
    nu0 : float
        Degrees of freedom, greater than ``dim - 1``.
    scale : np.ndarray of shape (dim, dim)
        Symmetric positive definite scale matrix ``Psi0``; ``E[Sigma] = Psi0 / (nu0 - dim - 1)``.
    """

    family = "full"

    def __init__(self, mean: np.ndarray, kappa0: float, nu0: float, scale: np.ndarray):
        super().__init__(mean, kappa0)
        if not nu0 > self.dim - 1:
            raise ValueError(f"nu0 must exceed dim - 1 = {self.dim - 1}, got {nu0!r}.")
        self.nu0 = float(nu0)
        self.scale = np.asarray(scale, dtype=np.float64)
        if self.scale.shape != (self.dim, self.dim):
            raise ValueError(f"scale must have shape ({self.dim}, {self.dim}), got {self.scale.shape}.")
        try:
            self.scale_cholesky = np.linalg.cholesky(self.scale)  # D D
        except np.linalg.LinAlgError:
            raise ValueError("scale must be symmetric positive definite, but its Cholesky factorisation failed.") from None

    @classmethod
    def from_data(cls, sample: np.ndarray, *, kappa0: float = 0.01, dof_offset: float = 2.0) -> NormalInverseWishart:
        """Build the prior scaled to the data, matching :class:`~dinodpmm.models.components.FullGaussian`.

        ``nu0 = dim + dof_offset`` (default ``dim + 2``, the fewest degrees of freedom with a
        finite prior mean) and ``Psi0 = (nu0 - dim - 1) diag(var)``, so ``E[Sigma]`` is the
        diagonal of the empirical covariance. ``kappa0`` is as in :meth:`NormalGamma.from_data`.

        Parameters
        ----------
        sample : np.ndarray of shape (num_points, dim)
            Data or a random subsample of it.
        """
        sample = _check_sample(sample)
        if not dof_offset > 1:
            raise ValueError(f"dof_offset must exceed 1 so that E[Sigma] is finite, got {dof_offset!r}.")
        variance = np.maximum(sample.var(0), _VARIANCE_FLOOR)
        dim = sample.shape[1]
        nu0 = dim + dof_offset
        return cls(sample.mean(0), kappa0, nu0, np.diag((nu0 - dim - 1) * variance))

    def cluster_statistics(self, capacity: int = 16) -> FullClusterStatistics:
        return FullClusterStatistics(self, capacity)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "kappa0": self.kappa0, "nu0": self.nu0, "dim": self.dim}


class _Grouping:
    """Points sorted by cluster label, for per-cluster sums without a Python loop.

    Parameters
    ----------
    labels : np.ndarray of shape (num_points,)
        Slot of each point, in ``[0, num_slots)``.
    num_slots : int
    """

    def __init__(self, labels: np.ndarray, num_slots: int):
        self.order = np.argsort(labels, kind="stable")
        self.counts = np.bincount(labels, minlength=num_slots)[:num_slots]  # K
        self.bounds = np.concatenate(([0], np.cumsum(self.counts)))  # K+1
        self.occupied = self.counts > 0

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Return per-slot sums of ``values`` (num_points, ...), shape (num_slots, ...)."""
        result = np.zeros((len(self.counts), *values.shape[1:]))
        if len(values):
            # Empty slots have zero-length segments, so each occupied start runs to the next one.
            starts = self.bounds[:-1][self.occupied]
            result[self.occupied] = np.add.reduceat(values[self.order], starts, axis=0)
        return result


class ClusterStatistics(abc.ABC):
    """Posterior hyperparameters of the clusters of one partition, in numbered slots.

    A slot with ``counts[k] == 0`` is at the prior and free. Slots beyond the number
    the caller uses are never read. ``add``/``remove`` keep every cached quantity of the
    predictive consistent, and ``reset`` rebuilds all slots from the points, which also
    discards the rounding error of many rank-one updates.

    Attributes
    ----------
    counts : np.ndarray of shape (capacity,)
        Number of points in each slot, int64.
    kappa : np.ndarray of shape (capacity,)
        Posterior pseudo-count ``kappa0 + n``.
    loc : np.ndarray of shape (capacity, dim)
        Posterior mean of the component mean.
    """

    def __init__(self, prior: ConjugatePrior, capacity: int):
        self.prior = prior
        self.dim = prior.dim
        self.capacity = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.kappa = np.zeros(0)
        self.loc = np.zeros((0, self.dim))
        self._log_norm = np.zeros(0)  # log-density constant of the predictive per slot
        self._half_dof_plus = np.zeros(0)  # exponent (nu + d) / 2 of the predictive per slot
        self.grow(max(1, int(capacity)))
        self._empty: ClusterStatistics | None = None

    # -- slot storage ---------------------------------------------------------------

    def grow(self, capacity: int) -> None:
        """Enlarge the storage to at least ``capacity`` slots; new slots hold the prior."""
        if capacity <= self.capacity:
            return
        old = self.capacity
        capacity = max(capacity, 2 * old)
        for name in self._slot_arrays():
            array = getattr(self, name)
            grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self.capacity = capacity
        self.clear(np.arange(old, capacity))

    def _slot_arrays(self) -> list[str]:
        return ["counts", "kappa", "loc", "_log_norm", "_half_dof_plus"]

    def rebuild_slot(self, slot: int, points: np.ndarray) -> None:
        """Recompute ``slot`` from its points of shape (num_points, dim), discarding rounding error."""
        scratch = self.prior.cluster_statistics(capacity=1)
        scratch.reset(points, np.zeros(len(points), dtype=np.int64), num_slots=1)
        for name in self._slot_arrays():
            getattr(self, name)[slot] = getattr(scratch, name)[0]

    def permute(self, order: np.ndarray) -> None:
        """Move slot ``order[j]`` to slot ``j`` for every j; later slots are cleared."""
        keep = len(order)
        for name in self._slot_arrays():
            array = getattr(self, name)
            array[:keep] = array[order]
        self.clear(np.arange(keep, self.capacity))

    @abc.abstractmethod
    def clear(self, slots: np.ndarray) -> None:
        """Set the given slots to the prior."""

    # -- updates ---------------------------------------------------------------------

    @abc.abstractmethod
    def add(self, slot: int, x: np.ndarray) -> None:
        """Add point ``x`` of shape (dim,) to ``slot``."""

    @abc.abstractmethod
    def remove(self, slot: int, x: np.ndarray) -> None:
        """Remove point ``x`` of shape (dim,) from ``slot``, which must contain it."""

    @abc.abstractmethod
    def reset(self, points: np.ndarray, labels: np.ndarray, num_slots: int) -> None:
        """Rebuild slots ``0 .. num_slots - 1`` from scratch and clear the others.

        Parameters
        ----------
        points : np.ndarray of shape (num_points, dim)
        labels : np.ndarray of shape (num_points,)
            Slot of each point, in ``[0, num_slots)``.
        """

    def _grouped_moments(self, points, labels, num_slots):
        """Return the grouping, counts (num_slots,), means (num_slots, dim) and centred points."""
        self.grow(num_slots)
        grouping = _Grouping(labels, num_slots)
        means = grouping.sums(points) / np.maximum(grouping.counts, 1)[:, None]  # K D
        return grouping, grouping.counts, means, points - means[labels]

    # -- densities -------------------------------------------------------------------

    @abc.abstractmethod
    def log_predictive(self, x: np.ndarray, num_slots: int) -> np.ndarray:
        """Return ``log p(x | points in slot k)`` of shape (num_slots,) for ``x`` of shape (dim,)."""

    def log_predictive_new(self, x: np.ndarray) -> float:
        """Return the prior predictive log-density of ``x`` under an empty cluster.

        Every cleared slot gives the same value, so a caller that keeps slot
        ``num_slots - 1`` empty gets it from :meth:`log_predictive` at no extra cost.
        """
        if self._empty is None:
            self._empty = self.prior.cluster_statistics(capacity=1)
        return float(self._empty.log_predictive(x, 1)[0])

    @abc.abstractmethod
    def log_marginal(self, slots: np.ndarray) -> np.ndarray:
        """Return the log marginal likelihood of the points of each slot, shape (len(slots),)."""

    # -- summaries -------------------------------------------------------------------

    @abc.abstractmethod
    def posterior_mean_params(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Return the posterior mean parameters of ``slots`` under the family's keys."""

    @abc.abstractmethod
    def sample_loc(self, slots: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw each slot's mean from its marginal posterior (a Student-t); shape (len(slots), dim)."""


class DiagonalClusterStatistics(ClusterStatistics):
    """Cluster statistics under a :class:`NormalGamma` prior.

    Per slot, dimension d: ``kappa``, ``loc`` (posterior mean ``m``), the Gamma shape
    ``a = a0 + n / 2`` and rate ``b_d``. Adding ``x`` uses the sequential update
    ``b += kappa (x - m)^2 / (2 (kappa + 1))``, ``m += (x - m) / (kappa + 1)``, and removal
    inverts it. The predictive of ``x_d`` is Student-t with ``2a`` degrees of freedom,
    location ``m_d`` and squared scale ``b_d (kappa + 1) / (a kappa)``.
    """

    prior: NormalGamma

    def _slot_arrays(self):
        return [*super()._slot_arrays(), "gamma_rate", "_inverse_spread"]

    def grow(self, capacity):
        if not hasattr(self, "gamma_rate"):
            self.gamma_rate = np.zeros((0, self.dim))
            self._inverse_spread = np.zeros((0, self.dim))  # 1 / (nu * squared scale)
        super().grow(capacity)

    def clear(self, slots):
        prior = self.prior
        self.counts[slots] = 0
        self.kappa[slots] = prior.kappa0
        self.loc[slots] = prior.mean
        self.gamma_rate[slots] = prior.rate
        self._refresh(slots)

    def _predictive_constants(self, kappa, shape, rate):
        """Return the Student-t constants for slots with the given posterior hyperparameters."""
        dof = 2 * shape  # K
        squared_scale = rate * ((kappa + 1) / (shape * kappa))[:, None]  # K D
        log_norm = self.dim * (gammaln(shape + 0.5) - gammaln(shape) - 0.5 * np.log(dof * math.pi))
        log_norm = log_norm - 0.5 * np.log(squared_scale).sum(-1)  # K
        return log_norm, shape + 0.5, 1.0 / (dof[:, None] * squared_scale)

    def _shape(self, slots):
        return self.prior.shape + 0.5 * self.counts[slots]

    def _refresh(self, slots):
        log_norm, half_dof_plus, inverse_spread = self._predictive_constants(
            self.kappa[slots], self._shape(slots), self.gamma_rate[slots]
        )
        self._log_norm[slots] = log_norm
        self._half_dof_plus[slots] = half_dof_plus
        self._inverse_spread[slots] = inverse_spread

    def _refresh_slot(self, slot):
        # Scalar version of `_refresh` for the per-point updates.
        shape = self.prior.shape + 0.5 * int(self.counts[slot])
        kappa = float(self.kappa[slot])
        dof_times_factor = 2 * (kappa + 1) / kappa  # dof * squared scale / rate
        rate = self.gamma_rate[slot]  # D
        self._log_norm[slot] = self.dim * (
            math.lgamma(shape + 0.5) - math.lgamma(shape) - 0.5 * math.log(2 * shape * math.pi)
            - 0.5 * math.log((kappa + 1) / (shape * kappa))
        ) - 0.5 * float(np.log(rate).sum())
        self._half_dof_plus[slot] = shape + 0.5
        np.divide(1.0 / dof_times_factor, rate, out=self._inverse_spread[slot])

    def add(self, slot, x):
        kappa = self.kappa[slot]
        delta = x - self.loc[slot]  # D
        self.gamma_rate[slot] += (0.5 * kappa / (kappa + 1)) * delta * delta
        self.loc[slot] += delta / (kappa + 1)
        self.kappa[slot] = kappa + 1
        self.counts[slot] += 1
        self._refresh_slot(slot)

    def remove(self, slot, x):
        if self.counts[slot] == 1:
            self.clear(np.array([slot]))  # exact prior, no accumulated rounding
            return
        kappa = self.kappa[slot] - 1
        delta = x - self.loc[slot]  # D
        self.loc[slot] -= delta / kappa
        # Inverse of the update in `add`, written with the old mean: the new mean is
        # m' = m - (x - m) / kappa', so kappa' (x - m')^2 / (kappa' + 1) = (kappa' + 1) (x - m)^2 / kappa'.
        self.gamma_rate[slot] -= (0.5 * (kappa + 1) / kappa) * delta * delta
        np.maximum(self.gamma_rate[slot], self.prior.rate, out=self.gamma_rate[slot])
        self.kappa[slot] = kappa
        self.counts[slot] -= 1
        self._refresh_slot(slot)

    def reset(self, points, labels, num_slots):
        grouping, counts, means, centred = self._grouped_moments(points, labels, num_slots)
        prior = self.prior
        scatter = grouping.sums(centred * centred)  # K D
        kappa = prior.kappa0 + counts  # K
        offset = means - prior.mean  # K D
        self.counts[:num_slots] = counts
        self.kappa[:num_slots] = kappa
        self.loc[:num_slots] = (prior.kappa0 * prior.mean + counts[:, None] * means) / kappa[:, None]
        shrinkage = prior.kappa0 * counts / kappa  # K
        self.gamma_rate[:num_slots] = prior.rate + 0.5 * scatter + 0.5 * shrinkage[:, None] * offset**2
        self._refresh(np.arange(num_slots))
        self.clear(np.arange(num_slots, self.capacity))

    def log_predictive(self, x, num_slots):
        delta = x - self.loc[:num_slots]  # K D
        quadratic = np.log1p(delta * delta * self._inverse_spread[:num_slots]).sum(-1)  # K
        return self._log_norm[:num_slots] - self._half_dof_plus[:num_slots] * quadratic

    def log_marginal(self, slots):
        slots = np.asarray(slots)
        prior = self.prior
        shape = self._shape(slots)  # K
        per_dim = (
            self.dim * (gammaln(shape) - gammaln(prior.shape))
            + prior.shape * np.log(prior.rate).sum()
            - shape * np.log(self.gamma_rate[slots]).sum(-1)
        )  # K, summed over dimensions
        counts = self.counts[slots]
        return per_dim + 0.5 * self.dim * (np.log(prior.kappa0 / self.kappa[slots]) - counts * math.log(2 * math.pi))

    def posterior_mean_params(self, slots):
        slots = np.asarray(slots)
        precision = self._shape(slots)[:, None] / self.gamma_rate[slots]  # E[tau] = a / b
        return {"loc": self.loc[slots].copy(), "precision": precision}

    def sample_loc(self, slots, rng):
        slots = np.asarray(slots)
        shape = self._shape(slots)[:, None]  # K 1
        scale = np.sqrt(self.gamma_rate[slots] / (shape * self.kappa[slots][:, None]))  # K D
        draws = rng.standard_t(np.broadcast_to(2 * shape, scale.shape))
        return self.loc[slots] + scale * draws


class FullClusterStatistics(ClusterStatistics):
    """Cluster statistics under a :class:`NormalInverseWishart` prior.

    Per slot: ``kappa``, ``loc`` (posterior mean ``m``), ``nu = nu0 + n`` and the posterior
    scale matrix ``Psi``. Adding ``x`` changes ``Psi`` by the rank-one term
    ``kappa / (kappa + 1) (x - m)(x - m)^T`` and removal subtracts
    ``kappa / (kappa - 1) (x - m)(x - m)^T``.

    The slot stores ``inverse_cholesky = L^-1``, the inverse of the lower Cholesky factor
    ``L`` of ``Psi``, and ``log|Psi|``, because the predictive of ``x`` under every slot then
    needs ``||L_k^-1 (x - m_k)||^2`` as one batched matrix-vector product instead of one
    triangular solve per slot. Both are updated in O(dim^2) per point by
    :func:`rank_one_inverse_cholesky_update`; nothing is refactorised until ``reset``.
    The predictive is a multivariate Student-t with ``nu - dim + 1`` degrees of freedom,
    location ``m`` and shape ``Psi (kappa + 1) / (kappa (nu - dim + 1))``.
    """

    prior: NormalInverseWishart

    def _slot_arrays(self):
        return [*super()._slot_arrays(), "inverse_cholesky", "log_det_scale", "_spread"]

    def grow(self, capacity):
        if not hasattr(self, "inverse_cholesky"):
            self.inverse_cholesky = np.zeros((0, self.dim, self.dim))
            self.log_det_scale = np.zeros(0)
            self._spread = np.zeros(0)  # 1 / (dof * c) with shape matrix c * Psi
        super().grow(capacity)

    def clear(self, slots):
        prior = self.prior
        self.counts[slots] = 0
        self.kappa[slots] = prior.kappa0
        self.loc[slots] = prior.mean
        self.inverse_cholesky[slots] = np.linalg.inv(prior.scale_cholesky)
        self.log_det_scale[slots] = 2 * np.log(np.diag(prior.scale_cholesky)).sum()
        self._refresh(slots)

    def _predictive_constants(self, kappa, nu, log_det_scale):
        dim = self.dim
        dof = nu - dim + 1  # K
        factor = (kappa + 1) / (kappa * dof)  # K, shape matrix = factor * Psi
        log_norm = (
            gammaln(0.5 * (dof + dim)) - gammaln(0.5 * dof) - 0.5 * dim * np.log(dof * math.pi)
            - 0.5 * (dim * np.log(factor) + log_det_scale)
        )
        return log_norm, 0.5 * (dof + dim), 1.0 / (dof * factor)

    def _nu(self, slots):
        return self.prior.nu0 + self.counts[slots]

    def _refresh(self, slots):
        log_norm, half_dof_plus, spread = self._predictive_constants(
            self.kappa[slots], self._nu(slots), self.log_det_scale[slots]
        )
        self._log_norm[slots] = log_norm
        self._half_dof_plus[slots] = half_dof_plus
        self._spread[slots] = spread

    def _refresh_slot(self, slot):
        # Scalar version of `_refresh` for the per-point updates.
        dim = self.dim
        dof = self.prior.nu0 + int(self.counts[slot]) - dim + 1
        kappa = float(self.kappa[slot])
        factor = (kappa + 1) / (kappa * dof)
        self._log_norm[slot] = (
            math.lgamma(0.5 * (dof + dim)) - math.lgamma(0.5 * dof) - 0.5 * dim * math.log(dof * math.pi)
            - 0.5 * (dim * math.log(factor) + float(self.log_det_scale[slot]))
        )
        self._half_dof_plus[slot] = 0.5 * (dof + dim)
        self._spread[slot] = 1.0 / (dof * factor)

    def add(self, slot, x):
        kappa = self.kappa[slot]
        delta = x - self.loc[slot]  # D
        projected = self.inverse_cholesky[slot] @ delta * math.sqrt(kappa / (kappa + 1))  # D
        self._apply_rank_one(slot, projected, 1.0)
        self.loc[slot] += delta / (kappa + 1)
        self.kappa[slot] = kappa + 1
        self.counts[slot] += 1
        self._refresh_slot(slot)

    def remove(self, slot, x):
        if self.counts[slot] == 1:
            self.clear(np.array([slot]))
            return
        kappa = self.kappa[slot]
        delta = x - self.loc[slot]  # D
        projected = self.inverse_cholesky[slot] @ delta * math.sqrt(kappa / (kappa - 1))  # D
        self._apply_rank_one(slot, projected, -1.0)
        self.loc[slot] -= delta / (kappa - 1)
        self.kappa[slot] = kappa - 1
        self.counts[slot] -= 1
        self._refresh_slot(slot)

    def _apply_rank_one(self, slot, projected, sign):
        inverse_cholesky, log_ratio = rank_one_inverse_cholesky_update(
            self.inverse_cholesky[slot], projected, sign
        )
        self.inverse_cholesky[slot] = inverse_cholesky
        self.log_det_scale[slot] += log_ratio

    def reset(self, points, labels, num_slots):
        grouping, counts, means, centred = self._grouped_moments(points, labels, num_slots)
        prior = self.prior
        kappa = prior.kappa0 + counts  # K
        offset = means - prior.mean  # K D
        shrinkage = prior.kappa0 * counts / kappa  # K
        scale = np.broadcast_to(prior.scale, (num_slots, self.dim, self.dim)).copy()  # K D D
        scale += shrinkage[:, None, None] * offset[:, :, None] * offset[:, None, :]
        order, bounds = grouping.order, grouping.bounds
        for slot in np.flatnonzero(counts):
            members = centred[order[bounds[slot] : bounds[slot + 1]]]  # n D
            scale[slot] += members.T @ members
        cholesky = np.linalg.cholesky(scale)  # K D D
        self.counts[:num_slots] = counts
        self.kappa[:num_slots] = kappa
        self.loc[:num_slots] = (prior.kappa0 * prior.mean + counts[:, None] * means) / kappa[:, None]
        self.inverse_cholesky[:num_slots] = np.linalg.inv(cholesky)
        self.log_det_scale[:num_slots] = 2 * np.log(np.diagonal(cholesky, axis1=-2, axis2=-1)).sum(-1)
        self._refresh(np.arange(num_slots))
        self.clear(np.arange(num_slots, self.capacity))

    def log_predictive(self, x, num_slots):
        delta = x - self.loc[:num_slots]  # K D
        projected = np.matmul(self.inverse_cholesky[:num_slots], delta[:, :, None])[..., 0]  # K D
        quadratic = np.log1p((projected * projected).sum(-1) * self._spread[:num_slots])  # K
        return self._log_norm[:num_slots] - self._half_dof_plus[:num_slots] * quadratic

    def log_marginal(self, slots):
        slots = np.asarray(slots)
        prior, dim = self.prior, self.dim
        nu = self._nu(slots)
        prior_log_det = 2 * np.log(np.diag(prior.scale_cholesky)).sum()
        gamma_terms = np.array([multigammaln(0.5 * v, dim) for v in nu]) - multigammaln(0.5 * prior.nu0, dim)
        return (
            -0.5 * self.counts[slots] * dim * LOG_PI
            + gamma_terms
            + 0.5 * prior.nu0 * prior_log_det
            - 0.5 * nu * self.log_det_scale[slots]
            + 0.5 * dim * np.log(prior.kappa0 / self.kappa[slots])
        )

    def posterior_mean_params(self, slots):
        slots = np.asarray(slots)
        inverse_cholesky = self.inverse_cholesky[slots]  # K D D
        # E[Sigma^-1] = nu Psi^-1 and Psi^-1 = L^-T L^-1.
        precision = self._nu(slots)[:, None, None] * np.swapaxes(inverse_cholesky, -1, -2) @ inverse_cholesky
        return {"loc": self.loc[slots].copy(), "precision_tril": np.linalg.cholesky(precision)}

    def sample_loc(self, slots, rng):
        slots = np.asarray(slots)
        dof = self._nu(slots) - self.dim + 1  # K
        cholesky = np.linalg.inv(self.inverse_cholesky[slots])  # K D D
        normal = np.matmul(cholesky, rng.standard_normal((len(slots), self.dim, 1)))[..., 0]  # K D
        # mu = m + sqrt(dof / chi2_dof) z / sqrt(kappa dof), with z ~ Normal(0, Psi).
        mixing = np.sqrt(rng.chisquare(dof) * self.kappa[slots])  # K
        return self.loc[slots] + normal / mixing[:, None]


def rank_one_inverse_cholesky_update(
    inverse_cholesky: np.ndarray, projected: np.ndarray, sign: float
) -> tuple[np.ndarray, float]:
    """Update the inverse Cholesky factor of ``A`` to that of ``A + sign * v v^T``.

    With ``A = L L^T``, ``W = L^-1`` and ``p = W v``, ``A + sign v v^T = L M M^T L^T`` where
    ``M`` is the lower Cholesky factor of ``I + sign p p^T``. With ``t_0 = 1`` and
    ``t_i = t_{i-1} + sign p_i^2``, ``M^-1`` has diagonal ``sqrt(t_{i-1} / t_i)`` and
    below-diagonal entries ``-sign p_i p_j / sqrt(t_i t_{i-1})``, so the new factor
    ``M^-1 W`` costs O(dim^2). By the matrix determinant lemma ``|A'| / |A| = t_dim``.

    Parameters
    ----------
    inverse_cholesky : np.ndarray of shape (dim, dim)
        ``W``, lower triangular.
    projected : np.ndarray of shape (dim,)
        ``p = W v``.
    sign : float
        ``+1`` for an update, ``-1`` for a downdate.

    Returns
    -------
    tuple of np.ndarray of shape (dim, dim) and float
        The new ``W`` and ``log(|A'| / |A|)``.

    Raises
    ------
    DowndateError
        If a downdate leaves a matrix that is not numerically positive definite.
    """
    totals = 1.0 + sign * np.cumsum(projected * projected)  # D
    if totals[-1] < _DOWNDATE_MIN_RATIO:
        raise DowndateError(
            f"rank-one downdate leaves a determinant ratio of {totals[-1]:.3g}, below "
            f"{_DOWNDATE_MIN_RATIO}; refactorise the matrix from its data instead."
        )
    previous = np.concatenate(([1.0], totals[:-1]))  # D
    diagonal = np.sqrt(previous / totals)  # D
    coupling = sign * projected / np.sqrt(totals * previous)  # D
    partial = np.cumsum(projected[:, None] * inverse_cholesky, axis=0)  # D D, row i: sum_{j<=i} p_j W_j
    updated = diagonal[:, None] * inverse_cholesky
    updated[1:] -= coupling[1:, None] * partial[:-1]
    return updated, float(np.log(totals[-1]))
