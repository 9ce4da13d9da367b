"""Tests of the scikit-learn wrapper and the algorithm comparison."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import digamma, logsumexp
from sklearn.mixture import BayesianGaussianMixture

from dinodpmm.experiments.compare import (
    ROW_KEYS,
    compare_algorithms,
    fit_sklearn,
    markdown_table,
    posterior_from_sklearn,
    write_csv,
)

CENTERS = np.array([[0.0, 0.0, 0.0], [6.0, 6.0, 6.0], [-6.0, 6.0, 0.0]])


def blobs(seed=0, per_cluster=100):
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 1.5, size=(3, 3))
    return np.concatenate([rng.normal(size=(per_cluster, 3)) * s + c for c, s in zip(CENTERS, scales)])


def sklearn_offsets(model, dim):
    """Per-component constants that scikit-learn adds to the plug-in weighted log-density.

    ``score_samples`` uses ``E[log pi_k] + E[log N(x | mu_k, Lambda_k)]``; against
    ``log weights_k + log N(x | means_k, precisions_k)`` this differs by
    ``E[log pi_k] - log weights_k + 0.5 (E[log|Lambda_k|] - log|E[Lambda_k]|) - 0.5 dim / beta_k``,
    which does not depend on x.
    """
    first, second = model.weight_concentration_
    total = digamma(first + second)
    expected_log_weights = digamma(first) - total + np.hstack((0, np.cumsum(digamma(second) - total)[:-1]))
    dof = model.degrees_of_freedom_
    expected_log_det = dim * np.log(2.0) + digamma(0.5 * (dof - np.arange(dim)[:, None])).sum(0)
    return (
        expected_log_weights - np.log(model.weights_)
        + 0.5 * (expected_log_det - dim * np.log(dof)) - 0.5 * dim / model.mean_precision_
    )


@pytest.mark.parametrize("covariance", ["diag", "full"], ids=["diag", "full"])
def test_sklearn_matches_score_samples(covariance):
    x = blobs()
    model = BayesianGaussianMixture(
        n_components=6, covariance_type=covariance, weight_concentration_prior_type="dirichlet_process",
        max_iter=300, random_state=0,
    ).fit(x)
    posterior = posterior_from_sklearn(model)
    weighted = (posterior.log_weights + posterior.component_log_density(x)).double().numpy()  # N K
    offsets = sklearn_offsets(model, x.shape[1])
    # Exact up to float64 rounding once the per-component constants are added back.
    assert np.allclose(logsumexp(weighted + offsets, axis=1), model.score_samples(x), rtol=0, atol=1e-8)
    assert np.array_equal(np.argmax(weighted + offsets, axis=1), model.predict(x))
    # The plug-in density is off by at most the largest constant (logsumexp is 1-Lipschitz).
    difference = np.abs(posterior.log_density(x).double().numpy() - model.score_samples(x))
    assert np.all(difference <= np.abs(offsets).max() + 1e-8)


@pytest.mark.parametrize("covariance", ["diag", "full"], ids=["diag", "full"])
def test_sklearn_predict_agrees(covariance):
    x = blobs(seed=1)
    posterior = fit_sklearn(x, truncation=6, covariance=covariance, seed=0)
    model = BayesianGaussianMixture(
        n_components=6, covariance_type=covariance, weight_concentration_prior_type="dirichlet_process",
        max_iter=500, random_state=0,
    ).fit(x)
    assign = posterior.assign(x).numpy()
    offsets = sklearn_offsets(model, x.shape[1])
    weighted = (posterior.log_weights + posterior.component_log_density(x)).double().numpy()
    # A point keeps its plug-in label under scikit-learn's per-component constants when its
    # plug-in margin over every other component exceeds the difference of the constants.
    top = np.argmax(weighted, axis=1)
    rows = np.arange(len(x))
    margin = weighted[rows, top][:, None] - weighted  # N K
    shift = offsets[None, :] - offsets[top][:, None]  # N K
    shift[rows, top] = -np.inf
    clear = np.all(margin > shift, axis=1)
    assert np.array_equal(assign, top)
    assert np.array_equal(assign[clear], model.predict(x)[clear])
    assert np.all(assign[~clear] != model.predict(x)[~clear])


def test_sklearn_posterior_fields():
    posterior = fit_sklearn(blobs(), truncation=6, covariance="full", seed=0, provenance={"backbone": "toy"})
    assert posterior.algorithm == "sklearn"
    assert posterior.family == "full"
    assert posterior.sticks[0].shape == (5,)
    assert torch.exp(posterior.log_weights).sum().item() == pytest.approx(1.0, abs=1e-12)
    assert posterior.provenance == {"backbone": "toy"}
    assert posterior.effective_components(0.99) == 3


def test_sklearn_subsample():
    data = torch.as_tensor(blobs(per_cluster=200))
    posterior = fit_sklearn(data, truncation=6, subsample=150, seed=4)
    assert posterior.settings["num_points"] == 150
    assert posterior.settings["total_points"] == 600
    assert posterior.settings["subsample"] == 150
    # The fit saw the seeded rows only: refitting scikit-learn on them gives the same means.
    rows = np.sort(np.random.default_rng(4).choice(600, size=150, replace=False))
    model = BayesianGaussianMixture(
        n_components=6, covariance_type="diag", weight_concentration_prior_type="dirichlet_process",
        max_iter=500, random_state=4,
    ).fit(data.numpy()[rows])
    np.testing.assert_allclose(posterior.params["loc"].numpy(), model.means_)
    with pytest.raises(ValueError, match="subsample must be None or an integer of at least 2, got 1"):
        fit_sklearn(data, subsample=1)
    with pytest.raises(ValueError, match=r"needs at least truncation = 6 points, got 5 \(subsample=5, 600 rows\)"):
        fit_sklearn(data, truncation=6, subsample=5)


def test_sklearn_rejects_covariance():
    with pytest.raises(ValueError, match="covariance must be 'diag' or 'full' for fit_sklearn, got 'spherical'"):
        fit_sklearn(blobs(), covariance="spherical")


def test_compare_rows_keys(tmp_path):
    train, heldout = blobs(seed=0, per_cluster=80).astype(np.float32), blobs(seed=1, per_cluster=30).astype(np.float32)
    options = {
        "truncation": 6,
        "num_samples": 100,
        "svi": {"num_steps": 30},
        "gibbs": {"num_chains": 2, "num_sweeps": 6, "burn_in": 2, "subsample": 120},
        "online-em": {"batch_size": 60, "num_epochs": 3},
        "sklearn": {"max_iter": 50},
    }
    algorithms = ["svi", "gibbs", "online-em", "sklearn"]
    rows = compare_algorithms(train, heldout, algorithms, options, evaluate=lambda posterior: {"extra": 1.0})
    assert [row["algorithm"] for row in rows] == algorithms
    for row in rows:
        assert set(ROW_KEYS) | {"extra", "posterior"} == set(row)
        assert np.isfinite(row["heldout_log_likelihood"])
        assert 1 <= row["num_components_low"] <= row["num_components_high"] <= 6
    table = markdown_table(rows)
    assert table.count("\n") == 2 + len(algorithms)
    assert write_csv(rows, tmp_path / "rows.csv").read_text().splitlines()[0].startswith("algorithm,")


def test_compare_rejects_algorithm():
    with pytest.raises(ValueError, match=r"algorithms must be a non-empty list drawn from .*got \['em'\]"):
        compare_algorithms(blobs(), blobs(), ["em"])


def test_plot_comparison_mean_below_interval(tmp_path):
    from dinodpmm.experiments.compare import plot_comparison

    row = {"algorithm": "svi", "heldout_log_likelihood": 1.0, "num_components_mean": 9.9,
           "num_components_low": 10, "num_components_high": 10, "effective_components": 9, "wall_time_s": 0.1}
    path = plot_comparison([row], tmp_path / "comparison.png")
    assert path.is_file()


def test_cli_algorithm_names_match():
    from dinodpmm.experiments.compare import ALGORITHMS
    from dinodpmm.experiments.diagnostics_cli import COMPARE_ALGORITHMS

    assert COMPARE_ALGORITHMS == ALGORITHMS


def test_compare_command_on_brain_mri(lgg_root, tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lgg_flair.yaml"
    out = tmp_path / "compare"
    overrides = [
        f"data.root={lgg_root}", f"cache.dir={tmp_path / 'cache'}", "data.max_train_images=12",
        "data.max_valid_images=4", "data.max_test_images=6", "fit.truncation=6", "fit.num_steps=20",
        "fit.gibbs.num_chains=2", "fit.gibbs.num_sweeps=6", "fit.gibbs.burn_in=2", "fit.gibbs.subsample=300",
        "fit.online_em.num_epochs=2", "fit.sklearn.subsample=500", "fit.sklearn.max_iter=30",
    ]
    # Overrides written after the algorithm list are recognised as overrides too.
    status = main(["compare", str(config), overrides[0], "--algorithms", "svi", "gibbs", "online-em", "sklearn",
                   *overrides[1:], "--out", str(out)])
    assert status == 0
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["algorithm"] for row in rows] == ["svi", "gibbs", "online-em", "sklearn"]
    for row in rows:
        assert row["backbone"] == "offline", row["algorithm"]
        assert 0.0 <= float(row["image_auroc"]) <= 1.0, row["algorithm"]
        assert 0.0 <= float(row["pixel_auroc"]) <= 1.0, row["algorithm"]
    assert (out / "comparison.png").stat().st_size > 0
    assert "| svi |" in (out / "comparison.md").read_text()
    output = capsys.readouterr().out
    assert "fitting gibbs on 300 of " in output
    assert "sklearn: fitted in " in output


def test_compare_command_rejects_algorithm(tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lgg_flair.yaml"
    status = main(["compare", str(config), "--algorithms", "svi", "vbem", "--out", str(tmp_path)])
    assert status == 2
    assert "--algorithms takes names from svi, gibbs, online-em, sklearn, got vbem." in capsys.readouterr().err


def test_compare_command_rejects_out_file(tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lgg_flair.yaml"
    (tmp_path / "taken").write_text("keep")
    status = main(["compare", str(config), "--algorithms", "svi", "--out", str(tmp_path / "taken")])
    assert status == 2
    assert f"--out {tmp_path / 'taken'} is a file" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep"
