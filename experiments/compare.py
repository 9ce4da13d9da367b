"""Side-by-side comparison of the inference algorithms on the same patch embeddings.

:func:`compare_algorithms` fits each algorithm on one training patch matrix and reports
the held-out log-likelihood, the posterior over the number of components and the wall
time; an optional ``evaluate`` callback adds anomaly-detection metrics per posterior.
:func:`fit_sklearn` wraps scikit-learn's ``BayesianGaussianMixture`` (batch variational
inference for the truncated DP mixture, Blei and Jordan 2006) into a :class:`Posterior`,
so it is scored like the other algorithms.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.diagnostics import component_count_posterior
from ..inference.posterior import Posterior

logger = logging.getLogger(__name__)

ALGORITHMS = ("svi", "gibbs", "online-em", "sklearn")

# Probability of the equal-tailed interval of the number of components (ArviZ's default
# HDI probability, so the table matches `arviz.summary`).
INTERVAL_PROBABILITY = 0.94

# Defaults of `compare_algorithms`; `options` overrides any of them, per algorithm under
# the algorithm's name. Collapsed Gibbs costs one Python-level step per point and sweep,
# so it runs on a random subsample of the training patches. scikit-learn's batch updates
# touch every point in every iteration, so it gets a (larger) subsample too.
DEFAULT_OPTIONS: dict[str, Any] = {
    "truncation": 50,
    "covariance": "diag",
    "seed": 0,
    "num_samples": 1000,
    "svi": {},
    "gibbs": {"num_chains": 2, "num_sweeps": 100, "burn_in": 30, "subsample": 2000},
    "online-em": {"batch_size": 4096, "num_epochs": 20},
    "sklearn": {"max_iter": 500, "subsample": 100_000},
}

ROW_KEYS = (
    "algorithm",
    "heldout_log_likelihood",
    "num_components_mean",
    "num_components_low",
    "num_components_high",
    "effective_components",
    "wall_time_s",
)


# -- scikit-learn as a Posterior ----------------------------------------------------------------


def fit_sklearn(
    data: torch.Tensor | np.ndarray,
    truncation: int = 50,
    covariance: str = "diag",
    alpha: float | None = None,
    seed: int = 0,
    *,
    max_iter: int = 500,
    subsample: int | None = None,
    provenance: dict[str, Any] | None = None,
    **options,
) -> Posterior:
    """Fit scikit-learn's DP ``BayesianGaussianMixture`` and return it as a :class:`Posterior`.

    Parameters
    ----------
    data : torch.Tensor or np.ndarray of shape (num_points, dim)
    truncation : int
        ``n_components`` of the truncated stick-breaking mixture.
    covariance : {"diag", "full"}
        ``covariance_type``.
    alpha : float or None
        ``weight_concentration_prior``; None uses scikit-learn's default ``1 / truncation``.
    seed : int
        ``random_state``.
    max_iter : int
        Iterations of batch variational inference.
    subsample : int or None
        Fit on this many rows drawn at random without replacement (seeded by ``seed``);
        None uses all rows. Each iteration costs a pass over the data, so fits on
        millions of patches need a subsample.
    provenance : dict or None
        Stored in the posterior, for example ``{"backbone": "dinov2_vits14"}``.
    **options
        Further ``BayesianGaussianMixture`` arguments, for example ``reg_covar``.

    Returns
    -------
    Posterior
        ``algorithm="sklearn"``: ``loc`` from ``means_``, ``precision`` (diag) or
        ``precision_tril`` (full, the lower Cholesky factor of ``precisions_``), so the
        component precisions are the expectations ``E[Lambda_k]`` under ``q``;
        ``log_weights`` from ``weights_`` and ``sticks`` from ``weight_concentration_``.
        ``log_density`` is the plug-in mixture density, while scikit-learn's
        ``score_samples`` uses ``E[log pi_k]`` and ``E[log N(x | mu_k, Lambda_k)]``; the
        two differ by at most a per-component constant that vanishes as the counts grow.
        ``trace["lower_bound"]`` has the final lower bound (scikit-learn keeps no history).
    """
    from sklearn.mixture import BayesianGaussianMixture

    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance must be 'diag' or 'full' for fit_sklearn, got {covariance!r}.")
    total_points = len(data)
    if subsample is not None and not (isinstance(subsample, (int, np.integer)) and subsample >= 2):
        raise ValueError(f"subsample must be None or an integer of at least 2, got {subsample!r}.")
    num_points = total_points if subsample is None else min(int(subsample), total_points)
    if num_points < truncation:
        raise ValueError(
            f"fit_sklearn needs at least truncation = {truncation} points, got {num_points} "
            f"(subsample={subsample!r}, {total_points} rows); raise subsample or lower truncation."
        )
    if subsample is not None and subsample < total_points:
        rows = np.sort(np.random.default_rng(seed).choice(total_points, size=int(subsample), replace=False))
        data = data[torch.as_tensor(rows)] if isinstance(data, torch.Tensor) else np.asarray(data)[rows]
    points = data.detach().cpu().double().numpy() if isinstance(data, torch.Tensor) else np.asarray(data, np.float64)
    model = BayesianGaussianMixture(
        n_components=truncation,
        covariance_type=covariance,
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=alpha,
        max_iter=max_iter,
        random_state=seed,
        **options,
    )
    started = time.perf_counter()
    model.fit(points)
    wall_time = time.perf_counter() - started
    settings = {
        "truncation": truncation, "covariance": covariance, "seed": seed, "max_iter": max_iter,
        "subsample": None if subsample is None else int(subsample), "num_points": len(points),
        "total_points": total_points, "converged": bool(model.converged_), "n_iter": int(model.n_iter_),
        "wall_time_s": wall_time, **options,
    }
    return posterior_from_sklearn(model, settings=settings, provenance=provenance)


def posterior_from_sklearn(model, *, settings=None, provenance=None) -> Posterior:
    """Convert a fitted DP ``BayesianGaussianMixture`` (diag or full) to a :class:`Posterior`."""
    if model.weight_concentration_prior_type != "dirichlet_process":
        raise ValueError(
            "model must use weight_concentration_prior_type='dirichlet_process', got "
            f"{model.weight_concentration_prior_type!r}."
        )
    dtype = torch.float64
    params = {"loc": torch.as_tensor(model.means_, dtype=dtype)}
    if model.covariance_type == "diag":
        params["precision"] = torch.as_tensor(model.precisions_, dtype=dtype)
    elif model.covariance_type == "full":
        params["precision_tril"] = torch.as_tensor(np.linalg.cholesky(model.precisions_), dtype=dtype)
    else:
        raise ValueError(f"model.covariance_type must be 'diag' or 'full', got {model.covariance_type!r}.")
    concentration1, concentration0 = (torch.as_tensor(c[:-1], dtype=dtype) for c in model.weight_concentration_)
    return Posterior(
        family=model.covariance_type,
        params=params,
        log_weights=torch.as_tensor(np.log(model.weights_), dtype=dtype),
        sticks=(concentration1, concentration0),
        alpha={"value": float(model.weight_concentration_prior_)},
        algorithm="sklearn",
        settings=dict(settings or {}),
        trace={"lower_bound": [float(model.lower_bound_)]},
        provenance=dict(provenance or {}),
    )


# -- comparison core ------------------------------------------------------------------------


def compare_algorithms(
    train_patches: torch.Tensor | np.ndarray,
    heldout_patches: torch.Tensor | np.ndarray,
    algorithms: Sequence[str],
    options: dict[str, Any] | None = None,
    *,
    evaluate: Callable[[Posterior], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Fit each algorithm on ``train_patches`` and summarise it on ``heldout_patches``.

    Parameters
    ----------
    train_patches : torch.Tensor or np.ndarray of shape (num_points, dim)
        Training patch embeddings, the same for every algorithm.
    heldout_patches : torch.Tensor or np.ndarray of shape (num_heldout, dim)
        Held-out normal patches for the log-likelihood.
    algorithms : sequence of str
        Names from :data:`ALGORITHMS`.
    options : dict or None
        Overrides of :data:`DEFAULT_OPTIONS`: ``truncation``, ``covariance``, ``seed``,
        ``num_samples`` (draws for the component-count posterior), ``provenance``, and a
        dict of keyword arguments of the ``fit_*`` function under each algorithm's name.
    evaluate : callable or None
        ``evaluate(posterior) -> dict`` of further columns, for example image and pixel
        AUROC; called once per algorithm after fitting.

    Returns
    -------
    list of dict
        One row per algorithm, in the given order, with the keys of :data:`ROW_KEYS`:
        ``heldout_log_likelihood`` is the mean log-density per held-out patch in nats,
        ``num_components_*`` the posterior mean and 94% equal-tailed interval of the
        number of occupied components among the training patches (among the subsample
        for Gibbs), ``effective_components`` the components holding 99% of the expected
        weight, ``wall_time_s`` the fit time; plus the ``evaluate`` columns and
        ``posterior`` (the fitted :class:`Posterior`).
    """
    unknown = [name for name in algorithms if name not in ALGORITHMS]
    if unknown or not algorithms:
        raise ValueError(f"algorithms must be a non-empty list drawn from {ALGORITHMS}, got {list(algorithms)!r}.")
    settings = merged_options(options)
    rows = []
    for name in algorithms:
        logger.info("fitting %s on %d patches", name, len(train_patches))
        started = time.perf_counter()
        posterior = _fit(name, train_patches, settings)
        wall_time = time.perf_counter() - started
        row = _summary_row(name, posterior, heldout_patches, len(train_patches), settings, wall_time)
        if evaluate is not None:
            row.update(evaluate(posterior))
        row["posterior"] = posterior
        rows.append(row)
    return rows


def merged_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Return :data:`DEFAULT_OPTIONS` updated by ``options`` (per-algorithm dicts merged key by key)."""
    merged = copy.deepcopy(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key in ALGORITHMS:
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _fit(name: str, data, settings: dict[str, Any]) -> Posterior:
    from ..inference import fit_gibbs, fit_online_em, fit_svi

    common = {"covariance": settings["covariance"], "seed": settings["seed"]}
    extra = dict(settings[name])
    provenance = settings.get("provenance")
    if name == "svi":
        return fit_svi(data, truncation=settings["truncation"], progress=False, provenance=provenance, **common, **extra)
    if name == "sklearn":
        return fit_sklearn(data, truncation=settings["truncation"], provenance=provenance, **common, **extra)
    if name == "online-em":
        posterior = fit_online_em(data, truncation=settings["truncation"], progress=False, **common, **extra)
    else:
        posterior = fit_gibbs(data, progress=False, **common, **extra)
    # Gibbs and online EM take no provenance argument.
    posterior.provenance.update(provenance or {})
    return posterior


def _summary_row(name, posterior, heldout, num_train, settings, wall_time) -> dict[str, Any]:
    num_points = None if name == "gibbs" else num_train
    count = component_count_posterior(posterior, num_points, settings["num_samples"], settings["seed"])
    low, high = count.interval(INTERVAL_PROBABILITY)
    return {
        "algorithm": name,
        "heldout_log_likelihood": float(posterior.log_density(heldout).double().mean()),
        "num_components_mean": count.mean,
        "num_components_low": low,
        "num_components_high": high,
        "effective_components": posterior.effective_components(0.99),
        "wall_time_s": wall_time,
    }


# -- tables ---------------------------------------------------------------------------------


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Return the scalar columns of ``rows``: :data:`ROW_KEYS` first, then the others in order."""
    columns = list(ROW_KEYS)
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, Posterior)]
    return columns


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Format ``rows`` as a markdown table (4 significant digits)."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the scalar columns of ``rows`` as CSV."""
    path = Path(path)
    columns = table_columns(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path, *, backbone: str | None = None) -> Path:
    """Plot held-out log-likelihood, number of components (with interval), wall time and AUROC per algorithm.

    ``backbone`` is the footer line that names the backbone, for example from
    :func:`dinodpmm.experiments.plots.backbone_label`.
    """
    from matplotlib.figure import Figure

    names = [row["algorithm"] for row in rows]
    panels = [("heldout_log_likelihood", "held-out log-likelihood per patch"), ("num_components_mean", "components"),
              ("wall_time_s", "wall time (s)")]
    panels += [(key, label) for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))
               if key in rows[0]]
    figure = Figure(figsize=(3.2 * len(panels), 3.5))
    for axes, (key, label) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        values = np.array([row[key] for row in rows], dtype=np.float64)
        error = None
        if key == "num_components_mean":
            error = np.array([[v - r["num_components_low"], r["num_components_high"] - v] for v, r in zip(values, rows)]).T
            # The interval's ends are integer quantiles, so one can lie past the mean by a fraction.
            error = np.clip(error, 0.0, None)
        axes.bar(names, values, yerr=error, capsize=4)
        axes.set_title(label)
        axes.tick_params(axis="x", labelrotation=30)
    figure.suptitle("algorithm comparison")
    if backbone is not None:
        figure.supxlabel(backbone, fontsize=8, color="0.3")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
