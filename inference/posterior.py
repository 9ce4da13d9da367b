"""The posterior summary that every inference algorithm returns and every scorer reads."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Beta

from ..models.components import get_family
from ..models.stick_breaking import log_weights_from_sticks

FORMAT_VERSION = 1
_METADATA_KEY = "dinodpmm"
# Rows of x per chunk in the (num_points, num_components) kernels.
_ROW_CHUNK = 65536


@dataclasses.dataclass
class ComponentCount:
    """Posterior distribution of the number of occupied components among ``num_points`` draws.

    Attributes
    ----------
    samples : np.ndarray of shape (num_samples,)
        Draws of the number of occupied components, int64.
    num_points : int
        Number of data points the occupancy refers to.
    source : str
        How the draws were made, for example ``"variational"`` or ``"gibbs"``.
    chain : np.ndarray of shape (num_samples,) or None
        Chain index of each draw, for samplers with several chains.
    """

    samples: np.ndarray
    num_points: int
    source: str
    chain: np.ndarray | None = None

    @property
    def mean(self) -> float:
        return float(self.samples.mean())

    def interval(self, probability: float = 0.94) -> tuple[int, int]:
        """Return the equal-tailed credible interval with the given probability."""
        tail = (1.0 - probability) / 2
        low, high = np.quantile(self.samples, [tail, 1.0 - tail])
        return int(low), int(high)

    def pmf(self) -> dict[int, float]:
        """Return the empirical probability of each observed count."""
        values, counts = np.unique(self.samples, return_counts=True)
        return {int(v): float(c) / len(self.samples) for v, c in zip(values, counts)}


@dataclasses.dataclass
class Posterior:
    """Posterior summary of a fitted mixture, the same type for every inference algorithm.

    Attributes
    ----------
    family : str
        Registered component family name (``"diag"``, ``"full"``, ...).
    params : dict of str to torch.Tensor
        Point estimates of the component parameters, each with leading dimension
        ``num_components`` (see :mod:`dinodpmm.models.components` for the keys).
    log_weights : torch.Tensor of shape (num_components,)
        Log of the expected mixture weights.
    sticks : tuple of torch.Tensor or None
        ``(concentration1, concentration0)`` of the Beta posterior of each stick,
        shape (num_components - 1,), when the algorithm has one.
    loc_scale : torch.Tensor of shape (num_components, dim) or None
        Posterior standard deviation of each component mean, when available.
    draws : dict of str to torch.Tensor or None
        Posterior draws from a sampler: ``weights`` (num_samples, num_components) and
        ``loc`` (num_samples, num_components, dim); :meth:`sample` resamples them.
    alpha : dict
        ``{"value": a}`` for a fixed or point-estimated concentration, or
        ``{"shape": a, "rate": b}`` for a Gamma posterior, or ``{"samples": [...]}``.
    algorithm : str
        Name of the inference algorithm.
    settings : dict
        Every setting the algorithm ran with (JSON-serialisable).
    trace : dict of str to list of float
        Objective history, for example ``{"elbo": [...]}``.
    provenance : dict
        Free-form metadata, for example the backbone that produced the embeddings.
    """

    family: str
    params: dict[str, torch.Tensor]
    log_weights: torch.Tensor
    sticks: tuple[torch.Tensor, torch.Tensor] | None = None
    loc_scale: torch.Tensor | None = None
    draws: dict[str, torch.Tensor] | None = None
    alpha: dict[str, Any] = dataclasses.field(default_factory=dict)
    algorithm: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    trace: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- basic properties ----------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor:
        """Expected mixture weights, shape (num_components,)."""
        return self.log_weights.exp()

    @property
    def means(self) -> torch.Tensor:
        """Component means, shape (num_components, dim)."""
        return self.params["loc"]

    @property
    def covariances(self) -> torch.Tensor:
        """Covariances: (num_components, dim) for ``diag``, (num_components, dim, dim) for ``full``."""
        return get_family(self.family).covariance(self.params)

    @property
    def truncation(self) -> int:
        """Number of components represented, including empty ones."""
        return int(self.log_weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.params["loc"].shape[-1])

    # -- densities -------------------------------------------------------------------

    def component_log_density(self, x) -> torch.Tensor:
        """Return ``log p(x_n | theta_k)`` of shape (num_points, num_components) for ``x`` (num_points, dim)."""
        return self._rowwise(x, lambda chunk: get_family(self.family).log_density(chunk, self.params))

    def log_density(self, x) -> torch.Tensor:
        """Return the mixture log-density of shape (num_points,) for ``x`` (num_points, dim)."""
        family = get_family(self.family)
        return self._rowwise(
            x, lambda chunk: torch.logsumexp(self.log_weights + family.log_density(chunk, self.params), -1)
        )

    def assign(self, x) -> torch.Tensor:
        """Return the most probable component of each row of ``x``, shape (num_points,), int64."""
        family = get_family(self.family)
        return self._rowwise(
            x, lambda chunk: torch.argmax(self.log_weights + family.log_density(chunk, self.params), -1)
        )

    def squared_mahalanobis(self, x) -> torch.Tensor:
        """Return squared Mahalanobis distances of shape (num_points, num_components)."""
        return self._rowwise(x, lambda chunk: get_family(self.family).squared_mahalanobis(chunk, self.params))

    def _rowwise(self, x, kernel) -> torch.Tensor:
        x = self._as_points(x)
        with torch.no_grad():
            pieces = [kernel(x[start : start + _ROW_CHUNK]) for start in range(0, x.shape[0], _ROW_CHUNK)]
        return torch.cat(pieces, dim=0) if pieces else kernel(x)

    def _as_points(self, x) -> torch.Tensor:
        loc = self.params["loc"]
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"x must have shape (num_points, {self.dim}) to match this posterior's embedding "
                f"dimension, got {tuple(x.shape)}; embed the images with the backbone the "
                f"posterior was fitted on ({self.provenance.get('backbone', 'unknown backbone')})."
            )
        return x.to(device=loc.device, dtype=loc.dtype)

    # -- posterior over weights, means and the number of components -------------------------

    def sample(self, num_samples: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Draw mixture weights and component means from the posterior.

        Returns
        -------
        dict with ``weights`` of shape (num_samples, num_components) and ``means`` of
        shape (num_samples, num_components, dim).
        """
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if self.draws is not None:
            pick = torch.randint(len(self.draws["weights"]), (num_samples,), generator=generator)
            return {"weights": self.draws["weights"][pick], "means": self.draws["loc"][pick]}
        weights = self._sample_weights(num_samples, generator)
        means = self.means.cpu().expand(num_samples, *self.means.shape)
        if self.loc_scale is not None:
            noise = torch.randn(means.shape, generator=generator, dtype=means.dtype)
            means = means + noise * self.loc_scale.cpu()
        return {"weights": weights, "means": means.to(self.means.device)}

    def _sample_weights(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        if self.sticks is None:
            return self.weights.expand(num_samples, -1).clone()
        a, b = (c.cpu().to(torch.float64) for c in self.sticks)
        # Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b), seeded through `generator`.
        x = torch._standard_gamma(a.expand(num_samples, -1).contiguous(), generator=generator)
        y = torch._standard_gamma(b.expand(num_samples, -1).contiguous(), generator=generator)
        sticks = (x / (x + y)).clamp(torch.finfo(torch.float64).tiny, 1 - torch.finfo(torch.float64).eps)
        return log_weights_from_sticks(sticks).exp().to(self.log_weights)

    def num_components(self, num_points: int, num_samples: int = 1000, *, seed: int = 0) -> ComponentCount:
        """Return the posterior of the number of occupied components among ``num_points`` draws.

        Each posterior draw of the weights is followed by a multinomial draw of
        ``num_points`` assignments. The number of components with at least one point is
        one sample.
        """
        if num_points < 1 or num_samples < 1:
            raise ValueError(
                f"num_points and num_samples must be positive, got {num_points!r} and {num_samples!r}."
            )
        weights = self.sample(num_samples, seed=seed)["weights"].double().cpu().numpy()
        weights = weights / weights.sum(-1, keepdims=True)
        rng = np.random.default_rng(seed)
        occupied = np.array([(rng.multinomial(num_points, w) > 0).sum() for w in weights], dtype=np.int64)
        if self.draws is not None:
            source = "draws"
        elif self.sticks is not None:
            source = "variational"
        else:
            source = "point"
        return ComponentCount(occupied, num_points, source)

    def effective_components(self, mass: float = 0.99) -> int:
        """Return the fewest components whose weights sum to at least ``mass``.

        Without sampler draws the count is taken on the expected weights. With draws
        (Gibbs) it is the median of the per-draw counts, because the expected weights
        pool the final states of all chains. Their clusters duplicate each other, so
        counting them would multiply the count by about the number of chains.
        """
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must lie in (0, 1], got {mass!r}.")
        if self.draws is not None:
            weights = self.draws["weights"].double()
            weights = weights / weights.sum(-1, keepdim=True)
        else:
            weights = self.weights.double()[None]
        cumulative = torch.cumsum(torch.sort(weights, dim=-1, descending=True).values, -1)
        # Tolerance for the rounding of the cumulative sum when mass = 1.
        counts = (cumulative < mass - 1e-12).sum(-1) + 1
        return min(int(counts.median()), self.truncation)

    def inference_data(self, num_points: int | None = None, num_samples: int = 1000, *, seed: int = 0):
        """Return an ``arviz.InferenceData`` of the number of components, alpha and the sorted weights.

        See :func:`dinodpmm.inference.diagnostics.inference_data`.
        """
        from .diagnostics import inference_data

        return inference_data(self, num_points=num_points, num_samples=num_samples, seed=seed)

    def stick_posterior(self) -> Beta | None:
        """Return the Beta posterior of the sticks, or None when the algorithm has none."""
        return None if self.sticks is None else Beta(*self.sticks)

    # -- persistence ---------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the posterior as safetensors with JSON metadata; no pickled objects."""
        from safetensors.torch import save_file

        tensors = {f"params.{k}": v for k, v in self.params.items()}
        tensors["log_weights"] = self.log_weights
        if self.sticks is not None:
            tensors["sticks.concentration1"], tensors["sticks.concentration0"] = self.sticks
        if self.loc_scale is not None:
            tensors["loc_scale"] = self.loc_scale
        for key, value in (self.draws or {}).items():
            tensors[f"draws.{key}"] = value
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {_METADATA_KEY: json.dumps(self._metadata(), default=_json_default)}
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata=metadata)
        # safetensors creates the file readable by its owner only; posteriors are
        # shared results, so they get the usual 0644.
        temporary.chmod(0o644)
        temporary.replace(path)

    def _metadata(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "family": self.family,
            "dim": self.dim,
            "num_components": self.truncation,
            "alpha": self.alpha,
            "algorithm": self.algorithm,
            "settings": self.settings,
            "trace": self.trace,
            "provenance": self.provenance,
        }

    @classmethod
    def load(cls, path: str | Path, *, expected_dim: int | None = None, device: str = "cpu") -> Posterior:
        """Read a posterior written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is truncated or not a posterior file, has another format version,
            or its embedding dimension differs from ``expected_dim``.
        """
        tensors, metadata = _read_posterior_file(Path(path))
        _check_metadata(metadata, path, expected_dim)
        tensors = {k: v.to(device) for k, v in tensors.items()}
        params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
        draws = {k.removeprefix("draws."): v for k, v in tensors.items() if k.startswith("draws.")}
        sticks = None
        if "sticks.concentration1" in tensors:
            sticks = (tensors["sticks.concentration1"], tensors["sticks.concentration0"])
        return cls(
            family=metadata["family"],
            params=params,
            log_weights=tensors["log_weights"],
            sticks=sticks,
            loc_scale=tensors.get("loc_scale"),
            draws=draws or None,
            alpha=metadata["alpha"],
            algorithm=metadata["algorithm"],
            settings=metadata["settings"],
            trace=metadata["trace"],
            provenance=metadata["provenance"],
        )

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable overview: algorithm, sizes and effective components."""
        return {
            "algorithm": self.algorithm,
            "family": self.family,
            "dim": self.dim,
            "truncation": self.truncation,
            "effective_components_99": self.effective_components(0.99),
            "components_above_1e-6": int((self.weights > 1e-6).sum()),
            "alpha": self.alpha,
            "provenance": self.provenance,
        }


def _read_posterior_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"posterior file not found: {path}; fit one with `dinodpmm fit` first.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"cannot read posterior file {path}: {error}. The file is truncated or not a "
            "dinodpmm posterior; refit it or copy it again."
        ) from error
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without dinodpmm metadata, so not a posterior file.")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"the metadata of posterior file {path} is not valid JSON: {error}.") from error
    return tensors, metadata


def _check_metadata(metadata: dict[str, Any], path, expected_dim: int | None) -> None:
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"posterior file {path} has format version {version!r}, but this dinodpmm "
            f"reads version {FORMAT_VERSION}; refit the posterior with this version."
        )
    if expected_dim is not None and metadata["dim"] != expected_dim:
        raise ValueError(
            f"posterior file {path} was fitted on {metadata['dim']}-dimensional embeddings, "
            f"but the embeddings here have dimension {expected_dim}; use the same backbone "
            f"({metadata.get('provenance', {}).get('backbone', 'unknown')}) or refit."
        )


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot store {type(value).__name__} in posterior metadata.")
