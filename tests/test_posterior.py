import json
import math

import numpy as np
import pytest
import torch

from dinodpmm.inference.posterior import FORMAT_VERSION, Posterior


def make_posterior(family="diag", num_components=4, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(num_components, dim, generator=generator) * 3
    if family == "diag":
        params = {"loc": loc, "precision": torch.rand(num_components, dim, generator=generator) + 0.5}
    else:
        tril = torch.tril(torch.randn(num_components, dim, dim, generator=generator) * 0.3)
        tril = tril + torch.diag_embed(torch.rand(num_components, dim, generator=generator) + 0.5)
        params = {"loc": loc, "precision_tril": tril}
    concentration1 = torch.tensor([50.0, 30.0, 5.0])[: num_components - 1]
    concentration0 = torch.tensor([60.0, 20.0, 3.0])[: num_components - 1]
    from dinodpmm.models.stick_breaking import log_mean_weights
    from torch.distributions import Beta

    return Posterior(
        family=family,
        params=params,
        log_weights=log_mean_weights(Beta(concentration1, concentration0)),
        sticks=(concentration1, concentration0),
        loc_scale=torch.full((num_components, dim), 0.1),
        alpha={"value": 1.0},
        algorithm="test",
        settings={"truncation": num_components},
        trace={"elbo": [1.0, 2.0]},
        provenance={"backbone": "offline"},
    )


@pytest.mark.parametrize("family", ["diag", "full"])
def test_log_density_matches_torch_distributions(family):
    posterior = make_posterior(family)
    x = torch.randn(50, 3) * 3
    if family == "diag":
        scale = posterior.params["precision"].rsqrt()
        components = torch.distributions.Independent(torch.distributions.Normal(posterior.means, scale), 1)
    else:
        components = torch.distributions.MultivariateNormal(
            posterior.means, precision_matrix=posterior.params["precision_tril"] @ posterior.params["precision_tril"].mT
        )
    expected = torch.logsumexp(posterior.log_weights + components.log_prob(x.unsqueeze(1)), -1)
    assert torch.allclose(posterior.log_density(x), expected, atol=1e-4)


@pytest.mark.parametrize("family", ["diag", "full"])
def test_assign_picks_most_probable_component(family):
    posterior = make_posterior(family)
    x = torch.randn(40, 3) * 3
    joint = posterior.log_weights + posterior.component_log_density(x)
    assert torch.equal(posterior.assign(x), joint.argmax(-1))
    assert posterior.assign(x).dtype == torch.int64


@pytest.mark.parametrize("family", ["diag", "full"])
def test_save_load_round_trip(tmp_path, family):
    posterior = make_posterior(family)
    path = tmp_path / "posterior.safetensors"
    posterior.save(path)
    loaded = Posterior.load(path)
    x = torch.randn(20, 3)
    assert torch.equal(loaded.log_density(x), posterior.log_density(x))
    assert loaded.settings == posterior.settings
    assert loaded.provenance == {"backbone": "offline"}
    assert loaded.trace == posterior.trace


def test_load_rejects_truncated_file(tmp_path):
    path = tmp_path / "posterior.safetensors"
    make_posterior().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a dinodpmm posterior"):
        Posterior.load(path)


def test_load_rejects_other_format_version(tmp_path, monkeypatch):
    from dinodpmm.inference import posterior as module

    monkeypatch.setattr(module, "FORMAT_VERSION", FORMAT_VERSION + 1)
    path = tmp_path / "posterior.safetensors"
    make_posterior().save(path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        Posterior.load(path)


def test_load_rejects_dimension_mismatch(tmp_path):
    path = tmp_path / "posterior.safetensors"
    make_posterior(dim=3).save(path)
    with pytest.raises(ValueError, match="fitted on 3-dimensional embeddings"):
        Posterior.load(path, expected_dim=384)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="posterior file not found"):
        Posterior.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="without dinodpmm metadata"):
        Posterior.load(tmp_path / "other.safetensors")


def test_log_density_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"shape \(num_points, 3\).*offline"):
        make_posterior().log_density(torch.zeros(5, 4))


def test_sample_weights_follow_stick_posterior():
    posterior = make_posterior()
    draws = posterior.sample(20_000, seed=1)
    assert draws["weights"].shape == (20_000, 4)
    assert draws["means"].shape == (20_000, 4, 3)
    assert torch.allclose(draws["weights"].sum(-1), torch.ones(20_000), atol=1e-5)
    standard_error = draws["weights"].std(0) / math.sqrt(20_000)
    assert ((draws["weights"].mean(0) - posterior.weights).abs() < 4 * standard_error).all()


def test_num_components_counts_occupied():
    # Two heavy components and two with weight ~1e-9: among 100 points only two are occupied.
    posterior = make_posterior()
    posterior.sticks = None
    posterior.log_weights = torch.log(torch.tensor([0.5, 0.5 - 2e-9, 1e-9, 1e-9]))
    count = posterior.num_components(100, 200)
    assert count.samples.shape == (200,)
    assert set(count.pmf()) == {2}
    assert count.interval() == (2, 2)


def test_num_components_single_point_is_one():
    count = make_posterior().num_components(1, 50)
    assert np.all(count.samples == 1)


def test_effective_components():
    posterior = make_posterior()
    posterior.log_weights = torch.log(torch.tensor([0.7, 0.25, 0.049, 0.001]))
    assert posterior.effective_components(0.9) == 2
    assert posterior.effective_components(0.99) == 3
    assert posterior.effective_components(1.0) == 4
    with pytest.raises(ValueError, match=r"mass must lie in \(0, 1\]"):
        posterior.effective_components(0.0)


def test_describe_is_json_serialisable():
    description = make_posterior().describe()
    assert json.loads(json.dumps(description))["provenance"] == {"backbone": "offline"}


def test_inference_data_method_has_component_counts():
    idata = make_posterior().inference_data(num_points=50, num_samples=20)
    assert "num_components" in idata.posterior
    assert idata.posterior["num_components"].shape == (1, 20)


def test_save_file_is_world_readable(tmp_path):
    path = tmp_path / "posterior.safetensors"
    make_posterior().save(path)
    assert path.stat().st_mode & 0o777 == 0o644
