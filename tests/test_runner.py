"""End-to-end tests of the experiment runner on a small subset of real brain MRI, and the demo."""

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dinodpmm.experiments.cli import main
from dinodpmm.experiments.config import load_config
from dinodpmm.experiments.demo import run_demo
from dinodpmm.experiments.runner import (
    METRIC_KEYS,
    _stratified_subsample,
    prepare_data,
    run_experiment,
    split_fingerprint,
)
from dinodpmm.experiments.saved_runs import NormalReference, evaluate_run, normal_reference
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
    assert {row["backbone"] for row in rows} == {"offline"}


def test_run_records_normal_scores(lgg_run):
    metrics = _metrics(lgg_run)
    for method in ("dpmm", "memory_bank"):
        assert len(metrics["normal_image_scores"][method]) == metrics["counts"]["threshold_images"], method
    assert set(metrics["data_fingerprints"]) == {"train", "threshold", "test"}
    assert metrics["posterior"]["provenance"]["train_fingerprint"] == metrics["data_fingerprints"]["train"]


def test_evaluate_reproduces_metrics(lgg_run):
    before = (lgg_run / "metrics.json").read_bytes()
    recomputed = evaluate_run(lgg_run, memory_bank=True)
    saved = _metrics(lgg_run)
    for method in ("dpmm", "memory_bank"):
        for key, value in saved[method].items():
            assert recomputed[method][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (method, key)
    for method in ("dpmm", "memory_bank"):
        assert recomputed["normal_image_scores"][method] == pytest.approx(saved["normal_image_scores"][method], rel=1e-9)
    assert recomputed["changed_splits"] == []
    assert json.loads((lgg_run / "evaluation.json").read_text()) == json.loads(json.dumps(recomputed))
    assert (lgg_run / "metrics.json").read_bytes() == before


def test_evaluate_skips_bank_by_default(lgg_run):
    recomputed = evaluate_run(lgg_run)
    assert "memory_bank" not in recomputed
    assert "build_memory_bank" not in recomputed["timings_s"]
    assert recomputed["dpmm"]["image_auroc"] == pytest.approx(_metrics(lgg_run)["dpmm"]["image_auroc"], rel=1e-12)


def test_evaluate_reports_changed_split(lgg_run, tmp_path, caplog):
    run_copy = tmp_path / "run"
    shutil.copytree(lgg_run, run_copy)
    metrics = _metrics(run_copy)
    metrics["data_fingerprints"]["test"] = "0" * 64
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    recomputed = evaluate_run(run_copy)
    assert recomputed["changed_splits"] == ["test"]
    assert "the test images under" in caplog.text


def test_evaluate_command_prints_table(lgg_run, capsys):
    assert main(["evaluate", str(lgg_run)]) == 0
    output = capsys.readouterr().out
    image_auroc = _metrics(lgg_run)["dpmm"]["image_auroc"]
    assert f"{image_auroc:.4f}" in output
    assert "backbone: offline" in output
    assert f"wrote {lgg_run / 'evaluation.json'}" in output


def test_score_command_two_images(lgg_run, tmp_path, capsys):
    images = sorted((_lgg_root() / "test" / "Ungood" / "img").glob("*.png"))[:2]
    out = tmp_path / "scored"
    assert main(["score", str(lgg_run), *map(str, images), "--out", str(out)]) == 0
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(path) for path in images]
    assert all(float(row["score"]) <= float(row["max_patch_score"]) for row in rows)
    assert len(list(out.glob("*_overlay.png"))) == 2
    output = capsys.readouterr().out
    assert "scored 2 images" in output
    assert "backbone offline" in output
    reference = NormalReference(np.array(_metrics(lgg_run)["normal_image_scores"]["dpmm"]), "metrics.json")
    threshold = reference.threshold(0.05)
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(threshold, rel=1e-12)
        assert row["above_threshold"] == str(float(row["score"]) > threshold)
        assert float(row["normal_percentile"]) == pytest.approx(reference.percentile(float(row["score"])))
        assert row["backbone"] == "offline"
    assert f"threshold {threshold:.6g}" in output


def test_score_without_normal_scores(lgg_run, tmp_path, capsys):
    # A run made by `dinodpmm fit` has no metrics.json and so no threshold.
    run_copy = tmp_path / "fit_only"
    run_copy.mkdir()
    for name in ("config.yaml", "posterior.safetensors"):
        shutil.copy(lgg_run / name, run_copy / name)
    image = sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0]
    assert main(["score", str(run_copy), str(image), "--out", str(tmp_path / "scored")]) == 0
    assert "no threshold" in capsys.readouterr().out
    with (tmp_path / "scored" / "scores.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert row["threshold"] == ""
    assert row["above_threshold"] == ""


def test_score_rejects_fpr(lgg_run, tmp_path, capsys):
    image = sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0]
    status = main(["score", str(lgg_run), str(image), "--out", str(tmp_path / "scored"), "--fpr", "1.5"])
    assert status == 2
    assert "--fpr must lie in (0, 1), got 1.5" in capsys.readouterr().err


def test_normal_reference_threshold():
    reference = NormalReference(np.arange(1.0, 101.0), "metrics.json")
    threshold = reference.threshold(0.05)
    assert np.sum(reference.scores > threshold) == 5
    assert reference.percentile(50.5) == pytest.approx(50.0)


def test_split_fingerprint_changes(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(b"12345")
    samples = [Sample(root / "a.png", None, 0, "good"), Sample(root / "b.png", None, 1, "bad")]
    base = split_fingerprint(samples, root)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert split_fingerprint([Sample(moved / s.image.name, None, s.label, s.defect) for s in samples], moved) == base
    assert split_fingerprint(samples[:1], root) != base
    assert split_fingerprint([samples[0], Sample(root / "b.png", None, 0, "good")], root) != base
    (root / "b.png").write_bytes(b"123456")
    assert split_fingerprint(samples, root) != base


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
    assert metrics["backbone"]["name"] == "offline-texture"
    assert metrics["backbone_is_baseline"] is True
    assert "synthetic" in metrics["note"]
    assert metrics["threshold_images"] == "train holdout"
    for name in FIGURES:
        assert (tmp_path / "demo" / "figures" / f"{name}.png").is_file(), name
    assert 0.0 <= metrics["dpmm"]["image_auroc"] <= 1.0


def test_refit_removes_stale_outputs(lgg_run, tmp_path, cache_dir, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(lgg_run, run_copy)
    status = main(["fit", str(LGG_CONFIG), f"data.root={_lgg_root()}", f"cache.dir={cache_dir}", *SMALL_RUN,
                   "fit.seed=1", "--out", str(run_copy), "--force"])
    assert status == 0
    for name in ("metrics.json", "scores.csv", "figures", "evaluation.json"):
        assert not (run_copy / name).exists(), name
    assert (run_copy / "posterior.safetensors").is_file()
    image = sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["score", str(run_copy), str(image), "--out", str(tmp_path / "scored")]) == 0
    assert "no threshold" in capsys.readouterr().out


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """Copy a run without the evaluation.json that earlier tests may have added."""
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy, ignore=shutil.ignore_patterns("evaluation.json"))
    return run_copy


def test_normal_reference_ignores_other_posterior(lgg_run, tmp_path, caplog):
    run_copy = _copy_run(lgg_run, tmp_path)
    metrics = _metrics(run_copy)
    metrics["posterior_sha256"] = "0" * 64
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    assert normal_reference(run_copy) is None
    assert "written for another posterior" in caplog.text


@pytest.mark.parametrize(
    "scores",
    [[1, 2], None, {"dpmm": 5}, {"dpmm": [[1.0, 2.0]]}, {"dpmm": [None, 1.0]}, {"dpmm": []}, {"dpmm": ["a"]}],
    ids=["list", "null", "number", "nested", "null-item", "empty", "text"],
)
def test_normal_reference_rejects_malformed(lgg_run, tmp_path, caplog, scores):
    run_copy = _copy_run(lgg_run, tmp_path)
    metrics = _metrics(run_copy)
    metrics["normal_image_scores"] = scores
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    assert normal_reference(run_copy) is None
    assert "normal_image_scores are missing or not finite" in caplog.text


def test_score_skips_unreadable_image(lgg_run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0], folder / "1.png")
    (folder / "2.png").write_text("not an image")
    out = tmp_path / "scored"
    assert main(["score", str(lgg_run), str(folder), "--out", str(out)]) == 0
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["path"]).name for row in rows] == ["1.png", "2.png"]
    assert rows[0]["error"] == ""
    assert math.isfinite(float(rows[0]["score"]))
    assert rows[1]["score"] == ""
    assert rows[1]["error"] != ""
    assert "scored 1 image, skipped 1" in capsys.readouterr().out


def test_score_all_unreadable_is_error(lgg_run, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    status = main(["score", str(lgg_run), str(tmp_path / "bad.png"), "--out", str(tmp_path / "scored")])
    assert status == 2
    assert "none of the 1 images could be scored" in capsys.readouterr().err
    assert (tmp_path / "scored" / "scores.csv").is_file()


def test_score_into_input_folder(lgg_run, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0], folder / "scan.png")
    for force in ([], ["--force"]):
        assert main(["score", str(lgg_run), str(folder), "--out", str(folder), *force]) == 0
        with (folder / "scores.csv").open() as handle:
            assert [Path(row["path"]).name for row in csv.DictReader(handle)] == ["scan.png"]
    assert len(list(folder.glob("*_overlay.png"))) == 1


def test_score_refuses_earlier_scores(lgg_run, tmp_path, capsys):
    images = sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[:2]
    out = tmp_path / "scored"
    assert main(["score", str(lgg_run), *map(str, images), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["score", str(lgg_run), str(images[0]), "--out", str(out)]) == 2
    assert "already contains the output of an earlier `score` (3 files)" in capsys.readouterr().err
    assert len(list(out.glob("*_overlay.png"))) == 2
    assert main(["score", str(lgg_run), str(images[0]), "--out", str(out), "--force"]) == 0
    assert len(list(out.glob("*_overlay.png"))) == 1


def test_score_rejects_empty_out(lgg_run, tmp_path, capsys):
    status = main(["score", str(lgg_run), str(tmp_path), "--out", ""])
    assert status == 2
    assert "--out is empty" in capsys.readouterr().err


def test_run_dir_given_as_file(lgg_run, tmp_path, capsys):
    status = main(["score", str(lgg_run / "posterior.safetensors"), str(tmp_path), "--out", str(tmp_path / "o")])
    assert status == 2
    assert f"is a file; pass the directory that contains it ({lgg_run})" in capsys.readouterr().err


def test_evaluate_moved_dataset(lgg_run, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(lgg_run, run_copy)
    config = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(config.replace(str(_lgg_root()), str(tmp_path / "moved")))
    assert main(["evaluate", str(run_copy)]) == 2
    error = capsys.readouterr().err
    assert f"set data.root in {run_copy / 'config.yaml'}" in error


def test_score_rejects_changed_backbone(lgg_run, tmp_path, capsys):
    run_copy = _copy_run(lgg_run, tmp_path)
    config = (run_copy / "config.yaml").read_text()
    assert "resolution: 448" in config
    (run_copy / "config.yaml").write_text(config.replace("resolution: 448", "resolution: 224"))
    status = main(["score", str(run_copy), str(tmp_path), "--out", str(tmp_path / "o")])
    assert status == 2
    error = capsys.readouterr().err
    assert "differs from the one the posterior was fitted with (weights_digest" in error
    assert "resolution 448 at the fit, 224 now" in error


def test_fit_keeps_user_files_without_run(tmp_path, cache_dir, capsys):
    out = tmp_path / "paper"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "fig1.pdf").write_text("mine")
    argv = ["fit", str(LGG_CONFIG), f"data.root={_lgg_root()}", f"cache.dir={cache_dir}", *SMALL_RUN, "--out", str(out)]
    assert main(argv) == 2
    assert "already contains a run (figures)" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert (out / "figures" / "fig1.pdf").read_text() == "mine"


def test_score_force_keeps_files_on_error(lgg_run, tmp_path, capsys):
    image = sorted((_lgg_root() / "test" / "good" / "img").glob("*.png"))[0]
    out = tmp_path / "scored"
    assert main(["score", str(lgg_run), str(image), "--out", str(out)]) == 0
    before = sorted(path.name for path in out.iterdir())
    assert main(["score", str(tmp_path / "typo"), str(image), "--out", str(out), "--force"]) == 2
    assert sorted(path.name for path in out.iterdir()) == before


def test_score_images_rejects_empty_paths(lgg_run, tmp_path):
    from dinodpmm.experiments.runner import RunError
    from dinodpmm.experiments.saved_runs import score_images

    with pytest.raises(RunError, match="paths is empty"):
        score_images(lgg_run, [], tmp_path / "scored")
    assert not (tmp_path / "scored").exists()


def test_cli_run_outputs_match_runner():
    from dinodpmm.experiments.cli import RUN_OUTPUTS
    from dinodpmm.experiments.runner import STALE_OUTPUTS

    assert set(RUN_OUTPUTS) == set(STALE_OUTPUTS)


def test_evaluate_expands_home_in_data_root(lgg_run, tmp_path, monkeypatch):
    run_copy = _copy_run(lgg_run, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "lgg").symlink_to(_lgg_root())
    monkeypatch.setenv("HOME", str(home))
    config = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(config.replace(str(_lgg_root()), "~/lgg"))
    recomputed = evaluate_run(run_copy)
    assert recomputed["dpmm"]["image_auroc"] == pytest.approx(_metrics(lgg_run)["dpmm"]["image_auroc"], rel=1e-12)
