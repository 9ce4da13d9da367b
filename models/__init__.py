"""Pyro generative models: stick-breaking priors, component families and the DPMM."""

from .components import (
    ComponentFamily,
    DiagonalGaussian,
    FullGaussian,
    available_families,
    get_family,
    register_family,
)
from .dpmm import DPMM, StickBreakingMixture
from .stick_breaking import (
    expected_log_weights,
    log_mean_weights,
    log_weights_from_sticks,
    stick_breaking_log_weights,
    stick_prior,
)

__all__ = [
    "DPMM",
    "ComponentFamily",
    "DiagonalGaussian",
    "FullGaussian",
    "StickBreakingMixture",
    "available_families",
    "expected_log_weights",
    "get_family",
    "log_mean_weights",
    "log_weights_from_sticks",
    "register_family",
    "stick_breaking_log_weights",
    "stick_prior",
]
