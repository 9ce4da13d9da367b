"""End-to-end tests of the experiment runner on a small subset of real brain MRI, and the demo."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from dinodpmm.experiments.cli import main
from dinodpmm.experiments.config import load_config
from dinodpmm.experiments.demo import run_demo
from dinodpmm.experiments.runner import (
    METRIC_KEYS,
    _stratified_subsample,
    evaluate_run,
    prepare_data,
    run_experiment,
)
from dinodpmm.features import Sample

REPO_ROOT = Path(__file__).resolve().parents[1]
LGG_CONFIG = REPO_ROOT / "experiments" / "configs" / "lgg_flair.yaml"
FIGURES = ("anomaly_maps", "component_assignments", "roc", "mixture_weights", "num_components", "trace")
# A run small enough for about half a minute on two CPU cores.
SMALL_RUN = [
    "data.max_train_images=24",
    "data.max_valid_images=6",
    "data.max_test_images=12",
    "fit.truncation=8",
    "fit.num_steps=20",
    "fit.batch_size=1024",
    "baseline.max_patches=4000",
    "plots.num_assignment_images=2",
    "plots.roc_pixels_per_image=256",
]


def _lgg_root() -> Path:
    data = Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))
    root = data / "lgg_flair"
    if not root.is_dir():
        pytest.skip(f"real brain MRI data not found at {root}; set DINODPMM_DATA to the folder holding lgg_flair")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lgg_run(tmp_path_factory, cache_dir):
    """Run the small lgg_flair experiment once through the CLI and return its directory."""
    root = _lgg_root()
    out = tmp_path_factory.mktemp("lgg_run")
    status = main(["run", str(LGG_CONFIG), f"data.root={root}", f"cache.dir={cache_dir}", *SMALL_RUN,
                   "--out", str(out)])
    assert status == 0
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_writes_every_file(lgg_run):
    for name in ("config.yaml", "posterior.safetensors", "metrics.json", "scores.csv"):
        assert (lgg_run / name).is_file(), name
    for name in FIGURES:
        assert (lgg_run / "figures" / f"{name}.png").stat().st_size > 0, name


@pytest.mark.parametrize("method", ["dpmm", "memory_bank"], ids=["dpmm", "bank"])
def test_run_metrics_in_unit_interval(lgg_run, method):
    metrics = _metrics(lgg_run)[method]
    for key in (*METRIC_KEYS, "dice_fpr10", "dice_fpr05", "dice_fpr01"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_run_names_backbone(lgg_run):
    metrics = _metrics(lgg_run)
    assert metrics["backbone"]["name"] == "offline"
    assert metrics["backbone_is_baseline"] is True
    assert metrics["posterior"]["provenance"]["backbone"]["name"] == "offline"
    assert metrics["posterior"]["provenance"]["layout"] == "brats"


def test_run_records_context(lgg_run):
    metrics = _metrics(lgg_run)
    assert metrics["algorithm"] == "svi"
    assert metrics["score"] == "euclidean"
    assert metrics["memory_bank_patches"] == 4000
    assert metrics["threshold_images"] == "valid"
    assert set(metrics["versions"]) == {"dinodpmm", "torch", "pyro-ppl", "timm", "numpy"}
    assert metrics["counts"]["train_images"] == 24
    assert metrics["counts"]["test_images"] == 12
    assert metrics["timings_s"]["dpmm_scoring_s_per_image"] > 0
    assert metrics["timings_s"]["memory_bank_scoring_s_per_image"] > 0


def test_run_scores_csv_matches_split(lgg_run):
    with (lgg_run / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert {row["label"] for row in rows} == {"0", "1"}
    assert all(math.isfinite(float(row["dpmm_score"])) for row in rows)
    assert all(math.isfinite(float(row["memory_bank_score"])) for row in rows)


def test_evaluate_reproduces_metrics(lgg_run, capsys):
    recomputed = evaluate_run(lgg_run)
    saved = _metrics(lgg_run)
    for method in ("dpmm", "memory_bank"):
        for key, value in saved[method].items():
            assert recomputed[method][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (method, key)


def test_evaluate_command_prints_table(lgg_run, capsys):
    assert main(["evaluate", str(lgg_run)]) == 0
    output = capsys.readouterr().out
    image_auroc = _metrics(lgg_run)["dpmm"]["image_auroc"]
    assert f"{image_auroc:.4f}" in output


def test_score_command_two_images(lgg_run, tmp_path, capsys):
    images = sorted((_lgg_root() / "test" / "Ungood" / "img").glob("*.png"))[:2]
    out = tmp_path / "scored"
    assert main(["score", str(lgg_run), *map(str, images), "--out", str(out)]) == 0
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(path) for path in images]
    assert all(float(row["score"]) <= float(row["max_patch_score"]) for row in rows)
    assert len(list(out.glob("*_overlay.png"))) == 2
    assert "scored 2 images" in capsys.readouterr().out


def _sample(label: int, i: int) -> Sample:
    return Sample(Path(f"{label}_{i}.png"), None, label, "good" if label == 0 else "bad")


@pytest.mark.parametrize(("size", "anomalous"), [(10, 3), (4, 1), (2, 1)], ids=["ten", "four", "two"])
def test_stratified_subsample_keeps_both_labels(size, anomalous):
    samples = [_sample(0, i) for i in range(70)] + [_sample(1, i) for i in range(30)]
    chosen = _stratified_subsample(samples, size, np.random.default_rng(0))
    assert len(chosen) == size
    assert sum(sample.label for sample in chosen) == anomalous
    assert len(set(chosen)) == size


def test_prepare_data_holds_out_without_valid(tmp_path):
    from dinodpmm.experiments.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "tiles", fast=True)
    config = load_config(None, [f"data.root={root}", "data.holdout_fraction=0.2"])
    data = prepare_data(config)
    assert data.threshold_source == "train holdout"
    assert len(data.threshold) == 6
    assert len(data.train) == 24
    assert not set(data.threshold) & set(data.train)


def test_demo_fast(tmp_path, cache_dir):
    metrics = run_demo(tmp_path / "demo", fast=True, overrides=[f"cache.dir={cache_dir}"])
    assert metrics["backbone"]["name"] == "offline"
    assert "synthetic" in metrics["note"]
    assert metrics["threshold_images"] == "train holdout"
    for name in FIGURES:
        assert (tmp_path / "demo" / "figures" / f"{name}.png").is_file(), name
    assert 0.0 <= metrics["dpmm"]["image_auroc"] <= 1.0
