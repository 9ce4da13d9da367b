"""The truncated stick-breaking Dirichlet process mixture as a Pyro model.

Generative story, for ``truncation = T`` components::

    alpha ~ Gamma(a, b)                      (or fixed)
    v_k ~ Beta(1 - d, alpha + (k + 1) d)     k = 0 .. T-2, v_{T-1} = 1
    pi = stick_breaking(v)                   computed in log space
    theta_k ~ family prior                   k = 0 .. T-1
    x_n ~ sum_k pi_k p(x | theta_k)          the assignment z_n is summed out

The assignment is never sampled: the observation site scores ``logsumexp_k(log pi_k +
log p(x_n | theta_k))`` with component log-densities from matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Beta, Gamma, constraints, kl_divergence

from .components import ComponentFamily
from .stick_breaking import check_stick_parameters, log_weights_from_sticks, stick_prior


class StickBreakingMixture(dist.TorchDistribution):
    """Mixture of one component family with given log-weights; ``z`` summed out.

    Parameters
    ----------
    log_weights : torch.Tensor of shape (num_components,)
    family : type of ComponentFamily
        Supplies ``log_density`` and ``draw``.
    params : dict of torch.Tensor
        Component parameters, each with leading dimension ``num_components``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, log_weights, family, params, validate_args=None):
        self.log_weights = log_weights
        self.family = family
        self.params = params
        dim = params["loc"].shape[-1]
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    def log_prob(self, value):
        log_density = self.family.log_density(value.reshape(-1, value.shape[-1]), self.params)  # N K
        log_prob = torch.logsumexp(self.log_weights + log_density, dim=-1)
        return log_prob.reshape(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()):
        num = int(np.prod(sample_shape)) if len(sample_shape) else 1
        index = torch.multinomial(self.log_weights.exp(), num, replacement=True)
        points = self.family.draw(self.params, index)
        return points.reshape(*sample_shape, points.shape[-1])


class DPMM:
    """Truncated stick-breaking DP (or Pitman-Yor) mixture with a pluggable component family.

    Parameters
    ----------
    family : ComponentFamily
        Component family with its prior, for example ``DiagonalGaussian.from_data(x)``.
    truncation : int
        Number of components ``T`` of the truncated process.
    alpha : float
        Concentration when ``alpha_prior`` is None; otherwise the initial value of q(alpha).
    alpha_prior : tuple of float or None
        ``(shape, rate)`` of a Gamma hyperprior on ``alpha``.
    discount : float
        Pitman-Yor discount ``d``; 0 gives the Dirichlet process.
    """

    def __init__(
        self,
        family: ComponentFamily,
        truncation: int,
        *,
        alpha: float = 1.0,
        alpha_prior: Sequence[float] | None = None,
        discount: float = 0.0,
    ):
        check_stick_parameters(truncation, discount)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}.")
        if alpha_prior is not None:
            alpha_prior = _check_alpha_prior(alpha_prior)
            if discount != 0.0:
                raise ValueError(
                    "alpha_prior is supported for the Dirichlet process only (discount=0), "
                    f"got discount={discount!r}; fix alpha or set discount=0."
                )
        self.family = family
        self.truncation = truncation
        self.alpha = float(alpha)
        self.alpha_prior = alpha_prior
        self.discount = float(discount)

    # -- the Pyro model ------------------------------------------------------------

    def model(self, data: torch.Tensor | np.ndarray, subsample: torch.Tensor | None = None) -> None:
        """Pyro model of ``data`` (num_points, dim); ``subsample`` is a row index tensor.

        With ``subsample`` the data plate scales the minibatch log-likelihood by
        ``num_points / len(subsample)``, so the ELBO is an unbiased full-data estimate.
        """
        alpha = self.sample_alpha()
        with pyro.plate("sticks", self.truncation - 1):
            sticks = pyro.sample("v", stick_prior(alpha, self.truncation, self.discount))
        with pyro.plate("components", self.truncation):
            params = self.family.sample_prior(self.truncation)
        log_weights = log_weights_from_sticks(sticks)
        mixture = StickBreakingMixture(log_weights, type(self.family), params)
        with pyro.plate("data", len(data), subsample=subsample) as index:
            batch = rows_as_tensor(data, index, like=self.family.loc_mean)
            pyro.sample("obs", mixture, obs=batch)

    def sample_alpha(self) -> torch.Tensor:
        """Sample alpha from its hyperprior, or return the fixed value as a tensor."""
        dtype, device = self.family.loc_mean.dtype, self.family.loc_mean.device
        if self.alpha_prior is None:
            return torch.tensor(self.alpha, dtype=dtype, device=device)
        shape, rate = (torch.tensor(v, dtype=dtype, device=device) for v in self.alpha_prior)
        return pyro.sample("alpha", dist.Gamma(shape, rate))

    # -- analytic pieces of the mean-field ELBO ----------------------------------------

    def stick_divergence(self, q_sticks: Beta, q_alpha: Gamma | None) -> torch.Tensor:
        """Return ``E_q[KL(q(v) || p(v | alpha))] + KL(q(alpha) || p(alpha))``, a scalar."""
        if q_alpha is None:
            prior = stick_prior(self.alpha, self.truncation, self.discount)
            prior = Beta(prior.concentration1.to(q_sticks.mean), prior.concentration0.to(q_sticks.mean))
            return kl_divergence(q_sticks, prior).sum()
        # DP sticks: log Beta(v; 1, alpha) = log(alpha) + (alpha - 1) log(1 - v), linear in
        # log(alpha) and alpha, so the expectation over q(alpha) is exact.
        a, b = q_sticks.concentration1, q_sticks.concentration0
        expected_log1m = torch.digamma(b) - torch.digamma(a + b)
        expected_alpha = q_alpha.mean
        expected_log_alpha = torch.digamma(q_alpha.concentration) - torch.log(q_alpha.rate)
        cross_entropy = -(expected_log_alpha + (expected_alpha - 1) * expected_log1m).sum()
        shape, rate = (torch.as_tensor(v).to(a) for v in self.alpha_prior)
        alpha_divergence = kl_divergence(q_alpha, Gamma(shape, rate))
        return cross_entropy - q_sticks.entropy().sum() + alpha_divergence


def rows_as_tensor(data, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather rows ``index`` of a tensor or (memory-mapped) array as a tensor like ``like``.

    Anything but a tensor is indexed with the rows sorted, so a memory-mapped array reads
    only those pages in file order. The rows then come back in sorted order, which does
    not change the likelihood, a sum over the minibatch.
    """
    if isinstance(data, torch.Tensor):
        rows = data[index.to(data.device)]
    else:
        order = np.sort(index.cpu().numpy())
        rows = data[order]
        if not isinstance(rows, torch.Tensor):
            rows = torch.from_numpy(np.asarray(rows))
    return rows.to(device=like.device, dtype=like.dtype)


def _check_alpha_prior(alpha_prior) -> tuple[float, float]:
    try:
        shape, rate = (float(v) for v in alpha_prior)
    except (TypeError, ValueError):
        raise ValueError(
            f"alpha_prior must be a (shape, rate) pair of positive numbers, got {alpha_prior!r}."
        ) from None
    if shape <= 0 or rate <= 0:
        raise ValueError(
            f"alpha_prior must be a (shape, rate) pair of positive numbers, got {alpha_prior!r}."
        )
    return shape, rate
