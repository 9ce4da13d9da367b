"""Stochastic variational inference for the stick-breaking DPMM with Pyro.

The default objective, :class:`MeanFieldELBO`, is the evidence lower bound of the model
with the assignments ``z`` kept as latent variables under a mean-field ``q(z)`` that is
optimised in closed form for each minibatch::

    ELBO = sum_n logsumexp_k(E_q[log pi_k] + E_q[log p(x_n | theta_k)])
           - KL(q(v) || p(v | alpha)) - KL(q(alpha) || p(alpha)) - KL(q(theta) || p(theta))

Every expectation is analytic for the built-in families, so a step costs two matrix
products over the minibatch and has no Monte Carlo noise beyond the subsampling. Through
``E_q[log pi_k]`` the bound penalises components that explain few points, the same
mechanism that lets batch variational inference (scikit-learn's
``BayesianGaussianMixture``) switch off superfluous components. ``elbo="trace"`` instead
optimises Pyro's ``TraceMeanField_ELBO`` on :meth:`DPMM.model`, with ``z`` summed out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.distributions import Beta, Gamma
from tqdm.auto import tqdm

from ..models.components import ComponentFamily, get_family
from ..models.dpmm import DPMM, rows_as_tensor
from ..models.stick_breaking import expected_log_weights, log_mean_weights
from .initialization import kmeans_init
from .posterior import Posterior

logger = logging.getLogger(__name__)

_ELBOS = ("mean-field", "trace")


class MeanFieldGuide:
    """Mean-field variational family ``q(alpha) q(v) prod_k q(theta_k)`` as a Pyro guide.

    ``q(v_k)`` is Beta, ``q(alpha)`` Gamma (when alpha has a hyperprior) and the
    component family sets ``q(theta_k)``: Normal means and point-estimated
    (co)variances for the Gaussian families. Parameters live in Pyro's param store
    under names starting with ``prefix``.

    Parameters
    ----------
    dpmm : DPMM
    centers : torch.Tensor of shape (truncation, dim)
        Initial component means, ordered by decreasing initial weight.
    variance : torch.Tensor of shape (dim,)
        Initial per-dimension component variance.
    counts : torch.Tensor of shape (truncation,)
        Initial expected number of points per component (on the full-data scale).
    """

    def __init__(self, dpmm: DPMM, centers, variance, counts, *, prefix: str = "q."):
        self.dpmm = dpmm
        self.prefix = prefix
        self._names = []
        for name, (value, constraint) in self._initial_values(centers, variance, counts).items():
            pyro.param(prefix + name, value, constraint=constraint)
            self._names.append(name)

    def _initial_values(self, centers, variance, counts):
        dpmm = self.dpmm
        # q(v_k) = Beta(1 + n_k, alpha + sum_{j>k} n_j), the stick posterior given counts n.
        later = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])[1:]
        values = {
            "sticks.concentration1": (1.0 - dpmm.discount + counts[:-1], dist.constraints.positive),
            "sticks.concentration0": (dpmm.alpha + later, dist.constraints.positive),
        }
        if dpmm.alpha_prior is not None:
            shape, rate = dpmm.alpha_prior
            values["alpha.concentration"] = (torch.tensor(shape).to(centers), dist.constraints.positive)
            values["alpha.rate"] = (torch.tensor(shape / dpmm.alpha).to(centers), dist.constraints.positive)
        for name, pair in dpmm.family.init_variational(centers, variance).items():
            values["component." + name] = pair
        return values

    def variational(self) -> dict[str, torch.Tensor]:
        """Return the current variational parameters by name (without the prefix)."""
        return {name: pyro.param(self.prefix + name) for name in self._names}

    @staticmethod
    def stick_distribution(q: dict[str, torch.Tensor]) -> Beta:
        return Beta(q["sticks.concentration1"], q["sticks.concentration0"])

    @staticmethod
    def alpha_distribution(q: dict[str, torch.Tensor]) -> Gamma | None:
        if "alpha.concentration" not in q:
            return None
        return Gamma(q["alpha.concentration"], q["alpha.rate"])

    @staticmethod
    def component_parameters(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("component."): v for k, v in q.items() if k.startswith("component.")}

    def __call__(self, data, subsample: torch.Tensor | None = None) -> None:
        """Pyro guide matching :meth:`DPMM.model` site by site."""
        q = self.variational()
        q_alpha = self.alpha_distribution(q)
        if q_alpha is not None:
            pyro.sample("alpha", q_alpha)
        with pyro.plate("sticks", self.dpmm.truncation - 1):
            pyro.sample("v", self.stick_distribution(q))
        with pyro.plate("components", self.dpmm.truncation):
            self.dpmm.family.sample_guide(self.component_parameters(q))
        with pyro.plate("data", len(data), subsample=subsample):
            pass


class MeanFieldELBO(pyro.infer.ELBO):
    """Analytic mean-field ELBO with ``q(z)`` optimised in closed form (see the module docstring).

    The minibatch term is scaled by ``num_points / batch_size``, so each step's value is
    an unbiased estimate of the full-data ELBO.
    """

    def __init__(self, dpmm: DPMM, guide: MeanFieldGuide):
        super().__init__()
        self.dpmm = dpmm
        self.guide = guide

    def differentiable_loss(self, model, guide, data, subsample: torch.Tensor) -> torch.Tensor:
        q = self.guide.variational()
        family = self.dpmm.family
        components = self.guide.component_parameters(q)
        q_sticks = self.guide.stick_distribution(q)

        batch = rows_as_tensor(data, subsample, like=family.loc_mean)
        log_weights = expected_log_weights(q_sticks)  # K
        log_joint = log_weights + family.expected_log_density(batch, components)  # B K
        local = torch.logsumexp(log_joint, dim=-1).sum() * (len(data) / len(subsample))

        divergence = self.dpmm.stick_divergence(q_sticks, self.guide.alpha_distribution(q))
        divergence = divergence + family.prior_divergence(components)
        return divergence - local

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("MeanFieldELBO computes the bound analytically and records no traces.")

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def fit_svi(
    data: torch.Tensor | np.ndarray,
    *,
    truncation: int = 500,
    covariance: str = "diag",
    alpha: float = 1.0,
    alpha_prior: Sequence[float] | None = None,
    discount: float = 0.0,
    batch_size: int = 4096,
    num_steps: int | None = None,
    num_epochs: float | None = None,
    max_steps: int = 5000,
    learning_rate: float = 0.05,
    final_learning_rate: float = 0.005,
    tolerance: float = 1e-4,
    window: int = 50,
    elbo: str = "mean-field",
    init_subsample: int = 20000,
    kmeans_iterations: int = 10,
    family_options: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    num_threads: int | None = None,
) -> Posterior:
    """Fit the stick-breaking DPMM by stochastic variational inference.

    Parameters
    ----------
    data : torch.Tensor or np.ndarray of shape (num_points, dim)
        Embeddings. A memory-mapped array is never loaded whole: minibatches and the
        initialisation subsample are read row by row.
    truncation : int
        Number of components ``T`` of the truncated process.
    covariance : str
        Registered component family: ``"diag"`` or ``"full"``.
    alpha : float
        Concentration; with ``alpha_prior`` its initial value.
    alpha_prior : tuple of float or None
        ``(shape, rate)`` of a Gamma hyperprior on alpha, inferred with a Gamma ``q``.
    discount : float
        Pitman-Yor discount (0 is the Dirichlet process).
    batch_size : int
        Rows per minibatch; the whole data when it has fewer rows.
    num_steps, num_epochs : int or float or None
        Fixed length of the run (steps, or passes over the data). With both None the
        run stops when the ELBO converges or after ``max_steps`` steps.
    learning_rate, final_learning_rate : float
        Adam step size at the start and at the last step (exponential decay between).
    tolerance, window : float, int
        Convergence: the mean ELBO of the last ``window`` steps improved on the window
        before by less than ``tolerance`` times its magnitude, or by less than twice the
        standard error that minibatch noise gives the difference. Ignored when the
        length is fixed.
    elbo : str
        ``"mean-field"`` (analytic, default) or ``"trace"`` (Pyro ``TraceMeanField_ELBO``).
    init_subsample, kmeans_iterations : int
        k-means++ seeding and Lloyd iterations on a random subsample of this many rows.
    family_options : dict or None
        Keyword options of the family's ``from_data``, e.g. ``{"reg_covar": 1e-4}``.
    seed : int
        Seeds the subsample, the initialisation, the minibatches and Pyro.
    device : str
        ``"cpu"`` or ``"cuda"``.
    dtype : torch.dtype
        Floating point type of the computation.
    progress : bool
        Show a tqdm progress bar with the running ELBO.
    provenance : dict or None
        Stored in the posterior, for example ``{"backbone": "dinov2_vits14"}``.
    num_threads : int or None
        CPU threads of torch during the fit, restored afterwards; None keeps the current
        setting. A step works on small matrices, and on a CPU shared with other
        processes one thread can be many times faster than two.

    Returns
    -------
    Posterior
        With ``algorithm="svi"``, expected weights from ``q(v)``, the means of ``q``
        as point estimates, ``trace["elbo"]`` (per-step ELBO estimates).
    """
    if num_threads is not None:
        options = {key: value for key, value in locals().items() if key not in ("data", "num_threads")}
        with _torch_threads(num_threads):
            return fit_svi(data, **options)

    settings = dict(locals())
    del settings["data"]
    settings["dtype"] = str(dtype).removeprefix("torch.")
    num_points, dim = _check_data(data)
    _check_options(truncation, batch_size, elbo, tolerance, window, device)
    _check_learning_rates(learning_rate, final_learning_rate)
    batch_size = min(batch_size, num_points)
    total_steps = _resolve_num_steps(num_steps, num_epochs, max_steps, num_points, batch_size)

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(seed)
    sample = _checked_subsample(data, init_subsample, generator, dtype).to(device=device, dtype=dtype)
    shift, scale = sample.mean(0), sample.std(0).clamp_min(1e-12)
    standardized = _Standardized(data, shift, scale)

    family = get_family(covariance).from_data((sample - shift) / scale, **(family_options or {}))
    dpmm = DPMM(family, truncation, alpha=alpha, alpha_prior=alpha_prior, discount=discount)
    centers, variance, counts = kmeans_init((sample - shift) / scale, truncation, kmeans_iterations, generator)
    counts = counts * (num_points / len(sample))
    guide = MeanFieldGuide(dpmm, centers, variance, counts)

    loss = MeanFieldELBO(dpmm, guide) if elbo == "mean-field" else TraceMeanField_ELBO()
    decay = (final_learning_rate / learning_rate) ** (1.0 / max(total_steps, 1))
    optimizer = pyro.optim.ClippedAdam({"lr": learning_rate, "lrd": decay, "clip_norm": 10.0})
    svi = SVI(dpmm.model, guide, optimizer, loss=loss)

    started = time.perf_counter()
    trace = _run_steps(svi, standardized, num_points, batch_size, total_steps, fixed_length=num_steps is not None
                       or num_epochs is not None, tolerance=tolerance, window=window, generator=generator,
                       progress=progress)
    settings["steps_run"] = len(trace)
    settings["num_points"] = num_points
    settings["wall_time_s"] = time.perf_counter() - started
    logger.info("SVI ran %d steps in %.1f s, final ELBO %.4g", len(trace), settings["wall_time_s"], trace[-1])
    return _summarize(guide, dpmm, shift, scale, trace, settings, provenance)


@contextlib.contextmanager
def _torch_threads(num_threads: int):
    """Set torch's CPU thread count inside the block and restore it afterwards."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_steps(svi, data, num_points, batch_size, total_steps, *, fixed_length, tolerance, window,
               generator, progress) -> list[float]:
    trace: list[float] = []
    bar = tqdm(total=total_steps, desc="SVI", disable=not progress, leave=False)
    minibatches = _epoch_minibatches(num_points, batch_size, generator)
    for step in range(total_steps):
        subsample = next(minibatches)
        elbo = -svi.step(data, subsample)
        if not math.isfinite(elbo):
            raise FloatingPointError(
                f"the ELBO became {elbo} at step {step}; lower learning_rate, raise "
                "reg_covar in family_options, or check the data for NaN, infinite or huge values."
            )
        trace.append(elbo)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(elbo=f"{np.mean(trace[-window:]):.5g}")
        if not fixed_length and _converged(trace, window, tolerance):
            logger.info("ELBO converged after %d steps", step + 1)
            break
    bar.close()
    return trace


def _epoch_minibatches(num_points: int, batch_size: int, generator: torch.Generator):
    """Yield row indices of ``batch_size`` rows, one random permutation per pass over the data.

    One permutation per epoch, not per step: a permutation of millions of rows costs
    tens of milliseconds. Each minibatch is still a uniform draw without replacement.
    """
    while True:
        order = torch.randperm(num_points, generator=generator)
        for start in range(0, num_points - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _converged(trace: list[float], window: int, tolerance: float) -> bool:
    """Return True when the last window of ELBO values improved on the one before by
    less than ``tolerance`` relative to it, or by less than two standard errors of the
    minibatch noise in the difference of the two window means."""
    if len(trace) < 2 * window or len(trace) % window:
        return False
    current = np.asarray(trace[-window:])
    previous = np.asarray(trace[-2 * window : -window])
    improvement = current.mean() - previous.mean()
    noise = np.sqrt((current.var() + previous.var()) / window)
    return improvement <= max(tolerance * abs(previous.mean()), 2.0 * noise)


def _summarize(guide, dpmm, shift, scale, trace, settings, provenance) -> Posterior:
    with torch.no_grad():
        q = {k: v.detach() for k, v in guide.variational().items()}
        family = dpmm.family
        components = guide.component_parameters(q)
        params = _unstandardize(family, family.point_params(components), shift, scale)
        q_sticks = guide.stick_distribution(q)
        q_alpha = guide.alpha_distribution(q)
        alpha = {"value": dpmm.alpha} if q_alpha is None else {
            "shape": q_alpha.concentration.item(), "rate": q_alpha.rate.item()}
        return Posterior(
            family=family.name,
            params=params,
            log_weights=log_mean_weights(q_sticks),
            sticks=(q_sticks.concentration1, q_sticks.concentration0),
            loc_scale=components["loc_scale"] * scale,
            alpha=alpha,
            algorithm="svi",
            settings=settings,
            trace={"elbo": trace},
            provenance=dict(provenance or {}),
        )


def _unstandardize(family: ComponentFamily, params, shift, scale) -> dict[str, torch.Tensor]:
    """Map parameters fitted on ``(x - shift) / scale`` back to the units of ``x``."""
    return family.affine_transform(params, shift, scale)


class _Standardized:
    """Row access to ``(data - shift) / scale`` without copying ``data``."""

    def __init__(self, data, shift, scale):
        self.data, self.shift, self.scale = data, shift, scale

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        rows = rows_as_tensor(self.data, torch.as_tensor(index), like=self.shift)
        return (rows - self.shift) / self.scale


def _subsample_rows(data, size: int, generator: torch.Generator) -> torch.Tensor:
    num_points = len(data)
    index = torch.randperm(num_points, generator=generator)[: min(size, num_points)]
    like = torch.empty(0, dtype=torch.float64)
    return rows_as_tensor(data, index, like=like)


def _checked_subsample(data, size: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Draw the initialisation subsample in float64 and check that ``dtype`` can fit it.

    Returns
    -------
    torch.Tensor of shape (num_samples, dim)
        float64 rows, ``num_samples = min(size, num_points)``.
    """
    sample = _subsample_rows(data, size, generator)
    if not torch.isfinite(sample).all():
        # NOTE: only the initialisation subsample is checked. Data with more rows than
        # `init_subsample` can still hide non-finite or huge rows, and those make
        # `_run_steps` raise once a minibatch gives a non-finite ELBO.
        raise ValueError(
            "data contains NaN or infinite values (found in the initialisation subsample); "
            "remove or impute those rows before fitting."
        )
    _check_magnitude(sample, dtype)
    return sample


def _check_data(data) -> tuple[int, int]:
    if not isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"data must be a torch.Tensor or numpy array of shape (num_points, dim), got {type(data).__name__}."
        )
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] < 1:
        raise ValueError(f"data must have shape (num_points, dim) with num_points >= 2, got {tuple(data.shape)}.")
    return int(data.shape[0]), int(data.shape[1])


def _check_options(truncation, batch_size, elbo, tolerance, window, device) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if elbo not in _ELBOS:
        raise ValueError(f"elbo must be one of {_ELBOS}, got {elbo!r}.")
    if tolerance < 0 or window < 1:
        raise ValueError(f"tolerance must be >= 0 and window >= 1, got {tolerance!r} and {window!r}.")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use device='cpu'.")


def _check_learning_rates(learning_rate, final_learning_rate) -> None:
    for name, value in (("learning_rate", learning_rate), ("final_learning_rate", final_learning_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{name} must be a finite positive number, got {value!r}; the defaults are "
                "learning_rate=0.05 and final_learning_rate=0.005."
            )


def _check_magnitude(sample: torch.Tensor, dtype: torch.dtype) -> None:
    """Reject values whose squared differences overflow ``dtype``.

    The variances of the standardisation and the squared distances of the posterior's
    log-density square differences of two values. Such a difference is at most twice the
    largest magnitude, so that magnitude must stay below ``sqrt(finfo.max) / 2``, which
    is about 9.2e18 for float32 and 6.7e153 for float64.

    Parameters
    ----------
    sample : torch.Tensor of shape (num_samples, dim)
        Rows of the data, in a dtype at least as wide as ``dtype``.
    dtype : torch.dtype
        Floating point type of the fit.
    """
    limit = math.sqrt(torch.finfo(dtype).max) / 2
    largest = float(sample.abs().max())
    if largest > limit:
        raise ValueError(
            f"data contains values up to {largest:.3g} in magnitude (found in the initialisation "
            f"subsample), but squared differences of values above {limit:.3g} overflow "
            f"dtype={dtype}; rescale the data, remove those rows, or fit with dtype=torch.float64."
        )


def _resolve_num_steps(num_steps, num_epochs, max_steps, num_points, batch_size) -> int:
    if num_steps is not None and num_epochs is not None:
        raise ValueError(
            f"give num_steps or num_epochs, not both (got {num_steps!r} and {num_epochs!r})."
        )
    if num_steps is not None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        return int(num_steps)
    if num_epochs is not None:
        if num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {num_epochs!r}.")
        return max(1, math.ceil(num_epochs * num_points / batch_size))
    return max_steps
