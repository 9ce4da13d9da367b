"""Tests of the dinodpmm command line: parsing, user-error messages and exit codes."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodpmm.experiments.cli import EXIT_USER_ERROR, build_parser, main
from dinodpmm.experiments.config import load_config, save_config
from dinodpmm.features import load_backbone
from dinodpmm.inference import fit_svi

REPO_ROOT = Path(__file__).resolve().parents[1]
LGG_CONFIG = REPO_ROOT / "experiments" / "configs" / "lgg_flair.yaml"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _tiny_mvtec(root: Path, *, train_images: int) -> Path:
    """Write an MVTec-layout dataset of 28 x 28 noise images; train/good may be empty."""
    rng = np.random.default_rng(0)
    for folder, count in (("train/good", train_images), ("test/good", 2), ("test/crack", 2)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / folder / f"{i}.png")
    (root / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)).save(root / "ground_truth" / "crack" / f"{i}_mask.png")
    return root


def test_parser_lists_commands():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("run", "fit", "score", "evaluate", "demo", "embed", "cache"):
        assert name in commands, name


def test_overrides_after_out_are_collected(tmp_path, capsys):
    status = main(["fit", str(LGG_CONFIG), "--out", str(tmp_path / "run"), "fit.truncation=1"])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys).startswith("error: invalid value for fit.truncation: 1")


def test_unknown_option_is_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(LGG_CONFIG), "--out", str(tmp_path), "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_missing_dataset(tmp_path, capsys):
    status = main(["run", str(LGG_CONFIG), f"data.root={tmp_path / 'absent'}", "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: dataset root {tmp_path / 'absent'} not found or not a directory; set data.root in the config "
        "file or pass data.root=PATH, the folder that contains the train and test splits."
    )


def test_unknown_backbone(tmp_path, capsys):
    status = main(["fit", str(LGG_CONFIG), "backbone.name=resnet50", "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys).startswith("error: unknown backbone 'resnet50' in backbone.name; available backbones: ")


def test_unknown_config_key(tmp_path, capsys):
    status = main(["run", str(LGG_CONFIG), "fit.truncaton=5", "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys).startswith("error: unknown config key fit.truncaton; valid keys in fit: fit.algorithm")


def test_missing_config_file(tmp_path, capsys):
    status = main(["run", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == f"error: config file {tmp_path / 'absent.yaml'} not found; pass the path of a YAML experiment config."


def test_empty_training_split(tmp_path, capsys):
    root = _tiny_mvtec(tmp_path / "data", train_images=0)
    status = main(["fit", str(LGG_CONFIG), f"data.root={root}", "data.layout=mvtec", f"cache.dir={tmp_path / 'cache'}",
                   "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert line.startswith("error: ")
    assert "train" in line
    assert "no image" in line


@pytest.mark.parametrize("command", ["evaluate", "score"], ids=["evaluate", "score"])
def test_missing_run_directory(tmp_path, capsys, command):
    extra = [str(tmp_path), "--out", str(tmp_path / "out")] if command == "score" else []
    status = main([command, str(tmp_path / "absent"), *extra])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: run directory {tmp_path / 'absent'} not found; pass a directory written by "
        "`dinodpmm run` or `dinodpmm fit`."
    )


def test_run_directory_without_posterior(tmp_path, capsys):
    save_config(load_config(None, ["backbone.name=offline"]), tmp_path / "config.yaml")
    assert main(["evaluate", str(tmp_path)]) == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: run directory {tmp_path} has no posterior.safetensors; pass a directory written by "
        "`dinodpmm run` or `dinodpmm fit`."
    )


def test_posterior_from_other_dimension(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    posterior = fit_svi(data, truncation=3, num_steps=2, batch_size=50, init_subsample=200, progress=False)
    posterior.save(tmp_path / "posterior.safetensors")
    save_config(load_config(None, ["backbone.name=offline", "backbone.resolution=28"]), tmp_path / "config.yaml")
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    status = main(["score", str(tmp_path), str(image), "--out", str(tmp_path / "out")])
    assert status == EXIT_USER_ERROR
    assert re.fullmatch(r"error: posterior file .*posterior\.safetensors was fitted on 5-dimensional embeddings, "
                        r"but the embeddings here have dimension \d+; .*", _error_line(capsys))


def test_score_missing_image(tmp_path, capsys):
    dim = load_backbone("offline").dim
    data = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    fit_svi(data, truncation=3, num_steps=2, batch_size=50, init_subsample=200, progress=False).save(
        tmp_path / "posterior.safetensors")
    save_config(load_config(None, ["backbone.name=offline"]), tmp_path / "config.yaml")
    status = main(["score", str(tmp_path), str(tmp_path / "absent.png"), "--out", str(tmp_path / "out")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: image or folder {tmp_path / 'absent.png'} not found; pass existing image files or folders."
    )


def test_run_refuses_existing_run_directory(tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    (tmp_path / "posterior.safetensors").write_bytes(b"keep")
    config = tmp_path / "config_source.yaml"
    config.write_text("backbone:\n  name: offline\n")
    assert main(["run", str(config), "--out", str(tmp_path)]) == 2
    assert "already contains a run (posterior.safetensors)" in capsys.readouterr().err
    assert (tmp_path / "posterior.safetensors").read_bytes() == b"keep"


def test_run_rejects_out_that_is_a_file(tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    target = tmp_path / "a_file"
    target.write_text("x")
    config = tmp_path / "config_source.yaml"
    config.write_text("backbone:\n  name: offline\n")
    assert main(["run", str(config), "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_score_refuses_run_directory_as_out(tmp_path, capsys):
    from dinodpmm.experiments.cli import main

    (tmp_path / "metrics.json").write_text("{}")
    assert main(["score", str(tmp_path), str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a run directory" in capsys.readouterr().err


def test_config_duplicate_key(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("backbone:\n  name: offline\nfit:\n  truncation: 5\n  truncation: 6\n", encoding="utf-8")
    status = main(["fit", str(config), "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: config file {config} contains the key fit.truncation twice, at lines 4 and 5; keep one of them."
    )


def test_config_not_utf8(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes("plots:\n  note: caf\xe9\n".encode("latin-1"))
    status = main(["fit", str(config), "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys) == (
        f"error: config file {config} is not valid UTF-8 (byte 0xe9 at offset 18); save it as UTF-8 YAML."
    )


def test_layout_mismatch_suggests_layout(tmp_path, capsys):
    root = _tiny_mvtec(tmp_path / "data", train_images=10)
    status = main(["fit", str(LGG_CONFIG), f"data.root={root}", "data.layout=brats", f"cache.dir={tmp_path / 'cache'}",
                   "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert line.startswith(f"error: the test split of the brats dataset at {root} is missing because none of ")
    assert f"{root / 'test' / 'good' / 'img'}" in line
    assert line.endswith("The folders match the mvtec layout, so use layout mvtec or leave the layout unset to detect it")


def test_cache_dir_is_file(tmp_path, capsys):
    root = _tiny_mvtec(tmp_path / "data", train_images=10)
    cache_file = tmp_path / "cache.npy"
    cache_file.write_bytes(b"keep")
    status = main(["fit", str(LGG_CONFIG), f"data.root={root}", "data.layout=mvtec", f"cache.dir={cache_file}",
                   "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys).startswith(f"error: embedding cache root {cache_file} is a file, not a directory;")
    assert cache_file.read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seed", "-1"), ("--num-samples", "0"), ("--num-points", "0")],
    ids=["seed", "samples", "points"],
)
def test_diagnose_invalid_option(tmp_path, capsys, option, value):
    data = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    fit_svi(data, truncation=3, num_steps=2, batch_size=50, init_subsample=200, progress=False).save(
        tmp_path / "posterior.safetensors")
    status = main(["diagnose", str(tmp_path), option, value])
    assert status == EXIT_USER_ERROR
    assert _error_line(capsys).startswith(f"error: {option} must be ")
    assert not (tmp_path / "inference_data.nc").exists()


def test_parser_builds_without_torch():
    # `dinodpmm --help` must not pay for importing torch and timm (seconds on a busy machine).
    import subprocess
    import sys

    code = "import sys, dinodpmm.experiments.cli as cli; cli.build_parser(); print(sorted({'torch', 'timm'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert output.strip() == "[]"


@pytest.mark.parametrize("override", ["fit=null", "fit={}"], ids=["null", "empty-mapping"])
def test_section_override_is_user_error(tmp_path, capsys, override):
    status = main(["run", str(LGG_CONFIG), override, "fit.truncation=7", "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert line.startswith(f"error: invalid override '{override}': fit is a section, which an override cannot ")
    assert "override its keys one by one, for example fit.algorithm=VALUE. Keys of fit: fit.algorithm, " in line
    assert not (tmp_path / "run").exists()


def test_missing_weights_names_config_key(tmp_path, capsys, monkeypatch):
    from dinodpmm.features import checkpoints

    def failing_download(url, destination):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(checkpoints, "download_checkpoint", failing_download)
    root = _tiny_mvtec(tmp_path / "data", train_images=10)
    status = main(["fit", str(LGG_CONFIG), f"data.root={root}", "data.layout=mvtec", "backbone.name=dinov2_vits14",
                   f"cache.dir={tmp_path / 'cache'}", "--out", str(tmp_path / "run")])
    assert status == EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: no pretrained weights found for backbone 'dinov2_vits14'. Download ")
    assert "or pass its path: backbone.weights=PATH in a config file or as a key=value override" in errors[0]
    assert "--weights PATH (dinodpmm embed)" in errors[0]


def test_score_rejects_extreme_aspect(tmp_path, capsys):
    dim = load_backbone("offline").dim
    data = np.random.default_rng(0).normal(size=(200, dim)).astype(np.float32)
    fit_svi(data, truncation=3, num_steps=2, batch_size=50, init_subsample=200, progress=False).save(
        tmp_path / "posterior.safetensors")
    save_config(load_config(None, ["backbone.name=offline"]), tmp_path / "config.yaml")
    image = tmp_path / "strip.png"
    Image.new("L", (30000, 3)).save(image)
    status = main(["score", str(tmp_path), str(image), "--out", str(tmp_path / "out")])
    assert status == EXIT_USER_ERROR
    line = _error_line(capsys)
    assert line.startswith("error: ")
    assert line.endswith(
        "image of 30000 x 3 pixels (width x height) would give a patch grid of 32 x 320000 "
        "(10,240,000 patches) at resolution 448, more than the limit of 65,536 patches; crop or tile "
        "the image into pieces of a less extreme aspect ratio, or lower the resolution "
        "(backbone.resolution in a config) to at most 41."
    )


def test_demo_refuses_existing_run(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    status = main(["demo", "--out", str(tmp_path), "--fast"])
    assert status == EXIT_USER_ERROR
    assert "already contains a run (metrics.json)" in _error_line(capsys)
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_features_exports_survive_submodule_import():
    # A lazy export named like a submodule would turn into the module once the submodule is imported.
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil\n"
        "for name in ('dinodpmm.features', 'dinodpmm.experiments'):\n"
        "    package = importlib.import_module(name)\n"
        "    for module in pkgutil.iter_modules(package.__path__):\n"
        "        importlib.import_module(f'{name}.{module.name}')\n"
        "    print(sorted(n for n in package._EXPORTS if type(getattr(package, n)).__name__ == 'module'))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert output.split() == ["[]", "[]"]
