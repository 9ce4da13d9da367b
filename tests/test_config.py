"""Tests of the experiment configuration: defaults, overrides, errors and the shipped configs."""

import re
from pathlib import Path

import pytest
import yaml

from dinodpmm.experiments.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_paths,
    save_config,
    valid_keys,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_defaults_match_schema():
    config = load_config(None)
    assert config.fit.algorithm == "svi"
    assert config.backbone.resolution == 448
    assert config.score.name is None
    assert config.score.min_weight == 1e-6
    assert config.eval.fprs == [0.1, 0.05, 0.01]
    assert config.baseline.memory_bank is True


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("fit.truncation=50", "fit", "truncation", 50),
        ("score.min_weight=1e-5", "score", "min_weight", 1e-5),
        ("fit.alpha_prior=[2, 0.5]", "fit", "alpha_prior", [2.0, 0.5]),
        ("data.root=null", "data", "root", None),
        ("baseline.memory_bank=false", "baseline", "memory_bank", False),
        ("eval.fprs=[0.2]", "eval", "fprs", [0.2]),
    ],
    ids=["int", "exponent-string", "pair", "null", "bool", "list"],
)
def test_override_parses_yaml_scalar(override, section, key, expected):
    config = load_config(None, [override])
    assert getattr(getattr(config, section), key) == expected


def test_override_nested_section():
    config = load_config(None, ["fit.gibbs.num_chains=2", "fit.online_em.rate=0.5"])
    assert config.fit.gibbs.num_chains == 2
    assert config.fit.online_em.rate == 0.5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key fit\.trunc; valid keys in fit: .*fit\.truncation"):
        load_config(None, ["fit.trunc=3"])


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match=r"unknown config key foo; valid keys in the top level: data, backbone"):
        load_config(None, ["foo.bar=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fit.truncation=1", r"invalid value for fit\.truncation: 1; it must be an integer >= 2"),
        ("fit.truncation=2.5", r"invalid value for fit\.truncation: 2\.5; it must be an integer"),
        ("fit.algorithm=vi", r"invalid value for fit\.algorithm: 'vi'; it must be one of svi, gibbs, online-em"),
        ("score.top_fraction=0", r"invalid value for score\.top_fraction: 0; it must be a number > 0 and <= 1"),
        ("fit.alpha_prior=[1]", r"invalid value for fit\.alpha_prior: \[1\]; it must be a list of two positive"),
        ("baseline.memory_bank=maybe", r"invalid value for baseline\.memory_bank: 'maybe'; it must be true or false"),
        ("fit.seed=null", r"invalid value for fit\.seed: None; it must be an integer >= 0\."),
    ],
    ids=["below-min", "float-for-int", "choice", "open-bound", "pair-length", "bool", "null"],
)
def test_invalid_value_names_key_value_constraint(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_burn_in_must_be_below_sweeps():
    with pytest.raises(ConfigError, match=r"fit\.gibbs\.burn_in: 200; it must be below fit\.gibbs\.num_sweeps \(200\)"):
        load_config(None, ["fit.gibbs.burn_in=200"])


def test_duplicate_fprs_rejected():
    with pytest.raises(ConfigError, match=r"eval\.fprs: \[0\.1, 0\.1\]; it must list distinct"):
        load_config(None, ["eval.fprs=[0.1, 0.1]"])


@pytest.mark.parametrize("text", ["fit.truncation", "=3"], ids=["no-equals", "no-key"])
def test_malformed_override_rejected(text):
    with pytest.raises(ConfigError, match=r"overrides have the form key=value"):
        load_config(None, [text])


def test_override_into_value_rejected():
    with pytest.raises(ConfigError, match=r"fit\.truncation\.x=1'?: truncation is a value, not a section"):
        apply_overrides({}, ["fit.truncation=3", "fit.truncation.x=1"])


SECTION_OVERRIDES = [
    ("fit=null", "fit", "fit.algorithm"),
    ("fit={}", "fit", "fit.algorithm"),
    ("fit={truncation: 7}", "fit", "fit.algorithm"),
    ("data=", "data", "data.root"),
    ("fit.gibbs=null", "fit.gibbs", "fit.gibbs.num_chains"),
]


@pytest.mark.parametrize(
    ("override", "section", "first_key"),
    SECTION_OVERRIDES,
    ids=["null", "empty-mapping", "mapping", "empty-value", "nested"],
)
def test_section_override_rejected(override, section, first_key):
    keys = [key for key in valid_keys() if key.startswith(section + ".")]
    message = (
        f"invalid override {override!r}: {section} is a section, which an override cannot replace as a "
        f"whole; override its keys one by one, for example {first_key}=VALUE. "
        f"Keys of {section}: {', '.join(keys)}."
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, [override])


def test_section_override_before_key_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  truncation: 40\n")
    with pytest.raises(ConfigError, match=r"^invalid override 'fit=null': fit is a section"):
        load_config(path, ["fit=null", "fit.truncation=7"])


@pytest.mark.parametrize(
    "text", ["fit:\n", "fit: {}\n", "fit:\n  gibbs:\n"], ids=["null", "empty-mapping", "nested-null"]
)
def test_empty_section_in_file_accepted(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    config = load_config(path, ["fit.truncation=7", "fit.gibbs.num_chains=2"])
    assert config.fit.truncation == 7
    assert config.fit.gibbs.num_chains == 2


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match=r"section fit must be a mapping"):
        config_from_dict({"fit": 3})


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*missing\.yaml not found"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fit: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "content",
    [
        "data:\n  root: caf\xe9\n".encode("latin-1"),
        "fit:\n  truncation: 5\n".encode("utf-16"),
    ],
    ids=["latin-1", "utf-16"],
)
def test_non_utf8_file_raises(tmp_path, content):
    path = tmp_path / "encoded.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(path))} is not valid UTF-8 .*save it as UTF-8 YAML"):
        load_config(path)


def test_utf8_bom_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("fit:\n  truncation: 7\n".encode("utf-8-sig"))
    assert load_config(path).fit.truncation == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fit:\n  truncation: 5\nfit:\n  alpha: 2.0\n", "contains the key fit twice, at lines 1 and 3"),
        ("fit:\n  truncation: 5\n  truncation: 6\n", "contains the key fit.truncation twice, at lines 2 and 3"),
        ("fit:\n  gibbs:\n    thin: 1\n    thin: 2\n", "contains the key fit.gibbs.thin twice, at lines 3 and 4"),
        ("fit: {alpha: 1.0, alpha: 2.0}\n", "contains the key fit.alpha twice, at lines 1 and 1"),
    ],
    ids=["section", "key", "nested", "flow"],
)
def test_duplicate_key_raises(tmp_path, text, message):
    path = tmp_path / "duplicate.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(path))} {message}; keep one of them\.$"):
        load_config(path)


def test_duplicate_key_in_override_raises():
    with pytest.raises(ConfigError, match=r"override 'fit.alpha_prior=\{a: 1, a: 2\}' contains the key a twice"):
        load_config(None, ["fit.alpha_prior={a: 1, a: 2}"])


def test_same_key_in_two_sections_accepted(tmp_path):
    path = tmp_path / "sections.yaml"
    path.write_text("data:\n  seed: 3\nfit:\n  seed: 4\nbaseline:\n  seed: 5\n", encoding="utf-8")
    config = load_config(path)
    assert config.data.seed == 3
    assert config.fit.seed == 4
    assert config.baseline.seed == 5


def test_file_values_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  truncation: 40\n  alpha: 2.0\n")
    config = load_config(path, ["fit.alpha=0.5"])
    assert config.fit.truncation == 40
    assert config.fit.alpha == 0.5


def test_relative_root_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(load_config(None, ["data.root=data/set", "cache.dir=~/cache"]))
    assert config.data.root == str((tmp_path / "data" / "set").resolve())
    assert config.cache.dir == str(Path("~/cache").expanduser().resolve())


def test_save_round_trip(tmp_path):
    config = load_config(None, ["fit.truncation=33", "fit.alpha_prior=[1, 2]", "score.name=cosine"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_saved_file_lists_every_key(tmp_path):
    save_config(load_config(None), tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    flat = []
    stack = [("", raw)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((prefix + key + ".", value))
            else:
                flat.append(prefix + key)
    assert sorted(flat) == sorted(valid_keys())


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    config = load_config(path)
    assert config.data.root is not None
    assert config.fit.truncation >= 2
