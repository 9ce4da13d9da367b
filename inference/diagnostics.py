"""Posterior diagnostics shared by every inference algorithm.

:func:`component_count_posterior` returns the posterior over the number of components
as one type for every algorithm. :func:`inference_data` packs the posterior draws and the
sampler or optimiser trace into an :class:`arviz.InferenceData` (saved as netCDF). The
plotting functions write the component-count distribution, trace and rank plots
(samplers) or the objective trace and ``q(alpha)`` (variational algorithms).

Two kinds of posterior reach these functions:

- ``algorithm="gibbs"`` has several chains. Its number of components is the number of
  occupied clusters of every kept sweep, read from ``trace["num_clusters"]``.
- every other algorithm (SVI, online EM, scikit-learn) has a variational posterior of the
  weights. Its draws form one chain of independent samples: weights drawn from the
  posterior, then ``num_points`` assignments drawn from those weights, and the count of
  occupied components is one sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import xarray as xr

from .posterior import ComponentCount, Posterior

logger = logging.getLogger(__name__)

# Mass whose number of components `mass_components` reports.
DEFAULT_MASS = 0.99
# Largest weights kept per draw in the `sorted_weights` variable.
DEFAULT_TOP_COMPONENTS = 10
# Tolerance for the rounding of a cumulative weight sum that should reach `mass` exactly.
_CUMULATIVE_ROUNDING = 1e-12


@dataclasses.dataclass
class ComponentCountPosterior(ComponentCount):
    """Posterior of the number of components, with the components that hold most of the mass.

    Attributes
    ----------
    mass_components : np.ndarray of shape (num_samples,)
        For the same draw as ``samples[i]``, the fewest components whose weights sum to at
        least ``mass``, int64.
    mass : float
        Probability mass that ``mass_components`` covers.
    """

    mass_components: np.ndarray | None = None
    mass: float = DEFAULT_MASS


def component_count_posterior(
    posterior: Posterior,
    num_points: int | None = None,
    num_samples: int = 1000,
    seed: int = 0,
    *,
    mass: float = DEFAULT_MASS,
) -> ComponentCountPosterior:
    """Compute the posterior over the number of components, the same way for every algorithm.

    Parameters
    ----------
    posterior : Posterior
        Output of any ``fit_*`` function.
    num_points : int or None
        Number of points whose occupied components are counted. None uses
        ``posterior.settings["num_points"]`` (stored by Gibbs and online EM, not by SVI).
        A Gibbs posterior counts the clusters of the points it sampled, so another value
        only triggers a warning.
    num_samples : int
        Draws from a variational posterior; ignored for Gibbs, which has one per kept sweep.
    seed : int
        Seeds the weight and assignment draws of a variational posterior.
    mass : float
        Probability mass for ``mass_components``, in (0, 1].

    Returns
    -------
    ComponentCountPosterior
        ``samples`` and ``mass_components`` of shape (num_samples,); ``chain`` is
        the chain of each draw for Gibbs and is None otherwise.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass!r}; pass for example 0.99.")
    if posterior.algorithm == "gibbs":
        return _sampled_count(posterior, num_points, mass)
    num_points = _resolve_num_points(posterior, num_points)
    count = posterior.num_components(num_points, num_samples, seed=seed)
    # `Posterior.num_components` draws its weights with `sample(num_samples, seed=seed)`,
    # so the same call returns the same weights, draw for draw.
    weights = posterior.sample(num_samples, seed=seed)["weights"].double().cpu().numpy()
    return ComponentCountPosterior(
        count.samples, count.num_points, count.source, None, _mass_components(weights, mass), mass
    )


def _sampled_count(posterior: Posterior, num_points: int | None, mass: float) -> ComponentCountPosterior:
    from .gibbs import component_count

    count = component_count(posterior)
    if num_points is not None and num_points != count.num_points:
        warnings.warn(
            f"num_points={num_points} differs from the {count.num_points} points the Gibbs sampler "
            f"ran on; the counts refer to those {count.num_points} points.",
            stacklevel=3,
        )
    weights = posterior.draws["weights"].double().cpu().numpy()
    assert len(weights) == len(count.samples), "Gibbs keeps one weight draw per kept sweep and chain"
    return ComponentCountPosterior(
        count.samples, count.num_points, count.source, count.chain, _mass_components(weights, mass), mass
    )


def _resolve_num_points(posterior: Posterior, num_points: int | None) -> int:
    if num_points is not None:
        return int(num_points)
    stored = posterior.settings.get("num_points")
    if stored is None:
        raise ValueError(
            f"num_points is None and the {posterior.algorithm!r} posterior does not store the number "
            "of points it was fitted on; pass num_points, for example the number of training patches."
        )
    return int(stored)


def _mass_components(weights: np.ndarray, mass: float) -> np.ndarray:
    """Return the fewest components holding ``mass`` of each row of ``weights`` (num_samples, K)."""
    sorted_weights = -np.sort(-weights, axis=1)  # S K
    cumulative = np.cumsum(sorted_weights, axis=1) / sorted_weights.sum(1, keepdims=True)  # S K
    count = (cumulative < mass - _CUMULATIVE_ROUNDING).sum(1) + 1
    return np.minimum(count, weights.shape[1]).astype(np.int64)


# -- ArviZ InferenceData ------------------------------------------------------------------


def inference_data(
    posterior: Posterior,
    num_points: int | None = None,
    num_samples: int = 1000,
    seed: int = 0,
    *,
    top_components: int = DEFAULT_TOP_COMPONENTS,
) -> az.InferenceData:
    """Pack the posterior draws and the fitting trace into an ArviZ ``InferenceData``.

    Parameters
    ----------
    posterior : Posterior
    num_points, num_samples, seed
        As in :func:`component_count_posterior`.
    top_components : int
        Largest weights per draw kept in ``sorted_weights``.

    Returns
    -------
    arviz.InferenceData
        ``posterior`` group with ``num_components`` and ``alpha`` of dims (chain, draw),
        ``sorted_weights`` of dims (chain, draw, component) in decreasing order, and for
        Gibbs ``log_likelihood`` (chain, draw), the log marginal likelihood of the
        sampled partition. A variational posterior has one chain of ``num_samples``
        independent draws. ``sample_stats`` contains the Gibbs ``log_likelihood`` and
        ``alpha`` of the kept sweeps, or the variational objective trace (``elbo``,
        ``nll``, ...) as one chain whose ``draw`` is the step or epoch.
        ``warmup_sample_stats`` contains the Gibbs burn-in sweeps. The attributes of the
        ``posterior`` group name the algorithm, the backbone and ``q(alpha)``.
    """
    if top_components < 1:
        raise ValueError(f"top_components must be a positive integer, got {top_components!r}.")
    count = component_count_posterior(posterior, num_points, num_samples, seed)
    if posterior.algorithm == "gibbs":
        groups = _gibbs_groups(posterior, count, top_components)
    else:
        groups = _variational_groups(posterior, count, num_samples, seed, top_components)
    groups["posterior"].attrs.update(_attributes(posterior, count))
    return az.InferenceData(**groups)


def _gibbs_groups(posterior: Posterior, count: ComponentCount, top_components: int) -> dict[str, xr.Dataset]:
    settings = posterior.settings
    burn_in, thin = settings["burn_in"], settings["thin"]
    kept = {key: np.asarray(posterior.trace[key], dtype=np.float64)[:, burn_in::thin] for key in ("alpha", "log_likelihood")}
    num_chains, num_draws = kept["alpha"].shape
    weights = posterior.draws["weights"].double().cpu().numpy().reshape(num_chains, num_draws, -1)
    variables = {
        "num_components": count.samples.reshape(num_chains, num_draws),
        "alpha": kept["alpha"],
        "log_likelihood": kept["log_likelihood"],
        "sorted_weights": _top_weights(weights, top_components),
    }
    groups = {"posterior": _dataset(variables), "sample_stats": _dataset(kept)}
    if burn_in > 0:
        warmup = {key: np.asarray(posterior.trace[key], dtype=np.float64)[:, :burn_in] for key in posterior.trace}
        groups["warmup_sample_stats"] = _dataset(warmup)
    return groups


def _variational_groups(posterior, count, num_samples, seed, top_components) -> dict[str, xr.Dataset]:
    weights = posterior.sample(num_samples, seed=seed)["weights"].double().cpu().numpy()
    variables = {
        "num_components": count.samples[None],
        "alpha": _alpha_draws(posterior.alpha, num_samples, seed)[None],
        "sorted_weights": _top_weights(weights[None], top_components),
    }
    # NOTE: a variational posterior has no per-draw log-likelihood without the data, so
    # `log_likelihood` is left out; the objective trace in `sample_stats` takes its place.
    groups = {"posterior": _dataset(variables)}
    if posterior.trace:
        groups["sample_stats"] = _trace_dataset(posterior.trace)
    return groups


def _alpha_draws(alpha: dict[str, Any], num_samples: int, seed: int) -> np.ndarray:
    """Return ``num_samples`` draws of the concentration from its stored posterior."""
    if "shape" in alpha:
        rng = np.random.default_rng(seed)
        return rng.gamma(alpha["shape"], 1.0 / alpha["rate"], size=num_samples)
    if "samples" in alpha:
        rng = np.random.default_rng(seed)
        return rng.choice(np.asarray(alpha["samples"], dtype=np.float64), size=num_samples)
    if "value" in alpha:
        return np.full(num_samples, float(alpha["value"]))
    return np.full(num_samples, np.nan)


def _top_weights(weights: np.ndarray, top_components: int) -> np.ndarray:
    """Return the ``top_components`` largest weights of (chain, draw, K) in decreasing order."""
    sorted_weights = -np.sort(-weights, axis=-1)
    kept = sorted_weights[..., :top_components]
    if kept.shape[-1] < top_components:
        padding = np.zeros((*kept.shape[:-1], top_components - kept.shape[-1]))
        kept = np.concatenate([kept, padding], axis=-1)
    return kept


def _dataset(variables: dict[str, np.ndarray]) -> xr.Dataset:
    """Build a dataset with dims (chain, draw[, component]) from arrays of that shape."""
    data_vars = {}
    for name, values in variables.items():
        dims = ("chain", "draw", "component")[: values.ndim]
        data_vars[name] = (dims, values)
    dataset = xr.Dataset(data_vars)
    return dataset.assign_coords({dim: np.arange(dataset.sizes[dim]) for dim in dataset.dims})


def _trace_dataset(trace: dict[str, list]) -> xr.Dataset:
    """Build a one-chain dataset from an objective trace; keys of another length get their own dim."""
    length = len(next(iter(trace.values())))
    data_vars = {}
    for key, values in trace.items():
        values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        dim = "draw" if len(values) == length else f"{key}_draw"
        data_vars[key] = (("chain", dim), values[None])
    dataset = xr.Dataset(data_vars)
    return dataset.assign_coords({dim: np.arange(dataset.sizes[dim]) for dim in dataset.dims})


def _attributes(posterior: Posterior, count: ComponentCount) -> dict[str, Any]:
    """Return netCDF-safe attributes (strings and numbers only)."""
    attributes = {
        "algorithm": posterior.algorithm,
        "backbone": backbone_label(posterior.provenance.get("backbone")),
        "family": posterior.family,
        "num_points": int(count.num_points),
        "count_source": count.source,
        "alpha": json.dumps(posterior.alpha),
    }
    if "shape" in posterior.alpha:
        attributes["alpha_shape"] = float(posterior.alpha["shape"])
        attributes["alpha_rate"] = float(posterior.alpha["rate"])
    return attributes


def backbone_label(backbone) -> str:
    """Return the backbone name from provenance: a name, a ``Backbone.describe()`` dict, or None."""
    if backbone is None:
        return "unknown backbone"
    if isinstance(backbone, dict):
        return str(backbone.get("name", "unknown backbone"))
    return str(backbone)


def save_inference_data(idata: az.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` as netCDF (via a temporary file, so a crash leaves no partial file)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    idata.to_netcdf(str(temporary))
    temporary.replace(path)
    return path


def load_inference_data(path: str | Path) -> az.InferenceData:
    """Read an ``InferenceData`` written by :func:`save_inference_data`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inference data file not found: {path}; write it with `dinodpmm diagnose` first.")
    return az.from_netcdf(str(path))


# -- convergence summary --------------------------------------------------------------------


def summarize(idata: az.InferenceData, var_names: list[str] | None = None):
    """Compute ``arviz.summary`` (mean, sd, HDI, R-hat, bulk and tail ESS) of the posterior group.

    Variables that are constant over every draw (a fixed ``alpha``, a sampler stuck at one
    cluster count) have no defined R-hat or ESS, so they are left out of the table and
    returned separately with their value.

    Returns
    -------
    summary : pandas.DataFrame
        One row per (scalar element of a) non-constant variable.
    constants : dict of str to float
        The left-out variables and their value.
    """
    names = var_names or [name for name in ("num_components", "alpha", "log_likelihood") if name in idata.posterior]
    constants, varying = {}, []
    for name in names:
        values = idata.posterior[name].values
        if np.all(values == values.flat[0]):
            constants[name] = float(values.flat[0])
        else:
            varying.append(name)
    if not varying:
        return None, constants
    if idata.posterior.sizes["chain"] > 1:
        return az.summary(idata, var_names=varying, hdi_prob=0.94), constants
    with _quiet_arviz():
        return az.summary(idata, var_names=varying, hdi_prob=0.94), constants


@contextlib.contextmanager
def _quiet_arviz():
    """Silence ArviZ's log while it computes R-hat of one chain.

    ArviZ 0.23 logs "Shape validation failed ... minimum_shape: (chains=2, draws=4)" and
    returns NaN; callers explain the NaN themselves. Its logger (``arviz._log``) is an
    instance outside the ``logging`` registry, so ``logging.getLogger`` cannot reach it.
    """
    arviz_logger = getattr(az, "_log", None)
    if arviz_logger is None:
        yield
        return
    level = arviz_logger.level
    arviz_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        arviz_logger.setLevel(level)


# -- plots ---------------------------------------------------------------------------------


def plot_component_count(
    count: ComponentCount, path: str | Path, *, algorithm: str | None = None, backbone: str | None = None
) -> Path:
    """Plot the posterior distribution of the number of components as a bar chart, one colour per chain.

    Parameters
    ----------
    count : ComponentCount
        From :func:`component_count_posterior`.
    path : str or Path
        Output image; the suffix sets the format (``.png``, ``.pdf``, ...).
    algorithm, backbone : str or None
        Named in the title; ``algorithm`` defaults to ``count.source``.
    """
    figure, axes = _new_figure()
    chains = np.zeros(len(count.samples), dtype=np.int64) if count.chain is None else count.chain
    values = np.arange(count.samples.min(), count.samples.max() + 1)
    bottom = np.zeros(len(values))
    for chain in np.unique(chains):
        frequency = np.array([(count.samples[chains == chain] == v).sum() for v in values]) / len(count.samples)
        label = f"chain {chain}" if count.chain is not None else None
        axes.bar(values, frequency, bottom=bottom, label=label)
        bottom += frequency
    axes.set_xlabel(f"occupied components among {count.num_points} points")
    axes.set_ylabel("posterior probability")
    if count.chain is not None:
        axes.legend()
    axes.set_title(f"{_title(algorithm or count.source, backbone)}: number of components")
    return _save(figure, Path(path))


def plot_diagnostics(idata: az.InferenceData, out_dir: str | Path) -> list[Path]:
    """Write the diagnostic figures of ``idata`` to ``out_dir`` and return their paths.

    A sampler (several chains) gets ``trace.png`` and ``rank.png`` for ``num_components``,
    ``log_likelihood`` and a sampled ``alpha``. A variational posterior gets
    ``objective.png`` (the ELBO or NLL trace) and, when ``alpha`` has a Gamma posterior,
    ``q_alpha.png``. Both get ``num_components.png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attributes = idata.posterior.attrs
    title = _title(attributes.get("algorithm", "unknown algorithm"), attributes.get("backbone"))
    count = ComponentCount(
        idata.posterior["num_components"].values.reshape(-1).astype(np.int64),
        int(attributes.get("num_points", 0)),
        str(attributes.get("count_source", "")),
        np.repeat(np.arange(idata.posterior.sizes["chain"]), idata.posterior.sizes["draw"])
        if idata.posterior.sizes["chain"] > 1 else None,
    )
    paths = [plot_component_count(count, out_dir / "num_components.png", algorithm=title)]
    if idata.posterior.sizes["chain"] > 1:
        paths += _plot_sampler(idata, out_dir, title)
    else:
        paths += _plot_variational(idata, out_dir, title)
    return paths


def _plot_sampler(idata: az.InferenceData, out_dir: Path, title: str) -> list[Path]:
    _, constants = summarize(idata)
    names = [n for n in ("num_components", "alpha", "log_likelihood") if n in idata.posterior and n not in constants]
    if not names:
        logger.info("every sampled variable is constant, so no trace or rank plot is written")
        return []
    paths = []
    with _arviz_matplotlib_compatibility():
        for kind, plot in (("trace", az.plot_trace), ("rank", az.plot_rank)):
            axes = plot(idata, var_names=names)
            figure = np.ravel(axes)[0].figure
            figure.suptitle(f"{title}: {kind} plot")
            figure.tight_layout()
            paths.append(_save(figure, out_dir / f"{kind}.png"))
    return paths


def _plot_variational(idata: az.InferenceData, out_dir: Path, title: str) -> list[Path]:
    paths = []
    stats = getattr(idata, "sample_stats", None)
    objective = next((key for key in ("elbo", "nll", "lower_bound") if stats is not None and key in stats), None)
    if objective is not None:
        figure, axes = _new_figure()
        values = stats[objective].values[0]
        axes.plot(np.arange(1, len(values) + 1), values)
        axes.set_xlabel("step" if objective == "elbo" else "epoch or iteration")
        axes.set_ylabel(objective)
        axes.set_title(f"{title}: {objective} trace")
        paths.append(_save(figure, out_dir / "objective.png"))
    if "alpha_shape" in idata.posterior.attrs:
        paths.append(_plot_q_alpha(idata.posterior.attrs, out_dir / "q_alpha.png", title))
    return paths


def _plot_q_alpha(attributes, path: Path, title: str) -> Path:
    from scipy.stats import gamma

    shape, rate = float(attributes["alpha_shape"]), float(attributes["alpha_rate"])
    q_alpha = gamma(shape, scale=1.0 / rate)
    grid = np.linspace(q_alpha.ppf(0.001), q_alpha.ppf(0.999), 400)
    figure, axes = _new_figure()
    axes.plot(grid, q_alpha.pdf(grid))
    axes.set_xlabel("alpha")
    axes.set_ylabel("density")
    axes.set_title(f"{title}: q(alpha) = Gamma({shape:.3g}, rate={rate:.3g})")
    return _save(figure, path)


def _title(algorithm: str, backbone: str | None) -> str:
    return algorithm if backbone is None else f"{algorithm} ({backbone})"


def _new_figure():
    """Return a figure and its axes outside pyplot, so no GUI backend is involved."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    return figure, figure.subplots()


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    # ArviZ figures live in pyplot; closing one made with `Figure()` is a no-op.
    plt.close(figure)
    return path


class _arviz_matplotlib_compatibility(warnings.catch_warnings):
    """Silence two warnings of ArviZ 0.23 plots that do not apply to these figures.

    ArviZ passes a dict as ``alias_mapping`` to ``matplotlib.cbook.normalize_kwargs``,
    deprecated since matplotlib 3.11; the plots are unaffected. ArviZ also warns when one
    chain of a variable is constant, because it cannot draw that chain's density. For a
    sampler, a chain stuck at one cluster count is a finding that the trace plot shows.
    """

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings(
            "ignore", message="Passing a dict or None as alias_mapping", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message="Your data appears to have a single value or no finite values", category=UserWarning
        )
        return result
