import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from dinodpmm.inference import svi
from dinodpmm.inference.svi import fit_svi


def make_clusters(num_clusters, dim, num_points, separation, seed):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=generator) * separation
    labels = torch.randint(num_clusters, (num_points,), generator=generator)
    return centers[labels] + torch.randn(num_points, dim, generator=generator), labels


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_svi_recovers_five_clusters(covariance):
    data, labels = make_clusters(5, 8, 20_000, separation=5.0, seed=0)
    posterior = fit_svi(data, truncation=30, covariance=covariance, batch_size=2048, num_steps=600, progress=False)
    assert int((posterior.weights > 0.01).sum()) == 5
    assert adjusted_rand_score(labels.numpy(), posterior.assign(data).numpy()) >= 0.98


def test_svi_reads_float16_memmap(tmp_path):
    data, labels = make_clusters(3, 4, 6000, separation=6.0, seed=1)
    path = tmp_path / "patches.npy"
    np.save(path, data.numpy().astype(np.float16))
    memmap = np.load(path, mmap_mode="r")
    posterior = fit_svi(memmap, truncation=10, batch_size=1024, num_steps=800, progress=False)
    assert int((posterior.weights > 0.01).sum()) == 3
    assert adjusted_rand_score(labels.numpy(), posterior.assign(data).numpy()) >= 0.98


def test_svi_mean_matches_conjugate_posterior():
    # One Gaussian cluster: conditional on the fitted variance, the optimal q(loc) is the
    # exact Normal posterior, and full-batch steps have no Monte Carlo noise.
    generator = torch.Generator().manual_seed(3)
    data = 2.0 + 0.5 * torch.randn(400, 1, generator=generator, dtype=torch.float64)
    posterior = fit_svi(data, truncation=2, batch_size=400, num_steps=3000, learning_rate=0.05,
                        final_learning_rate=0.001, dtype=torch.float64, progress=False)
    k = int(torch.argmax(posterior.weights))
    variance = 1.0 / posterior.params["precision"][k, 0]
    prior_mean, prior_variance = data.mean(), data.var()
    # Responsibilities of the heavy component are 1 to within exp(-30).
    precision = 1.0 / prior_variance + len(data) / variance
    exact_mean = (prior_mean / prior_variance + data.sum() / variance) / precision
    exact_std = precision.rsqrt()
    assert posterior.means[k, 0].item() == pytest.approx(exact_mean.item(), abs=0.01 * exact_std.item())
    assert posterior.loc_scale[k, 0].item() == pytest.approx(exact_std.item(), rel=0.01)


def test_minibatch_elbo_is_unbiased():
    data, _ = make_clusters(3, 4, 2000, separation=4.0, seed=4)
    data = data.double()
    posterior_guide = _guide_after_steps(data, num_steps=20)
    loss, dpmm, guide = posterior_guide
    full = loss.loss(dpmm.model, guide, data, torch.arange(len(data)))
    generator = torch.Generator().manual_seed(5)
    estimates = torch.tensor([
        loss.loss(dpmm.model, guide, data, torch.randperm(len(data), generator=generator)[:100])
        for _ in range(400)
    ])
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - full) < 4 * standard_error.item()


def _guide_after_steps(data, num_steps):
    from dinodpmm.inference.initialization import kmeans_init
    from dinodpmm.models.components import DiagonalGaussian
    from dinodpmm.models.dpmm import DPMM

    generator = torch.Generator().manual_seed(0)
    family = DiagonalGaussian.from_data(data)
    dpmm = DPMM(family.to("cpu", torch.float64), truncation=8)
    centers, variance, counts = kmeans_init(data, 8, 5, generator)
    guide = svi.MeanFieldGuide(dpmm, centers, variance, counts)
    loss = svi.MeanFieldELBO(dpmm, guide)
    optimizer = pyro.optim.Adam({"lr": 0.05})
    runner = pyro.infer.SVI(dpmm.model, guide, optimizer, loss=loss)
    for _ in range(num_steps):
        runner.step(data, torch.randperm(len(data), generator=generator)[:200])
    return loss, dpmm, guide


def test_trace_elbo_runs_on_the_pyro_model():
    data, labels = make_clusters(3, 2, 3000, separation=8.0, seed=6)
    posterior = fit_svi(data, truncation=6, elbo="trace", batch_size=512, num_steps=200, progress=False)
    assert adjusted_rand_score(labels.numpy(), posterior.assign(data).numpy()) >= 0.95


def test_alpha_prior_gives_gamma_posterior():
    data, _ = make_clusters(4, 3, 4000, separation=6.0, seed=7)
    posterior = fit_svi(data, truncation=20, alpha_prior=(2.0, 2.0), batch_size=1000, num_steps=600, progress=False)
    assert set(posterior.alpha) == {"shape", "rate"}
    assert posterior.alpha["shape"] > 0
    assert int((posterior.weights > 0.01).sum()) == 4


def test_svi_elbo_trace_recorded():
    data, _ = make_clusters(2, 2, 1000, separation=6.0, seed=8)
    posterior = fit_svi(data, truncation=5, num_steps=50, batch_size=200, progress=False)
    assert len(posterior.trace["elbo"]) == 50
    assert np.mean(posterior.trace["elbo"][-10:]) > np.mean(posterior.trace["elbo"][:10])


def test_svi_stops_on_convergence():
    data, _ = make_clusters(2, 2, 1000, separation=6.0, seed=9)
    posterior = fit_svi(data, truncation=5, batch_size=1000, max_steps=3000, window=20, tolerance=1e-4, progress=False)
    assert posterior.settings["steps_run"] < 3000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"covariance": "spherical"}, "unknown component family 'spherical'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"elbo": "exact"}, "elbo must be one of"),
        ({"num_steps": 10, "num_epochs": 1}, "give num_steps or num_epochs, not both"),
        ({"alpha_prior": (1.0, -1.0)}, "alpha_prior must be a"),
        ({"alpha": 0.0}, "alpha must be positive"),
        ({"truncation": 1}, "truncation must be an integer of at least 2"),
    ],
    ids=["family", "batch", "elbo", "steps", "alpha-prior", "alpha", "truncation"],
)
def test_fit_svi_rejects_invalid_options(kwargs, message):
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=10)
    with pytest.raises(ValueError, match=message):
        fit_svi(data, progress=False, **{"num_steps": 1, **kwargs})


def test_fit_svi_rejects_bad_data():
    with pytest.raises(ValueError, match=r"shape \(num_points, dim\)"):
        fit_svi(torch.zeros(10), progress=False)
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        fit_svi([[0.0, 1.0]], progress=False)


def test_pitman_yor_discount_fits():
    data, labels = make_clusters(3, 2, 3000, separation=8.0, seed=11)
    posterior = fit_svi(data, truncation=10, discount=0.3, batch_size=1000, num_steps=300, progress=False)
    assert posterior.settings["discount"] == 0.3
    assert adjusted_rand_score(labels.numpy(), posterior.assign(data).numpy()) >= 0.98


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_model_trace_and_prior_draws(covariance):
    from pyro import poutine

    from dinodpmm.models import DPMM, StickBreakingMixture, get_family

    data, _ = make_clusters(2, 3, 200, separation=4.0, seed=12)
    dpmm = DPMM(get_family(covariance).from_data(data), truncation=6, alpha_prior=(1.0, 1.0))
    with warnings.catch_warnings():
        # torch's Wishart sampler warns when it redraws a numerically singular sample.
        warnings.filterwarnings("ignore", "Singular sample detected", UserWarning)
        trace = poutine.trace(dpmm.model).get_trace(data, torch.arange(50))
    assert {"alpha", "v", "loc", "precision"} <= set(trace.stochastic_nodes)
    assert trace.nodes["obs"]["value"].shape == (50, 3)
    assert torch.isfinite(trace.log_prob_sum())

    params = {"loc": trace.nodes["loc"]["value"]}
    if covariance == "diag":
        params["precision"] = trace.nodes["precision"]["value"]
    else:
        params["precision_tril"] = torch.linalg.cholesky(trace.nodes["precision"]["value"])
    from dinodpmm.models import log_weights_from_sticks

    mixture = StickBreakingMixture(log_weights_from_sticks(trace.nodes["v"]["value"]), get_family(covariance), params)
    assert mixture.sample((7,)).shape == (7, 3)


def test_num_threads_restored_after_fit():
    data, _ = make_clusters(2, 2, 500, separation=6.0, seed=13)
    before = torch.get_num_threads()
    fit_svi(data, truncation=4, num_steps=5, progress=False, num_threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        fit_svi(data, truncation=4, num_steps=5, progress=False, num_threads=0)


def test_fit_svi_rejects_non_finite_data():
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=14)
    data[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        fit_svi(data, truncation=4, num_steps=1, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": float("nan")},
        {"learning_rate": float("inf")},
        {"learning_rate": 0.0},
        {"learning_rate": -0.1},
        {"final_learning_rate": float("nan")},
        {"final_learning_rate": 0.0},
    ],
    ids=["nan", "inf", "zero", "negative", "final-nan", "final-zero"],
)
def test_fit_svi_rejects_learning_rate(kwargs):
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=15)
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"{name} must be a finite positive number, got {value!r}"):
        fit_svi(data, truncation=4, num_steps=1, progress=False, **kwargs)


def test_fit_svi_rejects_overflowing_values():
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=16)
    data[5] = 1e20
    message = r"values up to 1e\+20 in magnitude .* overflow dtype=torch.float32; .*dtype=torch.float64"
    with pytest.raises(ValueError, match=message):
        fit_svi(data, truncation=4, num_steps=1, progress=False)


def test_fit_svi_float64_fits_huge_values():
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=16)
    data = data.double()
    data[5] = 1e20
    posterior = fit_svi(data, truncation=4, num_steps=20, dtype=torch.float64, progress=False)
    assert torch.isfinite(posterior.log_density(data)).all()


def test_fit_svi_fits_values_below_limit():
    # The float32 limit is sqrt(finfo.max) / 2, about 9.2e18.
    data, _ = make_clusters(2, 2, 100, separation=3.0, seed=17)
    data[5] = 9e18
    posterior = fit_svi(data, truncation=4, num_steps=20, progress=False)
    assert torch.isfinite(posterior.log_density(data)).all()
