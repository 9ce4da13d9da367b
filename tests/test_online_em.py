"""Tests of the minibatch online variational EM fit of the truncated DP mixture."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from dinodpmm.inference.online_em import fit_online_em
from dinodpmm.inference.posterior import Posterior


def image_data(num_images=60, patches_per_image=32, dim=5, seed=0):
    """Return per-image patch arrays from 3 well-separated Gaussians, and the true labels."""
    rng = np.random.default_rng(seed)
    centers = 6.0 * rng.standard_normal((3, dim))
    images, labels = [], []
    for _ in range(num_images):
        label = rng.integers(0, 3, patches_per_image)
        images.append(centers[label] + rng.standard_normal((patches_per_image, dim)))
        labels.append(label)
    return images, np.concatenate(labels)


@pytest.fixture(scope="module")
def separated_fit():
    images, labels = image_data()
    posterior = fit_online_em(images, truncation=10, num_epochs=30, seed=1, progress=False)
    return posterior, np.concatenate(images), labels


def test_recovers_separated_clusters(separated_fit):
    posterior, points, labels = separated_fit
    assert adjusted_rand_score(labels, posterior.assign(points).numpy()) >= 0.98


def test_unused_components_shrink(separated_fit):
    posterior, points, _ = separated_fit
    weights = torch.sort(posterior.weights, descending=True).values
    # Seven surplus components share well under one point's worth of mass each.
    assert weights[3:].sum().item() < 7 / len(points)
    assert weights[:3].min().item() > 0.25


def test_posterior_fields(separated_fit):
    posterior, _, _ = separated_fit
    assert posterior.algorithm == "online-em"
    assert posterior.truncation == 10
    assert posterior.sticks[0].shape == (9,)
    assert len(posterior.trace["nll"]) == 30
    assert posterior.alpha["value"] > 0
    assert posterior.weights.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_save_load_roundtrip(separated_fit, tmp_path):
    posterior, points, _ = separated_fit
    path = tmp_path / "online_em.safetensors"
    posterior.save(path)
    loaded = Posterior.load(path)
    torch.testing.assert_close(loaded.log_density(points), posterior.log_density(points))
    torch.testing.assert_close(loaded.sticks[1], posterior.sticks[1])
    assert loaded.trace == posterior.trace
    assert loaded.settings == posterior.settings


class ShapeRecorder(TorchDispatchMode):
    """Record the shape of every tensor that a torch operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor))
        return result


@pytest.mark.parametrize("covariance, expect_matrices", [("diag", False), ("full", True)], ids=["diag", "full"])
def test_dim_by_dim_allocations(covariance, expect_matrices):
    # dim = 7 differs from every other size here, so a trailing (7, 7) is a covariance-like matrix.
    images, _ = image_data(num_images=8, patches_per_image=9, dim=7, seed=2)
    recorder = ShapeRecorder()
    with recorder:
        fit_online_em(images, truncation=4, covariance=covariance, images_per_step=3, num_epochs=2, progress=False)
    matrices = [shape for shape in recorder.shapes if len(shape) >= 2 and shape[-2:] == (7, 7)]
    assert bool(matrices) == expect_matrices


def small_images(seed=3):
    images, _ = image_data(num_images=12, patches_per_image=10, dim=3, seed=seed)
    return images


LAYOUTS = {
    "list": lambda images: ({"data": images}),
    "array-3d": lambda images: ({"data": np.stack(images)}),
    "offsets": lambda images: ({"data": np.concatenate(images), "image_offsets": np.arange(13) * 10}),
    "rows": lambda images: ({"data": torch.as_tensor(np.concatenate(images)), "batch_size": 40}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_data_layouts(layout):
    images = small_images()
    posterior = fit_online_em(truncation=5, num_epochs=2, images_per_step=4, progress=False, **LAYOUTS[layout](images))
    assert posterior.settings["num_points"] == 120
    assert torch.isfinite(posterior.log_density(np.concatenate(images))).all()


def test_memmap_float16_offsets(tmp_path):
    points = np.concatenate(small_images())
    path = tmp_path / "patches.f16"
    stored = np.memmap(path, dtype=np.float16, mode="w+", shape=points.shape)
    stored[:] = points
    stored.flush()
    data = np.memmap(path, dtype=np.float16, mode="r", shape=points.shape)
    posterior = fit_online_em(data, truncation=5, num_epochs=2, image_offsets=np.arange(13) * 10, progress=False)
    assert posterior.settings["num_units"] == 12


def test_validation_selects_best_epoch():
    images = small_images(seed=4)
    validation = small_images(seed=5)
    posterior = fit_online_em(images, truncation=5, num_epochs=4, validation=validation, progress=False)
    validation_nll = posterior.trace["validation_nll"]
    assert len(validation_nll) == 4
    assert posterior.settings["selected_epoch"] == int(np.argmin(validation_nll))
    selected_nll = -posterior.log_density(np.concatenate(validation)).double().mean().item()
    # The stored value was computed by the same code on the same state, in float32.
    assert selected_nll == pytest.approx(min(validation_nll), rel=1e-5)


@pytest.mark.parametrize("covariance", ["diag", "full"], ids=["diag", "full"])
def test_point_estimates(covariance):
    images = small_images(seed=6)
    posterior = fit_online_em(
        images, truncation=5, covariance=covariance, num_epochs=3, point_estimates=True, progress=False
    )
    assert posterior.settings["point_estimates"] is True
    assert torch.isfinite(posterior.log_density(np.concatenate(images))).all()


def test_deterministic_for_seed():
    images = small_images(seed=7)
    first = fit_online_em(images, truncation=5, num_epochs=2, seed=9, progress=False)
    second = fit_online_em(images, truncation=5, num_epochs=2, seed=9, progress=False)
    torch.testing.assert_close(first.means, second.means)
    assert first.trace == second.trace


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"covariance": "spherical"}, "covariance must be one of"),
        ({"truncation": 1}, "truncation must be an integer of at least 2"),
        ({"truncation": 500}, "truncation=500 exceeds the 120 patches"),
        ({"rate": 0.0}, r"rate must lie in \(0, 1\]"),
        ({"alpha": -1.0}, "alpha must be positive"),
        ({"num_epochs": 0}, "num_epochs must be a positive integer"),
    ],
    ids=["covariance", "truncation-small", "truncation-large", "rate", "alpha", "epochs"],
)
def test_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        fit_online_em(small_images(), progress=False, **{"truncation": 5, **arguments})


def test_patch_matrix_needs_structure():
    with pytest.raises(ValueError, match="pass image_offsets"):
        fit_online_em(np.concatenate(small_images()), truncation=5, progress=False)


def test_invalid_offsets():
    with pytest.raises(ValueError, match="image_offsets must be a non-decreasing"):
        fit_online_em(np.concatenate(small_images()), truncation=5, image_offsets=[0, 50, 100], progress=False)


# Each layout as nested lists and as the arrays they convert to.
NESTED_LISTS = {
    "images": lambda images: ({"data": [image.tolist() for image in images]}, {"data": images}),
    "rows": lambda images: (
        {"data": np.concatenate(images).tolist(), "batch_size": 40},
        {"data": np.concatenate(images), "batch_size": 40},
    ),
    "rows-offsets": lambda images: (
        {"data": np.concatenate(images).tolist(), "image_offsets": np.arange(13) * 10},
        {"data": np.concatenate(images), "image_offsets": np.arange(13) * 10},
    ),
}


@pytest.mark.parametrize("layout", list(NESTED_LISTS), ids=list(NESTED_LISTS))
def test_nested_lists_match_arrays(layout):
    as_lists, as_arrays = NESTED_LISTS[layout](small_images(seed=8))
    from_lists = fit_online_em(truncation=5, num_epochs=2, seed=3, progress=False, **as_lists)
    from_arrays = fit_online_em(truncation=5, num_epochs=2, seed=3, progress=False, **as_arrays)
    torch.testing.assert_close(from_lists.means, from_arrays.means)
    assert from_lists.settings["num_units"] == from_arrays.settings["num_units"]


def test_nested_list_validation():
    images = small_images(seed=9)
    validation = small_images(seed=10)
    from_lists = fit_online_em(images, truncation=5, num_epochs=2, validation=np.concatenate(validation).tolist(),
                               progress=False)
    from_arrays = fit_online_em(images, truncation=5, num_epochs=2, validation=validation, progress=False)
    assert from_lists.trace["validation_nll"] == pytest.approx(from_arrays.trace["validation_nll"], rel=1e-12)


@pytest.mark.parametrize(
    "data, error, message",
    [
        ([[1.0, 2.0], [3.0]], ValueError, "data is a nested sequence with rows of different lengths"),
        ([["a", "b"], ["c", "d"]], TypeError, r"data\[0\] must be an array of shape \(num_patches, dim\)"),
        ({"patches": [1.0, 2.0]}, TypeError, "data must be a list of per-image arrays, or a numpy array"),
        ([], ValueError, "data is an empty list"),
    ],
    ids=["ragged", "strings", "dict", "empty"],
)
def test_invalid_data_types(data, error, message):
    with pytest.raises(error, match=message):
        fit_online_em(data, truncation=2, batch_size=1, progress=False)


def test_invalid_validation_list():
    images = small_images(seed=11)
    with pytest.raises(ValueError, match=r"validation as a list must contain arrays of shape \(num_patches, 3\)"):
        fit_online_em(images, truncation=5, validation=[images[0][:, :2]], progress=False)
