"""Inference algorithms for the DPMM; every one returns a :class:`Posterior`."""

from .diagnostics import ComponentCountPosterior, component_count_posterior, inference_data
from .gibbs import fit_gibbs
from .online_em import fit_online_em
from .posterior import ComponentCount, Posterior
from .svi import MeanFieldELBO, MeanFieldGuide, fit_svi

__all__ = [
    "ComponentCount",
    "ComponentCountPosterior",
    "component_count_posterior",
    "inference_data",
    "MeanFieldELBO",
    "MeanFieldGuide",
    "Posterior",
    "fit_gibbs",
    "fit_online_em",
    "fit_svi",
]
