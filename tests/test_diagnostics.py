"""Tests of the posterior diagnostics and the `dinodpmm diagnose` command."""

import argparse
import dataclasses
import re

import numpy as np
import pytest
import xarray as xr

from dinodpmm.experiments.diagnostics_cli import register
from dinodpmm.inference.diagnostics import (
    ComponentCountPosterior,
    component_count_posterior,
    inference_data,
    load_inference_data,
    plot_component_count,
    save_inference_data,
)
from dinodpmm.inference.gibbs import fit_gibbs
from dinodpmm.inference.svi import fit_svi

NUM_SAMPLES = 200
CENTERS = np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0], [-8.0, 8.0, 0.0]])


def blobs(seed=0, per_cluster=60):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(per_cluster, 3)) + c for c in CENTERS]).astype(np.float32)


@pytest.fixture(scope="module")
def svi_posterior():
    return fit_svi(
        blobs(), truncation=8, num_steps=50, alpha_prior=(2.0, 1.0), progress=False,
        provenance={"backbone": "dinov2_vits14"},
    )


@pytest.fixture(scope="module")
def gibbs_posterior():
    return fit_gibbs(blobs(), num_chains=2, num_sweeps=12, burn_in=4, seed=0, progress=False, alpha_prior=(1.0, 1.0))


def test_count_same_type(svi_posterior, gibbs_posterior):
    svi_count = component_count_posterior(svi_posterior, 180, NUM_SAMPLES)
    gibbs_count = component_count_posterior(gibbs_posterior)
    assert type(svi_count) is ComponentCountPosterior
    assert type(gibbs_count) is ComponentCountPosterior


def test_count_gibbs_chains(gibbs_posterior):
    count = component_count_posterior(gibbs_posterior)
    kept_per_chain = 12 - 4
    assert count.samples.shape == (2 * kept_per_chain,)
    assert np.array_equal(count.chain, np.repeat([0, 1], kept_per_chain))
    expected = np.concatenate([np.asarray(t[4:]) for t in gibbs_posterior.trace["num_clusters"]])
    assert np.array_equal(count.samples, expected)
    assert count.num_points == 180


def test_count_variational_draws(svi_posterior):
    count = component_count_posterior(svi_posterior, 180, NUM_SAMPLES, seed=3)
    assert count.samples.shape == (NUM_SAMPLES,)
    assert count.chain is None
    assert count.source == "variational"
    assert np.array_equal(count.samples, svi_posterior.num_components(180, NUM_SAMPLES, seed=3).samples)


def test_mass_components_svi(svi_posterior):
    count = component_count_posterior(svi_posterior, 180, NUM_SAMPLES)
    assert count.mass_components.shape == (NUM_SAMPLES,)
    assert np.all(count.mass_components >= 1)
    assert np.all(count.mass_components <= 8)


def test_mass_components_gibbs(gibbs_posterior):
    count = component_count_posterior(gibbs_posterior)
    assert count.mass_components.shape == count.samples.shape
    assert np.all(count.mass_components >= 1)
    # A Gibbs weight draw is Dirichlet over the occupied clusters only.
    assert np.all(count.mass_components <= count.samples)


def test_mass_components_exact():
    from dinodpmm.inference.diagnostics import _mass_components

    weights = np.array([[0.5, 0.3, 0.195, 0.005], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert np.array_equal(_mass_components(weights, 0.99), [3, 4, 1])


def test_count_requires_num_points(svi_posterior):
    settings = {key: value for key, value in svi_posterior.settings.items() if key != "num_points"}
    posterior = dataclasses.replace(svi_posterior, settings=settings)
    with pytest.raises(ValueError, match="num_points is None and the 'svi' posterior"):
        component_count_posterior(posterior)


def test_count_defaults_to_fitted_points(svi_posterior):
    count = component_count_posterior(svi_posterior)
    assert count.num_points == svi_posterior.settings["num_points"]


def test_count_rejects_mass(svi_posterior):
    with pytest.raises(ValueError, match=r"mass must lie in \(0, 1\], got 1.5"):
        component_count_posterior(svi_posterior, 180, mass=1.5)


def test_count_gibbs_warns_num_points(gibbs_posterior):
    with pytest.warns(UserWarning, match="num_points=500 differs from the 180 points"):
        component_count_posterior(gibbs_posterior, 500)


def test_idata_svi_roundtrip(svi_posterior, tmp_path):
    idata = inference_data(svi_posterior, 180, NUM_SAMPLES, top_components=5)
    loaded = load_inference_data(save_inference_data(idata, tmp_path / "svi.nc"))
    posterior = loaded.posterior
    assert set(posterior.data_vars) == {"num_components", "alpha", "sorted_weights"}
    assert posterior["num_components"].dims == ("chain", "draw")
    assert posterior["num_components"].shape == (1, NUM_SAMPLES)
    assert posterior["sorted_weights"].dims == ("chain", "draw", "component")
    assert posterior["sorted_weights"].shape == (1, NUM_SAMPLES, 5)
    assert np.all(np.diff(posterior["sorted_weights"].values, axis=-1) <= 0)
    assert loaded.sample_stats["elbo"].shape == (1, 50)
    assert posterior.attrs["algorithm"] == "svi"
    assert posterior.attrs["backbone"] == "dinov2_vits14"
    assert posterior.attrs["alpha_shape"] == pytest.approx(svi_posterior.alpha["shape"])
    xr.testing.assert_allclose(posterior, idata.posterior)


def test_idata_gibbs_roundtrip(gibbs_posterior, tmp_path):
    idata = inference_data(gibbs_posterior)
    loaded = load_inference_data(save_inference_data(idata, tmp_path / "gibbs.nc"))
    posterior = loaded.posterior
    assert set(posterior.data_vars) == {"num_components", "alpha", "log_likelihood", "sorted_weights"}
    for name in ("num_components", "alpha", "log_likelihood"):
        assert posterior[name].dims == ("chain", "draw")
        assert posterior[name].shape == (2, 8)
    assert posterior["sorted_weights"].dims == ("chain", "draw", "component")
    expected_likelihood = np.asarray(gibbs_posterior.trace["log_likelihood"])[:, 4:]
    assert np.allclose(posterior["log_likelihood"].values, expected_likelihood)
    assert set(loaded.sample_stats.data_vars) == {"alpha", "log_likelihood"}
    assert loaded.warmup_sample_stats["num_clusters"].shape == (2, 4)
    assert posterior.attrs["backbone"] == "unknown backbone"


def test_idata_alpha_gamma(svi_posterior):
    idata = inference_data(svi_posterior, 180, NUM_SAMPLES)
    draws = idata.posterior["alpha"].values.ravel()
    shape, rate = svi_posterior.alpha["shape"], svi_posterior.alpha["rate"]
    # Five standard errors of the Monte Carlo mean of Gamma(shape, rate) draws.
    tolerance = 5 * np.sqrt(shape) / rate / np.sqrt(NUM_SAMPLES)
    assert abs(draws.mean() - shape / rate) < tolerance


def test_plot_count_writes(gibbs_posterior, tmp_path):
    path = plot_component_count(component_count_posterior(gibbs_posterior), tmp_path / "k.png", algorithm="gibbs")
    assert path.is_file()
    assert path.stat().st_size > 0


# -- the diagnose command ---------------------------------------------------------------------


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="dinodpmm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("fixture", ["svi_posterior", "gibbs_posterior"], ids=["svi", "gibbs"])
def test_diagnose_run_dir(fixture, request, tmp_path, capsys):
    request.getfixturevalue(fixture).save(tmp_path / "posterior.safetensors")
    status = run_cli(["diagnose", str(tmp_path), "--num-points", "180", "--num-samples", str(NUM_SAMPLES)])
    captured = capsys.readouterr()
    output = captured.out
    assert status == 0
    assert "Shape validation failed" not in captured.out + captured.err
    assert (tmp_path / "inference_data.nc").is_file()
    assert (tmp_path / "figures" / "diagnostics" / "num_components.png").is_file()
    assert "ess_bulk" in output or "constant at" in output
    if fixture == "gibbs_posterior":
        assert (tmp_path / "figures" / "diagnostics" / "trace.png").is_file()
        assert (tmp_path / "figures" / "diagnostics" / "rank.png").is_file()
        assert "chains: 2" in output
        # Two chains of 8 kept sweeps cannot reach a bulk ESS of 200.
        assert "warning: bulk ESS of num_components" in output
    else:
        assert (tmp_path / "figures" / "diagnostics" / "objective.png").is_file()
        assert (tmp_path / "figures" / "diagnostics" / "q_alpha.png").is_file()
        assert "R-hat needs several chains" in output


def test_diagnose_missing_dir(tmp_path, capsys):
    status = run_cli(["diagnose", str(tmp_path / "absent")])
    assert status == 2
    assert capsys.readouterr().err.startswith("error: run folder not found")


def test_diagnose_missing_posterior(tmp_path, capsys):
    status = run_cli(["diagnose", str(tmp_path)])
    assert status == 2
    assert "posterior.safetensors not found" in capsys.readouterr().err


def test_diagnose_corrupt_posterior(tmp_path, capsys):
    (tmp_path / "posterior.safetensors").write_bytes(b"not a safetensors file")
    status = run_cli(["diagnose", str(tmp_path)])
    assert status == 2
    assert "cannot read posterior file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seed", "-1", r"--seed must be an integer in \[0, 2\*\*64\), got -1"),
        ("--seed", str(2**64), rf"--seed must be an integer in \[0, 2\*\*64\), got {2**64}"),
        ("--num-samples", "0", "--num-samples must be a positive integer, got 0"),
        ("--num-samples", "-3", "--num-samples must be a positive integer, got -3"),
        ("--num-points", "0", "--num-points must be a positive integer, got 0"),
    ],
    ids=["seed-negative", "seed-too-large", "samples-zero", "samples-negative", "points-zero"],
)
def test_diagnose_invalid_option(svi_posterior, tmp_path, capsys, option, value, message):
    svi_posterior.save(tmp_path / "posterior.safetensors")
    status = run_cli(["diagnose", str(tmp_path), option, value])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2
    assert len(lines) == 1
    assert re.match(rf"error: {message}; ", lines[0]), lines[0]
    assert not (tmp_path / "inference_data.nc").exists()


def test_convergence_warnings_flag_poor_mixing():
    import pandas as pd

    from dinodpmm.experiments.diagnostics_cli import convergence_warnings

    summary = pd.DataFrame(
        {"r_hat": [1.005, 1.2, 1.0, float("nan")], "ess_bulk": [900.0, 900.0, 150.0, float("nan")]},
        index=["good", "unmixed", "short", "tiny"],
    )
    lines = convergence_warnings(summary, num_chains=4)
    assert len(lines) == 3
    assert lines[0].startswith("warning: R-hat of unmixed is 1.2, above 1.01")
    assert lines[1].startswith("warning: bulk ESS of short is 150, below 100 per chain (400 for 4 chains)")
    assert lines[2].startswith("warning: R-hat and ESS of tiny are undefined")
