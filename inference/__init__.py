"""Inference algorithms for the DPMM; every one returns a :class:`Posterior`."""

from .gibbs import fit_gibbs
from .online_em import fit_online_em
from .posterior import ComponentCount, Posterior
from .svi import MeanFieldELBO, MeanFieldGuide, fit_svi

__all__ = [
    "ComponentCount",
    "MeanFieldELBO",
    "MeanFieldGuide",
    "Posterior",
    "fit_gibbs",
    "fit_online_em",
    "fit_svi",
]
