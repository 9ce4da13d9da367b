"""Stick-breaking construction of Dirichlet process and Pitman-Yor mixture weights.

The weights are computed in log space throughout:
``log pi_k = log v_k + sum_{j<k} log1p(-v_j)`` for ``k < truncation - 1`` and the last
stick is fixed at 1, so ``log pi_{T-1} = sum_{j<T-1} log1p(-v_j)``. The product
``cumprod(1 - v)`` underflows to zero long before ``truncation = 2000``; the sum of
logs does not.
"""

from __future__ import annotations

import torch
from pyro.distributions import Beta


def stick_breaking_log_weights(log_sticks: torch.Tensor, log1m_sticks: torch.Tensor) -> torch.Tensor:
    """Turn stick log-proportions into mixture log-weights.

    Parameters
    ----------
    log_sticks : torch.Tensor of shape (..., truncation - 1)
        ``log v_k``.
    log1m_sticks : torch.Tensor of shape (..., truncation - 1)
        ``log(1 - v_k)``. Passed separately so that callers can supply expectations
        (``E[log v]`` and ``E[log(1 - v)]`` under a Beta posterior) as well as samples.

    Returns
    -------
    torch.Tensor of shape (..., truncation)
        ``log pi``; the last component receives the remaining stick.
    """
    remaining = torch.cumsum(log1m_sticks, dim=-1)  # log prod_{j<=k} (1 - v_j)
    before = torch.nn.functional.pad(remaining[..., :-1], (1, 0))  # exclusive cumulative sum
    return torch.cat([log_sticks + before, remaining[..., -1:]], dim=-1)


def log_weights_from_sticks(sticks: torch.Tensor) -> torch.Tensor:
    """Return mixture log-weights for stick proportions ``v`` of shape (..., truncation - 1)."""
    return stick_breaking_log_weights(torch.log(sticks), torch.log1p(-sticks))


def stick_prior(alpha: torch.Tensor | float, truncation: int, discount: float = 0.0) -> Beta:
    """Return the prior of the ``truncation - 1`` free sticks.

    ``v_k ~ Beta(1 - discount, alpha + (k + 1) * discount)`` with ``k`` counted from 0;
    ``discount = 0`` is the Dirichlet process, ``0 < discount < 1`` the Pitman-Yor process.

    Parameters
    ----------
    alpha : float or torch.Tensor of shape (...,)
        Concentration. A tensor adds leading batch dimensions.
    truncation : int
        Number of mixture components, at least 2.
    discount : float
        Pitman-Yor discount in ``[0, 1)``.

    Returns
    -------
    torch.distributions.Beta with batch shape (..., truncation - 1)
    """
    check_stick_parameters(truncation, discount)
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(float(alpha))
    index = torch.arange(1, truncation, dtype=alpha.dtype, device=alpha.device)
    concentration0 = alpha.unsqueeze(-1) + discount * index
    concentration1 = torch.full_like(concentration0, 1.0 - discount)
    return Beta(concentration1, concentration0)


def check_stick_parameters(truncation: int, discount: float) -> None:
    """Raise ValueError for a truncation below 2 or a discount outside ``[0, 1)``."""
    if not isinstance(truncation, int) or truncation < 2:
        raise ValueError(
            f"truncation must be an integer of at least 2, got {truncation!r}; "
            "use a value well above the number of components you expect (for example 500)."
        )
    if not 0.0 <= discount < 1.0:
        raise ValueError(
            f"discount must lie in [0, 1) (0 is the Dirichlet process), got {discount!r}."
        )


def expected_log_sticks(posterior: Beta) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``E[log v]`` and ``E[log(1 - v)]`` under a Beta distribution over sticks."""
    a, b = posterior.concentration1, posterior.concentration0
    digamma_total = torch.digamma(a + b)
    return torch.digamma(a) - digamma_total, torch.digamma(b) - digamma_total


def expected_log_weights(posterior: Beta) -> torch.Tensor:
    """Return ``E[log pi]`` of shape (..., truncation) under independent Beta sticks."""
    return stick_breaking_log_weights(*expected_log_sticks(posterior))


def log_mean_weights(posterior: Beta) -> torch.Tensor:
    """Return ``log E[pi]`` of shape (..., truncation) under independent Beta sticks.

    The sticks are independent, so ``E[pi_k] = E[v_k] prod_{j<k} E[1 - v_j]``.
    """
    a, b = posterior.concentration1, posterior.concentration0
    log_total = torch.log(a + b)
    return stick_breaking_log_weights(torch.log(a) - log_total, torch.log(b) - log_total)
