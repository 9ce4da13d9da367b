"""Minibatch online variational EM for a truncated stick-breaking DP mixture of Gaussians.

This is the fitting procedure that Schulthess and Konukoglu (MICCAI 2025) describe for
their anomaly detector, re-implemented from that description:

- the mixture has ``truncation`` Gaussian components with stick-breaking weights, and the
  sticks have a Beta variational posterior ``q(v_k) = Beta(gamma1_k, gamma2_k)``;
- each step draws ``images_per_step`` images (all their patch embeddings), computes
  responsibilities (E-step), rescales the minibatch sufficient statistics to the size of
  the whole data set, and blends them into running statistics with an exponential
  moving average of rate ``rate``;
- the M-step sets the sticks to ``gamma1 = 1 + N_k`` and ``gamma2 = alpha + sum_{j>k} N_j``,
  the component parameters from the running statistics, and re-estimates ``alpha`` by
  the fixed-point update for a ``Beta(1, alpha)`` stick prior;
- components start at a k-means++ seeding of a random subsample.

By default the component means and precisions also have variational posteriors, under
the conjugate data-scaled priors of :mod:`dinodpmm.inference.conjugate` (Normal-Gamma for
``"diag"``, Normal-Wishart for ``"full"``), as in Blei and Jordan (2006). Their expected
log-likelihood penalises components with little data, which is what empties surplus
components: with maximum-likelihood point estimates (``point_estimates=True``), surplus
components instead split true clusters into pieces that EM separates only very slowly.

Components are reordered by decreasing expected count at every M-step, a common
heuristic for truncated stick-breaking fits, so that the prior's preference for early
sticks matches the data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus
from torch.distributions import Beta
from tqdm.auto import tqdm

from ..models.components import get_family
from ..models.stick_breaking import expected_log_sticks, expected_log_weights, log_mean_weights
from .conjugate import ConjugatePrior, NormalGamma, NormalInverseWishart
from .posterior import Posterior

logger = logging.getLogger(__name__)

_PRIORS = {"diag": NormalGamma, "full": NormalInverseWishart}

# Jitter added to the per-point variance of every component (diag) or to the diagonal of
# its per-point covariance (full), in squared embedding units, like scikit-learn's
# `reg_covar`. It keeps a component that owns nearly identical points from collapsing to
# a singular covariance. The full family needs more, because one nearly degenerate
# direction already makes the whole matrix ill-conditioned.
JITTER = {"diag": 1e-6, "full": 1e-3}

# Expected count below which a component's moments are rounding noise. With point
# estimates such a component keeps its previous mean and covariance, and with
# variational posteriors it falls back to the prior. Its weight still follows the count,
# so it fades out.
_MIN_COUNT = 1e-6

# Size of the random subsample for the k-means++ seeding: this many points per component,
# and at least `_MIN_INIT_POINTS`.
_INIT_POINTS_PER_COMPONENT = 10
_MIN_INIT_POINTS = 2000

# Elements of the (num_points, chunk, dim) intermediate of the full-covariance
# second-moment statistics, kept below about 2**26.
_FULL_CHUNK_ELEMENTS = 2**26

# Iterations of the joint fixed point of alpha and the sticks within one M-step, and the
# relative change of alpha at which it stops early.
_ALPHA_ITERATIONS = 20
_ALPHA_TOLERANCE = 1e-8


# -- data access ---------------------------------------------------------------------------


class _MinibatchSource:
    """Uniform access to the accepted data layouts as units (images or rows) of patches.

    Parameters
    ----------
    data : sequence of arrays, 3-D array or 2-D array
        See :func:`fit_online_em`.
    image_offsets : array of shape (num_images + 1,) or None
    batch_size : int or None
    images_per_step : int
    """

    def __init__(self, data, image_offsets, batch_size, images_per_step):
        self.images: list | None = None
        self.matrix = None
        self.offsets: np.ndarray | None = None
        if isinstance(data, (list, tuple)):
            data = _split_list(data, "data")
        if isinstance(data, list):
            self._from_images(data)
            self.units_per_step = images_per_step
        else:
            self._from_array(_as_array(data, "data"), image_offsets, batch_size)
            self.units_per_step = images_per_step if self.offsets is not None else batch_size

    def _from_images(self, images):
        if not images:
            raise ValueError("data is an empty list; pass at least one image's patch embeddings.")
        dims = {tuple(image.shape[1:]) for image in images}
        if any(len(image.shape) != 2 for image in images) or len(dims) != 1:
            raise ValueError(
                "data as a list must contain 2-D arrays of shape (num_patches, dim) with one common "
                f"dim, got shapes {sorted({tuple(image.shape) for image in images})[:5]}."
            )
        self.images = images
        self.dim = int(images[0].shape[1])
        sizes = np.array([image.shape[0] for image in images])
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.num_units = len(images)

    def _from_array(self, data, image_offsets, batch_size):
        if len(data.shape) == 3:
            num_images, num_patches, dim = data.shape
            data = data.reshape(num_images * num_patches, dim)
            image_offsets = np.arange(num_images + 1) * num_patches
        if len(data.shape) != 2:
            raise ValueError(f"data must have 2 or 3 dimensions, got shape {tuple(data.shape)}.")
        self.matrix = data
        self.dim = int(data.shape[1])
        if image_offsets is not None:
            self.offsets = _check_offsets(image_offsets, data.shape[0])
            self.num_units = len(self.offsets) - 1
        elif batch_size is not None:
            if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
            self.num_units = int(data.shape[0])
        else:
            raise ValueError(
                "data is a patch matrix of shape (num_points, dim), so pass image_offsets (row "
                "offsets of the images, num_images + 1 of them) to step over images, or batch_size "
                "to step over random rows."
            )

    @property
    def num_points(self) -> int:
        return int(self.offsets[-1]) if self.offsets is not None else self.num_units

    def gather(self, units: np.ndarray) -> torch.Tensor:
        """Return the patches of the given units as a float64 tensor of shape (num_points, dim)."""
        if self.images is not None:
            parts = [_as_tensor(self.images[unit]) for unit in units]
            return torch.cat(parts) if parts else torch.zeros(0, self.dim, dtype=torch.float64)
        if self.offsets is None:
            rows = np.sort(units)
        else:
            rows = np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in units])
            rows = np.sort(rows)  # file order for memory-mapped arrays; the statistics are sums
        return _as_tensor(self.matrix[torch.as_tensor(rows)] if isinstance(self.matrix, torch.Tensor) else self.matrix[rows])

    def random_rows(self, count: int, rng: np.random.Generator) -> torch.Tensor:
        """Return ``count`` rows drawn without replacement from all patches, shape (count, dim)."""
        rows = np.sort(rng.choice(self.num_points, size=min(count, self.num_points), replace=False))
        if self.images is None:
            return _as_tensor(self.matrix[torch.as_tensor(rows)] if isinstance(self.matrix, torch.Tensor) else self.matrix[rows])
        image_of_row = np.searchsorted(self.offsets, rows, side="right") - 1
        return torch.stack(
            [_as_tensor(self.images[i][r - self.offsets[i]]) for i, r in zip(image_of_row, rows)]
        )


_ACCEPTED_TYPES = "a list of per-image arrays, or a numpy array, memory-mapped array or torch.Tensor"
_ACCEPTED_ITEMS = "an array of shape (num_patches, dim) or a row of length dim"


def _as_array(value, name: str, accepted: str = _ACCEPTED_TYPES):
    """Return tensors and objects with a ``shape`` unchanged and anything else as a numeric numpy array.

    ``accepted`` describes the accepted types in the TypeError raised for non-numeric values.
    """
    if isinstance(value, torch.Tensor) or hasattr(value, "shape"):
        return value
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(
            f"{name} is a nested sequence with rows of different lengths; give every patch "
            "the same dim, or pass a list of per-image arrays of shape (num_patches, dim)."
        ) from None
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must be {accepted}, containing numbers; got {type(value).__name__} "
            f"that converts to a numpy array of dtype {array.dtype}."
        )
    return array


def _split_list(data: list | tuple, name: str):
    """Interpret a list (or tuple) as per-image patch arrays or as the rows of a patch matrix.

    Returns
    -------
    list or np.ndarray
        A list of per-image arrays when every item is 2-D, or a numeric array of shape
        (num_points, dim) when every item is a 1-D row of numbers, as ``np.asarray``
        reads a list of lists.
    """
    items = [_as_array(item, f"{name}[{index}]", _ACCEPTED_ITEMS) for index, item in enumerate(data)]
    if items and all(len(item.shape) == 1 for item in items):
        return _as_array(items, name)
    return items


def _check_offsets(image_offsets, num_rows) -> np.ndarray:
    offsets = np.asarray(image_offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_rows or np.any(np.diff(offsets) < 0):
        raise ValueError(
            "image_offsets must be a non-decreasing 1-D array that starts at 0 and ends at the "
            f"number of rows ({num_rows}), with image i in rows offsets[i]:offsets[i + 1]; got "
            f"{offsets[:5]}... of length {offsets.size}."
        )
    return offsets


def _as_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.detach().to(device="cpu", dtype=torch.float64)
    return torch.from_numpy(np.asarray(rows, dtype=np.float64))


# -- model state ---------------------------------------------------------------------------


class _MixtureState:
    """Running sufficient statistics, the sticks and the component parameters of the mixture.

    All tensors are float64 on ``device`` and in coordinates centred at ``center``.

    Parameters
    ----------
    family : {"diag", "full"}
    center : torch.Tensor of shape (dim,)
    alpha : float
        Initial concentration.
    prior : ConjugatePrior or None
        Conjugate prior of the component parameters, in centred coordinates, for
        variational component posteriors; None for maximum-likelihood point estimates.

    Attributes
    ----------
    count : torch.Tensor of shape (truncation,)
        Running expected number of points per component, scaled to the whole data set.
    first_moment : torch.Tensor of shape (truncation, dim)
        Running ``sum_n r_nk x_n``.
    second_moment : torch.Tensor of shape (truncation, dim) or (truncation, dim, dim)
        Running ``sum_n r_nk x_n^2`` (diag) or ``sum_n r_nk x_n x_n^T`` (full).
    params : dict of str to torch.Tensor
        Point parameters under the family's keys: the ML estimates, or the posterior
        means ``E[mu]`` and ``E[precision]`` of the variational posteriors.
    correction : torch.Tensor of shape (truncation,)
        ``E_q[log N(x | mu, precision)] - log N(x | params)``, which does not depend on
        ``x`` for these conjugate posteriors; zero for point estimates.
    """

    def __init__(self, family: str, center: torch.Tensor, alpha: float, prior: ConjugatePrior | None):
        self.family = family
        self.center = center
        self.alpha = float(alpha)
        self.jitter = JITTER[family]
        self.prior = prior
        self.count = self.first_moment = self.second_moment = None
        self.params: dict[str, torch.Tensor] = {}
        self.correction: torch.Tensor | None = None
        self.sticks: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- E-step ---------------------------------------------------------------------------

    def statistics(self, x: torch.Tensor, scale: float):
        """Return the E-step statistics of centred points ``x`` (num_points, dim), times ``scale``.

        Returns
        -------
        tuple
            count (truncation,), first moment (truncation, dim), second moment, and the
            per-point mixture log-density under ``log E[pi]`` and ``params``, shape (num_points,).
        """
        log_density = get_family(self.family).log_density(x, self.params)  # N K
        log_joint = expected_log_weights(Beta(*self.sticks)) + log_density + self.correction  # N K
        responsibility = torch.softmax(log_joint, dim=-1)  # N K
        count = responsibility.sum(0) * scale  # K
        first = responsibility.T @ x * scale  # K D
        if self.family == "diag":
            second = responsibility.T @ (x * x) * scale  # K D
        else:
            second = _weighted_outer_products(responsibility, x) * scale  # K D D
        log_likelihood = torch.logsumexp(log_mean_weights(Beta(*self.sticks)) + log_density, dim=-1)  # N
        return count, first, second, log_likelihood

    # -- M-step ---------------------------------------------------------------------------

    def blend(self, count, first, second, rate: float) -> None:
        """Move the running statistics towards the minibatch statistics by ``rate``."""
        self.count = (1 - rate) * self.count + rate * count
        self.first_moment = (1 - rate) * self.first_moment + rate * first
        self.second_moment = (1 - rate) * self.second_moment + rate * second

    def maximise(self) -> None:
        """Set sticks, alpha and component parameters from the running statistics."""
        self._sort_components()
        self._update_sticks_and_alpha()
        safe_count = self.count.clamp_min(_MIN_COUNT)  # K
        mean = self.first_moment / safe_count[:, None]  # K D
        if self.family == "diag":
            # Per-dimension scatter sum_n r_nk (x_n - mean_k)^2 plus the jitter per point.
            scatter = (self.second_moment - self.first_moment * mean).clamp_min(0.0) + self.jitter * self.count[:, None]
        else:
            scatter = self.second_moment - self.first_moment[:, :, None] * mean[:, None, :]  # K D D
            scatter = 0.5 * (scatter + scatter.transpose(-1, -2))
            scatter = scatter + self.jitter * self.count[:, None, None] * torch.eye(mean.shape[1]).to(mean)
        if self.prior is None:
            self._point_estimates(mean, scatter, safe_count)
        else:
            self._variational_posteriors(mean, scatter)

    def _point_estimates(self, mean, scatter, safe_count) -> None:
        enough = self.count > _MIN_COUNT  # K
        if self.family == "diag":
            precision = safe_count[:, None] / scatter.clamp_min(self.jitter * _MIN_COUNT)  # K D
            params = {"loc": mean, "precision": precision}
        else:
            covariance = scatter / safe_count[:, None, None]  # K D D
            params = {"loc": mean, "precision_tril": _precision_cholesky(covariance)}
        for key, value in params.items():
            if key in self.params:
                mask = enough.reshape(-1, *[1] * (value.ndim - 1))
                value = torch.where(mask, value, self.params[key])
            self.params[key] = value
        self.correction = torch.zeros_like(self.count)

    def _variational_posteriors(self, mean, scatter) -> None:
        # NOTE: the full family empties surplus components more slowly than the diagonal
        # one. On 3 separated 5-dimensional clusters, truncation 6 still split one
        # cluster after 40 epochs, while truncation 20 did not.
        # Conjugate updates: kappa = kappa0 + N,
        # m = (kappa0 m0 + N mean) / kappa, and the scale gains the scatter plus the
        # shrinkage term kappa0 N / kappa (mean - m0)(mean - m0)^T.
        prior, count = self.prior, self.count
        prior_mean = torch.as_tensor(prior.mean).to(mean)
        kappa = prior.kappa0 + count  # K
        loc = (prior.kappa0 * prior_mean + count[:, None] * mean) / kappa[:, None]  # K D
        offset = mean - prior_mean  # K D
        shrinkage = prior.kappa0 * count / kappa  # K
        dim = mean.shape[1]
        if self.family == "diag":
            shape = prior.shape + 0.5 * count  # K
            rate = torch.as_tensor(prior.rate).to(mean) + 0.5 * scatter + 0.5 * shrinkage[:, None] * offset**2  # K D
            self.params = {"loc": loc, "precision": shape[:, None] / rate}
            # E[log tau] - log E[tau] = digamma(a) - log(a) per dimension, and
            # E[(x - mu)^2 tau] exceeds the plug-in value by 1 / kappa per dimension.
            self.correction = 0.5 * dim * (torch.digamma(shape) - torch.log(shape) - 1.0 / kappa)
        else:
            nu = prior.nu0 + count  # K
            scale = torch.as_tensor(prior.scale).to(mean) + scatter + shrinkage[:, None, None] * offset[:, :, None] * offset[:, None, :]
            precision_mean = nu[:, None, None] * torch.cholesky_inverse(torch.linalg.cholesky(scale))  # E[Lambda] = nu Psi^-1
            self.params = {"loc": loc, "precision_tril": torch.linalg.cholesky(precision_mean)}
            # E[log|Lambda|] - log|E[Lambda]| = sum_i digamma((nu + 1 - i) / 2) + D log 2 - D log nu.
            index = torch.arange(1, dim + 1).to(mean)
            log_det_gap = torch.digamma(0.5 * (nu[:, None] + 1 - index)).sum(-1) + dim * math.log(2.0) - dim * torch.log(nu)
            self.correction = 0.5 * log_det_gap - 0.5 * dim / kappa

    def _sort_components(self) -> None:
        order = torch.argsort(self.count, descending=True)
        self.count, self.first_moment, self.second_moment = (
            self.count[order], self.first_moment[order], self.second_moment[order]
        )
        self.params = {key: value[order] for key, value in self.params.items()}

    def _set_sticks(self) -> None:
        # gamma1_k = 1 + N_k and gamma2_k = alpha + sum_{j>k} N_j for the free sticks.
        tail = torch.flip(torch.cumsum(torch.flip(self.count, [0]), 0), [0])[1:]  # sum_{j>k} N_j, K-1
        self.sticks = (1.0 + self.count[:-1], self.alpha + tail)

    def _update_sticks_and_alpha(self) -> None:
        # For fixed sticks, the alpha maximising sum_k E[log Beta(v_k; 1, alpha)] is
        # (K - 1) / -sum_k E[log(1 - v_k)]; the sticks depend on alpha, so iterate.
        for _ in range(_ALPHA_ITERATIONS):
            self._set_sticks()
            expected_log1m = expected_log_sticks(Beta(*self.sticks))[1]
            new_alpha = float((len(self.count) - 1) / -expected_log1m.sum())
            converged = abs(new_alpha - self.alpha) <= _ALPHA_TOLERANCE * self.alpha
            self.alpha = new_alpha
            if converged:
                break
        self._set_sticks()

    # -- checkpoints ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"params": {k: v.clone() for k, v in self.params.items()}, "correction": self.correction.clone(),
                "sticks": tuple(s.clone() for s in self.sticks), "alpha": self.alpha}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.params, self.correction = snapshot["params"], snapshot["correction"]
        self.sticks, self.alpha = snapshot["sticks"], snapshot["alpha"]

    def to_posterior(self, **fields) -> Posterior:
        """Return the current state as a :class:`Posterior` in the original coordinates."""
        dtype = torch.get_default_dtype()
        params = {k: v.to(device="cpu", dtype=dtype) for k, v in self.params.items()}
        params["loc"] = (self.params["loc"] + self.center).to(device="cpu", dtype=dtype)
        sticks = tuple(s.to(device="cpu", dtype=dtype) for s in self.sticks)
        log_weights = log_mean_weights(Beta(*self.sticks)).to(device="cpu", dtype=dtype)
        return Posterior(
            family=self.family, params=params, log_weights=log_weights, sticks=sticks,
            alpha={"value": self.alpha}, algorithm="online-em", **fields,
        )


def _precision_cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """Return the lower Cholesky factor of the inverse of each covariance (..., dim, dim)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(covariance)))


def _weighted_outer_products(responsibility: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``sum_n r_nk x_n x_n^T`` of shape (num_components, dim, dim), chunked over components."""
    num_points, dim = x.shape
    num_components = responsibility.shape[1]
    chunk = max(1, _FULL_CHUNK_ELEMENTS // max(1, num_points * dim))
    pieces = []
    for start in range(0, num_components, chunk):
        weights = responsibility[:, start : start + chunk].T  # C N
        weighted = weights[:, :, None] * x[None]  # C N D
        pieces.append(weighted.transpose(1, 2) @ x)  # C D D
    return torch.cat(pieces)


# -- public entry point ----------------------------------------------------------------------


def fit_online_em(
    data,
    truncation: int = 500,
    covariance: str = "diag",
    alpha: float = 2.0,
    images_per_step: int = 12,
    num_epochs: int = 40,
    rate: float = 0.2,
    validation=None,
    seed: int = 0,
    progress: bool = True,
    *,
    image_offsets: Sequence[int] | np.ndarray | None = None,
    batch_size: int | None = None,
    point_estimates: bool = False,
    device: str | torch.device = "cpu",
) -> Posterior:
    """Fit a truncated DP mixture of Gaussians by minibatch online variational EM.

    Parameters
    ----------
    data : list of arrays, array or tensor
        Patch embeddings in one of these layouts:

        - a list of per-image arrays, each of shape (num_patches_i, dim), or nested
          lists of numbers in that layout;
        - an array of shape (num_images, num_patches, dim);
        - a patch matrix of shape (num_points, dim) with ``image_offsets``;
        - a patch matrix of shape (num_points, dim) with ``batch_size``, which steps over
          random rows instead of images.

        A list whose items are all 1-D rows of numbers is a patch matrix, as
        ``np.asarray`` reads it.

        Arrays may be (float16) ``np.memmap``; only the minibatches are read.
    truncation : int
        Number of mixture components, at least 2 and at most the number of patches.
    covariance : {"diag", "full"}
        Component family.
    alpha : float
        Initial concentration; it is re-estimated at every M-step.
    images_per_step : int
        Images per minibatch (ignored with ``batch_size``).
    num_epochs : int
        Passes over the data.
    rate : float
        Weight of each minibatch in the moving average of the statistics, in (0, 1].
    validation : array, tensor, list of arrays or None
        Validation patches, shape (num_points, dim) or a list of per-image arrays. When
        given, the returned posterior is the end-of-epoch state with the lowest mean
        validation negative log-likelihood; otherwise the last one.
    seed : int
        Seeds the initialisation and the minibatch order.
    progress : bool
        Show a progress bar over the steps.
    image_offsets : array of shape (num_images + 1,) or None
        Row offsets of the images in a patch matrix: image i is rows
        ``image_offsets[i]:image_offsets[i + 1]``.
    batch_size : int or None
        Rows per minibatch for a patch matrix without image structure.
    point_estimates : bool
        Use maximum-likelihood means and covariances (plus the jitter) instead of their
        variational posteriors; surplus components then keep their weight.
    device : str or torch.device
        Device for the E- and M-steps; statistics are float64.

    Returns
    -------
    Posterior
        ``algorithm="online-em"``, ``sticks`` the Beta posterior of the sticks and
        ``alpha={"value": alpha}``. ``trace["nll"]`` is the mean training negative
        log-likelihood per patch of each epoch, in nats, averaged over its minibatches.
        ``trace["alpha"]`` is alpha at the end of each epoch, and
        ``trace["validation_nll"]`` the validation value per epoch when given.
    """
    settings = _check_settings(truncation, covariance, alpha, images_per_step, num_epochs, rate)
    source = _MinibatchSource(data, image_offsets, batch_size, images_per_step)
    if truncation > source.num_points:
        raise ValueError(
            f"truncation={truncation} exceeds the {source.num_points} patches in data; "
            "use a truncation below the number of patches."
        )
    validation_points = None if validation is None else _validation_tensor(validation, source.dim)
    rng = np.random.default_rng(seed)
    state = _initialise(source, covariance, truncation, alpha, point_estimates, rng, torch.device(device))
    settings.update(
        seed=seed, batch_size=batch_size, point_estimates=bool(point_estimates),
        num_units=source.num_units, num_points=source.num_points,
        units_per_step=source.units_per_step, jitter=JITTER[covariance], device=str(device),
    )

    trace: dict[str, list[float]] = {"nll": [], "alpha": []}
    if validation_points is not None:
        trace["validation_nll"] = []
    best = None
    steps_per_epoch = math.ceil(source.num_units / source.units_per_step)
    start = time.perf_counter()
    with tqdm(total=num_epochs * steps_per_epoch, disable=not progress, desc="online EM", unit="step") as bar:
        for epoch in range(num_epochs):
            trace["nll"].append(_run_epoch(state, source, rate, rng, bar))
            trace["alpha"].append(state.alpha)
            message = f"epoch {epoch + 1}/{num_epochs}: training NLL {trace['nll'][-1]:.4f}, alpha {state.alpha:.3g}"
            if validation_points is not None:
                nll = _mean_nll(state.to_posterior(), validation_points)
                trace["validation_nll"].append(nll)
                message += f", validation NLL {nll:.4f}"
                if best is None or nll < best[0]:
                    best = (nll, epoch, state.snapshot())
            logger.info(message)
    settings["seconds"] = time.perf_counter() - start
    if best is not None:
        settings["selected_epoch"] = best[1]
        logger.info("keeping epoch %d with the lowest validation NLL %.4f", best[1] + 1, best[0])
    if best is not None:
        state.restore(best[2])
    return state.to_posterior(settings=settings, trace=trace)


def _check_settings(truncation, covariance, alpha, images_per_step, num_epochs, rate) -> dict[str, Any]:
    if covariance not in JITTER:
        raise ValueError(f"covariance must be one of {sorted(JITTER)}, got {covariance!r}.")
    if not (isinstance(truncation, (int, np.integer)) and truncation >= 2):
        raise ValueError(f"truncation must be an integer of at least 2, got {truncation!r}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}.")
    for name, value in (("images_per_step", images_per_step), ("num_epochs", num_epochs)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not 0 < rate <= 1:
        raise ValueError(f"rate must lie in (0, 1], got {rate!r}; 0.2 is the default.")
    return {
        "truncation": int(truncation), "covariance": covariance, "alpha": float(alpha),
        "images_per_step": int(images_per_step), "num_epochs": int(num_epochs), "rate": float(rate),
    }


def _validation_tensor(validation, dim) -> torch.Tensor:
    if isinstance(validation, (list, tuple)):
        validation = _split_list(validation, "validation")
    if isinstance(validation, list):
        shapes = sorted({tuple(item.shape) for item in validation})
        if not validation or any(len(shape) != 2 or shape[1] != dim for shape in shapes):
            raise ValueError(
                f"validation as a list must contain arrays of shape (num_patches, {dim}) like the "
                f"training patches, got shapes {shapes[:5]}; embed the validation images with the same backbone."
            )
        return torch.cat([_as_tensor(item) for item in validation])
    validation = _as_array(validation, "validation")
    if len(validation.shape) != 2 or validation.shape[1] != dim:
        raise ValueError(
            f"validation must have shape (num_points, {dim}) like the training patches, got "
            f"{tuple(validation.shape)}; embed the validation images with the same backbone."
        )
    return _as_tensor(validation[:])


def _initialise(source, family, truncation, alpha, point_estimates, rng, device) -> _MixtureState:
    """Seed the means by k-means++ on a subsample and set the statistics from one E-step on it."""
    size = max(_INIT_POINTS_PER_COMPONENT * truncation, _MIN_INIT_POINTS)
    sample = source.random_rows(size, rng)  # S D
    center = sample.mean(0)
    sample = sample - center
    prior = None if point_estimates else _PRIORS[family].from_data(sample.numpy())
    state = _MixtureState(family, center.to(device), alpha, prior)
    centers, _ = kmeans_plusplus(sample.numpy(), truncation, random_state=int(rng.integers(2**31)))
    centers = torch.from_numpy(centers)
    residual = sample - centers[torch.cdist(sample, centers).argmin(1)]  # S D
    # Every component starts at a seed with the pooled within-seed covariance.
    if family == "diag":
        precision = 1.0 / (residual.var(0) + JITTER[family])
        state.params = {"loc": centers, "precision": precision.expand(truncation, -1).clone()}
    else:
        pooled = residual.T @ residual / max(len(residual) - 1, 1) + JITTER[family] * torch.eye(source.dim).double()
        state.params = {"loc": centers, "precision_tril": _precision_cholesky(pooled).expand(truncation, -1, -1).clone()}
    state.params = {k: v.to(device) for k, v in state.params.items()}
    state.correction = torch.zeros(truncation, dtype=torch.float64, device=device)
    state.count = torch.full((truncation,), source.num_points / truncation, dtype=torch.float64, device=device)
    state._set_sticks()
    count, first, second, _ = state.statistics(sample.to(device), source.num_points / len(sample))
    state.count, state.first_moment, state.second_moment = count, first, second
    state.maximise()
    return state


def _run_epoch(state: _MixtureState, source: _MinibatchSource, rate, rng, bar) -> float:
    """Run one pass over the data in random minibatches; return the mean training NLL per patch."""
    order = rng.permutation(source.num_units)
    total_nll, total_points = 0.0, 0
    for start in range(0, source.num_units, source.units_per_step):
        x = source.gather(order[start : start + source.units_per_step]).to(state.center.device)
        if len(x) == 0:
            bar.update(1)
            continue
        x = x - state.center
        count, first, second, log_likelihood = state.statistics(x, source.num_points / len(x))
        state.blend(count, first, second, rate)
        state.maximise()
        total_nll -= float(log_likelihood.sum())
        total_points += len(x)
        bar.update(1)
    return total_nll / max(total_points, 1)


def _mean_nll(posterior: Posterior, points: torch.Tensor) -> float:
    return float(-posterior.log_density(points.to(posterior.log_weights.dtype)).double().mean())
