"""Component families of the mixture: one class per family, one interface for all.

A family states its prior as Pyro sample statements, its log-density as matrix products,
its variational family, and the analytic pieces of the mean-field ELBO. Inference code
talks to families only through :class:`ComponentFamily`, so a new family plugs in by
subclassing it and calling :func:`register_family`.

Parameter dictionaries use these keys:

- diagonal Gaussian: ``loc`` (num_components, dim), ``precision`` (num_components, dim);
- full Gaussian: ``loc`` (num_components, dim), ``precision_tril`` (num_components, dim, dim),
  the lower Cholesky factor ``L`` of the precision matrix ``L @ L.T``.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

LOG_2PI = math.log(2 * math.pi)

# Rows of `x` scored per chunk by the full-covariance kernel, so that the
# (num_components, chunk, dim) intermediate stays below about 2**26 elements.
_FULL_CHUNK_ELEMENTS = 2**26

_FAMILIES: dict[str, type[ComponentFamily]] = {}


def register_family(cls: type[ComponentFamily]) -> type[ComponentFamily]:
    """Register a component family under ``cls.name``; usable as a class decorator."""
    _FAMILIES[cls.name] = cls
    return cls


def get_family(name: str) -> type[ComponentFamily]:
    """Return the component family class registered as ``name``."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown component family {name!r}; valid names are {sorted(_FAMILIES)}."
        ) from None


def available_families() -> list[str]:
    """Return the names of the registered component families."""
    return sorted(_FAMILIES)


class ComponentFamily(abc.ABC):
    """Prior, likelihood and variational family of the mixture components.

    Parameters
    ----------
    loc_mean : torch.Tensor of shape (dim,)
        Prior mean of the component means.
    loc_scale : torch.Tensor of shape (dim,)
        Prior standard deviation of the component means.
    data_variance : torch.Tensor of shape (dim,)
        Per-dimension data variance; sets the scale of the precision prior.
    """

    name: ClassVar[str]

    def __init__(self, loc_mean: torch.Tensor, loc_scale: torch.Tensor, data_variance: torch.Tensor):
        self.loc_mean = loc_mean
        self.loc_scale = loc_scale
        self.data_variance = data_variance
        self.dim = int(loc_mean.shape[-1])

    @classmethod
    def from_data(cls, sample: torch.Tensor, *, loc_scale_factor: float = 1.0, **options) -> ComponentFamily:
        """Build the family with priors scaled to the data.

        The component means get a Normal prior centred on the empirical mean with the
        empirical standard deviation (times ``loc_scale_factor``) per dimension, so the
        prior covers the data without favouring any region. The precision prior is
        centred on the inverse empirical variance (see each family).

        Parameters
        ----------
        sample : torch.Tensor of shape (num_points, dim)
            Data or a random subsample of it.
        """
        sample = sample.to(torch.get_default_dtype())
        mean = sample.mean(0)
        # Floor on the variance: a constant dimension would give an infinite prior precision.
        variance = sample.var(0).clamp_min(1e-12)
        return cls(mean, variance.sqrt() * loc_scale_factor, variance, **options)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ComponentFamily:
        """Move the prior hyperparameters in place; return ``self``."""
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device=device, dtype=dtype))
        return self

    # -- generative model -------------------------------------------------------

    def sample_loc(self, num_components: int) -> torch.Tensor:
        """Sample the component means inside the caller's components plate."""
        prior = dist.Normal(self.loc_mean, self.loc_scale).to_event(1)
        return pyro.sample("loc", prior.expand([num_components]))

    @abc.abstractmethod
    def sample_prior(self, num_components: int) -> dict[str, torch.Tensor]:
        """Sample every component parameter with ``pyro.sample`` inside a components plate."""

    # -- likelihood ---------------------------------------------------------------

    @staticmethod
    @abc.abstractmethod
    def log_density(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return component log-densities of shape (num_points, num_components) for ``x`` (num_points, dim)."""

    @staticmethod
    @abc.abstractmethod
    def squared_mahalanobis(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return squared Mahalanobis distances of shape (num_points, num_components)."""

    @staticmethod
    @abc.abstractmethod
    def covariance(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return covariances: (num_components, dim) for diagonal, (num_components, dim, dim) for full."""

    @staticmethod
    @abc.abstractmethod
    def affine_transform(params: dict[str, torch.Tensor], shift: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map parameters fitted on ``(x - shift) / scale`` to the units of ``x``.

        ``shift`` and ``scale`` have shape (dim,).
        """

    @staticmethod
    @abc.abstractmethod
    def draw(params: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Draw one point from component ``index[n]`` for each n; returns (len(index), dim)."""

    # -- variational family --------------------------------------------------------

    @abc.abstractmethod
    def init_variational(
        self, centers: torch.Tensor, variance: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, constraints.Constraint]]:
        """Return initial variational parameters ``name -> (value, constraint)``.

        Parameters
        ----------
        centers : torch.Tensor of shape (num_components, dim)
            Initial component means.
        variance : torch.Tensor of shape (dim,)
            Initial per-dimension component variance.
        """

    @abc.abstractmethod
    def point_params(self, q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the posterior point estimate (the means of q) as a parameter dictionary."""

    @abc.abstractmethod
    def sample_guide(self, q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample the variational distribution with ``pyro.sample`` inside a components plate."""

    @abc.abstractmethod
    def expected_log_density(self, x: torch.Tensor, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return ``E_q[log p(x | theta_k)]`` of shape (num_points, num_components)."""

    @abc.abstractmethod
    def prior_divergence(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the scalar ``KL(q || prior)`` of all component parameters.

        Point-estimated parameters contribute ``-log prior(value)``, which makes their
        optimum a MAP estimate.
        """

    # -- shared pieces ----------------------------------------------------------------

    def _loc_divergence(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        posterior = torch.distributions.Normal(q["loc_mean"], q["loc_scale"])
        prior = torch.distributions.Normal(self.loc_mean, self.loc_scale)
        return torch.distributions.kl_divergence(posterior, prior).sum()

    def _sample_loc_guide(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return pyro.sample("loc", dist.Normal(q["loc_mean"], q["loc_scale"]).to_event(1))


def _initial_loc_scale(centers: torch.Tensor, data_variance: torch.Tensor) -> torch.Tensor:
    # Start q(loc) narrow (1% of the data standard deviation) so early steps
    # are not dominated by Monte Carlo noise in the means.
    return (0.01 * data_variance.sqrt()).expand_as(centers).clone()


@register_family
class DiagonalGaussian(ComponentFamily):
    """Gaussian components with diagonal covariance.

    Prior: ``loc_kd ~ Normal(m_d, s_d)`` and precision ``tau_kd ~ Gamma(nu / 2, nu * var_d / 2)``,
    so ``E[tau_kd] = 1 / var_d``, with ``nu = precision_dof`` (default: ``dim``, as the
    Wishart degrees of freedom of scikit-learn's ``BayesianGaussianMixture``). A component
    backed by far fewer than ``nu`` points is pulled towards the data-wide variance, which
    spreads its density thin so that it loses its points to better-supported components.
    Variational family: ``loc ~ Normal`` (mean-field) and a point estimate of the
    variance. ``reg_covar`` is added to every variance, like scikit-learn's
    parameter of that name, and keeps components from collapsing onto single points.
    """

    name = "diag"

    def __init__(
        self, loc_mean, loc_scale, data_variance, *, precision_dof: float | None = None, reg_covar: float = 1e-6
    ):
        super().__init__(loc_mean, loc_scale, data_variance)
        precision_dof = float(self.dim) if precision_dof is None else precision_dof
        if precision_dof <= 0:
            raise ValueError(f"precision_dof must be positive, got {precision_dof!r}.")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be non-negative, got {reg_covar!r}.")
        self.precision_dof = precision_dof
        self.reg_covar = reg_covar

    def _precision_prior(self) -> dist.Gamma:
        shape = 0.5 * self.precision_dof
        return dist.Gamma(torch.full_like(self.data_variance, shape), shape * self.data_variance)

    def sample_prior(self, num_components):
        loc = self.sample_loc(num_components)
        precision = pyro.sample("precision", self._precision_prior().to_event(1).expand([num_components]))
        return {"loc": loc, "precision": precision}

    @staticmethod
    def log_density(x, params):
        loc, precision = params["loc"], params["precision"]
        # Centring on the mean of the component means removes the large common offset
        # before the expansion below, which otherwise cancels catastrophically.
        center = loc.mean(0)
        x, loc = x - center, loc - center
        maha = DiagonalGaussian._expanded_mahalanobis(x, loc, precision)  # N K
        log_det = torch.log(precision).sum(-1)  # K
        return 0.5 * (log_det - maha - loc.shape[-1] * LOG_2PI)

    @staticmethod
    def _expanded_mahalanobis(x, loc, precision):
        # sum_d prec_kd (x_nd - loc_kd)^2 = x^2 @ prec^T - 2 x @ (loc*prec)^T + sum_d loc^2 prec
        quadratic = (x * x) @ precision.T  # N K
        cross = x @ (loc * precision).T  # N K
        constant = (loc * loc * precision).sum(-1)  # K
        return (quadratic - 2 * cross + constant).clamp_min(0.0)

    @staticmethod
    def squared_mahalanobis(x, params):
        loc, precision = params["loc"], params["precision"]
        center = loc.mean(0)
        return DiagonalGaussian._expanded_mahalanobis(x - center, loc - center, precision)

    @staticmethod
    def covariance(params):
        return 1.0 / params["precision"]

    @staticmethod
    def affine_transform(params, shift, scale):
        return {"loc": params["loc"] * scale + shift, "precision": params["precision"] / scale**2}

    @staticmethod
    def draw(params, index):
        loc, precision = params["loc"][index], params["precision"][index]
        return loc + torch.randn_like(loc) * precision.rsqrt()

    def init_variational(self, centers, variance):
        variance = variance.expand_as(centers).clone()
        return {
            "loc_mean": (centers.clone(), constraints.real),
            "loc_scale": (_initial_loc_scale(centers, self.data_variance), constraints.positive),
            "variance": (variance, constraints.positive),
        }

    def point_params(self, q):
        return {"loc": q["loc_mean"], "precision": 1.0 / (q["variance"] + self.reg_covar)}

    def sample_guide(self, q):
        loc = self._sample_loc_guide(q)
        precision = self.point_params(q)["precision"]
        pyro.sample("precision", dist.Delta(precision, event_dim=1))
        return {"loc": loc, "precision": precision}

    def expected_log_density(self, x, q):
        params = self.point_params(q)
        # E over q(loc) of -0.5 * prec * (x - loc)^2 adds -0.5 * prec * loc_scale^2.
        loc_spread = (params["precision"] * q["loc_scale"] ** 2).sum(-1)  # K
        return self.log_density(x, params) - 0.5 * loc_spread

    def prior_divergence(self, q):
        precision = self.point_params(q)["precision"]
        return self._loc_divergence(q) - self._precision_prior().log_prob(precision).sum()


@register_family
class FullGaussian(ComponentFamily):
    """Gaussian components with full covariance, parametrised by precision Cholesky factors.

    Prior: ``loc_kd ~ Normal(m_d, s_d)`` and precision ``Lambda_k ~ Wishart(df, V)`` with
    ``df = dim + precision_dof`` and ``V = diag(1 / var) / df``, so ``E[Lambda_k]`` is the
    inverse of the diagonal data covariance. Variational family: ``loc ~ Normal``
    (mean-field) and a point estimate (MAP) of the lower Cholesky factor of the precision.
    ``reg_covar`` is a floor on the Cholesky diagonal relative to the data scale.
    """

    name = "full"

    def __init__(self, loc_mean, loc_scale, data_variance, *, precision_dof: float = 1.0, reg_covar: float = 1e-3):
        super().__init__(loc_mean, loc_scale, data_variance)
        if precision_dof <= 0:
            raise ValueError(f"precision_dof must be positive, got {precision_dof!r}.")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be non-negative, got {reg_covar!r}.")
        self.precision_dof = precision_dof
        self.reg_covar = reg_covar

    @property
    def _df(self) -> float:
        return self.dim + self.precision_dof

    def _log_prior_precision(self, precision_tril: torch.Tensor) -> torch.Tensor:
        # Wishart log-density up to a constant: (df - D - 1)/2 log|Lambda| - tr(V^-1 Lambda)/2,
        # with log|Lambda| = 2 sum log diag L and tr(V^-1 L L^T) = sum_ij V^-1_ii L_ij^2.
        df = self._df
        log_det = 2 * torch.log(torch.diagonal(precision_tril, dim1=-2, dim2=-1)).sum(-1)  # K
        inverse_scale = df * self.data_variance  # diag of V^-1
        trace = (inverse_scale.unsqueeze(-1) * precision_tril**2).sum((-2, -1))  # K
        return (0.5 * (df - self.dim - 1) * log_det - 0.5 * trace).sum()

    def sample_prior(self, num_components):
        loc = self.sample_loc(num_components)
        scale = torch.diag_embed(1.0 / (self._df * self.data_variance))
        wishart = dist.Wishart(torch.as_tensor(self._df, dtype=scale.dtype), covariance_matrix=scale)
        precision = pyro.sample("precision", wishart.expand([num_components]))
        return {"loc": loc, "precision_tril": torch.linalg.cholesky(precision)}

    @staticmethod
    def log_density(x, params):
        tril = params["precision_tril"]
        maha = FullGaussian.squared_mahalanobis(x, params)  # N K
        log_det = torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)  # K, half log|Lambda|
        return log_det - 0.5 * maha - 0.5 * tril.shape[-1] * LOG_2PI

    @staticmethod
    def squared_mahalanobis(x, params):
        loc, tril = params["loc"], params["precision_tril"]
        center = loc.mean(0)
        x, loc = x - center, loc - center
        projected_loc = torch.einsum("kd,kde->ke", loc, tril)  # K D
        num_components, dim = loc.shape
        chunk = max(1, _FULL_CHUNK_ELEMENTS // max(1, num_components * dim))
        pieces = []
        for start in range(0, x.shape[0], chunk):
            # ||L^T (x - loc)||^2 for every component as one batched matrix product.
            projected = torch.matmul(x[start : start + chunk], tril)  # K N D
            pieces.append(((projected - projected_loc.unsqueeze(1)) ** 2).sum(-1).T)  # N K
        return torch.cat(pieces, dim=0)

    @staticmethod
    def covariance(params):
        tril = params["precision_tril"]
        return torch.cholesky_inverse(tril)

    @staticmethod
    def affine_transform(params, shift, scale):
        # Lambda_x = S^-1 Lambda S^-1 with S = diag(scale), so L_x = S^-1 L stays lower triangular.
        return {"loc": params["loc"] * scale + shift, "precision_tril": params["precision_tril"] / scale.unsqueeze(-1)}

    @staticmethod
    def draw(params, index):
        loc, tril = params["loc"][index], params["precision_tril"][index]
        # x = loc + L^-T eps has covariance (L L^T)^-1.
        noise = torch.randn_like(loc).unsqueeze(-1)
        return loc + torch.linalg.solve_triangular(tril.transpose(-1, -2), noise, upper=True).squeeze(-1)

    def init_variational(self, centers, variance):
        num_components, dim = centers.shape
        diagonal = (1.0 / variance.sqrt()).expand(num_components, dim)
        return {
            "loc_mean": (centers.clone(), constraints.real),
            "loc_scale": (_initial_loc_scale(centers, self.data_variance), constraints.positive),
            "precision_tril": (torch.diag_embed(diagonal).clone(), constraints.lower_cholesky),
        }

    def point_params(self, q):
        tril = q["precision_tril"]
        if self.reg_covar > 0:
            # Cap the precision along each axis at 1 / (reg_covar * var_d) by bounding
            # the Cholesky diagonal, which keeps every covariance well conditioned.
            cap = 1.0 / torch.sqrt(self.reg_covar * self.data_variance)
            diagonal = torch.diagonal(tril, dim1=-2, dim2=-1)
            tril = tril - torch.diag_embed(diagonal) + torch.diag_embed(torch.minimum(diagonal, cap))
        return {"loc": q["loc_mean"], "precision_tril": tril}

    def sample_guide(self, q):
        loc = self._sample_loc_guide(q)
        tril = self.point_params(q)["precision_tril"]
        pyro.sample("precision", dist.Delta(tril @ tril.transpose(-1, -2), event_dim=2))
        return {"loc": loc, "precision_tril": tril}

    def expected_log_density(self, x, q):
        params = self.point_params(q)
        tril = params["precision_tril"]
        # E over q(loc) adds -0.5 tr(Lambda diag(s^2)) = -0.5 sum_d s_d^2 sum_e L_de^2.
        loc_spread = (q["loc_scale"] ** 2 * (tril**2).sum(-1)).sum(-1)  # K
        return self.log_density(x, params) - 0.5 * loc_spread

    def prior_divergence(self, q):
        tril = self.point_params(q)["precision_tril"]
        return self._loc_divergence(q) - self._log_prior_precision(tril)
