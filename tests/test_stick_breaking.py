import math

import pytest
import torch
from torch.distributions import Beta

from dinodpmm.models.stick_breaking import (
    expected_log_weights,
    log_mean_weights,
    log_weights_from_sticks,
    stick_prior,
)


@pytest.mark.parametrize("truncation", [2, 50, 2000], ids=["T2", "T50", "T2000"])
def test_sampled_weights_sum_to_one(truncation):
    torch.manual_seed(0)
    sticks = stick_prior(torch.tensor(5.0, dtype=torch.float64), truncation).sample((16,))
    log_weights = log_weights_from_sticks(sticks)
    assert log_weights.shape == (16, truncation)
    assert torch.isfinite(log_weights).all()
    assert torch.allclose(log_weights.exp().sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-6)


def test_weights_finite_where_cumprod_underflows():
    # With v = 0.5 the last of 2000 weights is 2^-1999, far below the float64 minimum.
    sticks = torch.full((1999,), 0.5, dtype=torch.float64)
    log_weights = log_weights_from_sticks(sticks)
    assert torch.isfinite(log_weights).all()
    assert log_weights[-1].item() == pytest.approx(1999 * math.log(0.5))
    assert torch.cumprod(1 - sticks, 0)[-1].item() == 0.0


def test_log_mean_weights_match_monte_carlo():
    torch.manual_seed(1)
    posterior = Beta(torch.tensor([3.0, 2.0, 5.0]), torch.tensor([4.0, 6.0, 1.0]))
    draws = log_weights_from_sticks(posterior.sample((200_000,))).exp()
    standard_error = draws.std(0) / math.sqrt(len(draws))
    difference = (draws.mean(0) - log_mean_weights(posterior).exp()).abs()
    assert (difference < 4 * standard_error).all()


def test_expected_log_weights_match_monte_carlo():
    torch.manual_seed(2)
    posterior = Beta(torch.tensor([3.0, 2.0]), torch.tensor([4.0, 6.0]))
    draws = log_weights_from_sticks(posterior.sample((200_000,)))
    standard_error = draws.std(0) / math.sqrt(len(draws))
    difference = (draws.mean(0) - expected_log_weights(posterior)).abs()
    assert (difference < 4 * standard_error).all()


def test_pitman_yor_stick_parameters():
    prior = stick_prior(2.0, truncation=4, discount=0.25)
    assert torch.allclose(prior.concentration1, torch.full((3,), 0.75))
    assert torch.allclose(prior.concentration0, torch.tensor([2.25, 2.5, 2.75]))


@pytest.mark.parametrize(
    "truncation, discount, message",
    [(1, 0.0, "truncation must be an integer of at least 2"), (10, 1.0, "discount must lie in")],
    ids=["truncation", "discount"],
)
def test_stick_prior_rejects_invalid(truncation, discount, message):
    with pytest.raises(ValueError, match=message):
        stick_prior(1.0, truncation, discount)
