"""Experiment configuration: YAML files with nested sections, defaults and dotted overrides.

A configuration is a tree of sections (``data``, ``backbone``, ``cache``, ``fit``,
``score``, ``baseline``, ``eval``, ``plots``), each a dataclass whose fields carry
their default and their constraint. :func:`load_config` reads a YAML file, applies
``key=value`` overrides such as ``fit.truncation=50`` and checks every value. Unknown
or repeated keys and invalid values raise :class:`ConfigError`, whose message names the
key, the value and the constraint. An override sets one value: a key that names a whole
section, such as ``fit=null``, raises ConfigError, because replacing the section would
silently drop every value the file sets in it.

Relative paths (``data.root``, ``backbone.weights``, ``cache.dir``) resolve against the
current working directory, not against the configuration file, so the shipped configs
work when the command is run from the repository root. :func:`resolve_paths` turns
them into absolute paths, and the run directory stores that resolved configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("svi", "gibbs", "online-em")
COVARIANCES = ("diag", "full")
LAYOUTS = ("brats", "resc", "liver", "mvtec", "generic")
SCORES = ("cosine", "euclidean", "mahalanobis", "nll")
DEVICES_HELP = "a torch device string such as 'cpu' or 'cuda'"


class ConfigError(ValueError):
    """An unknown key or an invalid value in an experiment configuration."""


# -- value checks ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Check:
    """Constraint of one configuration value: its kind, bounds and whether null is allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    low_open: bool = False

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind in ("int", "float"):
            text = "an integer" if self.kind == "int" else "a number"
            text += self._bounds()
        elif self.kind == "float_list":
            text = "a non-empty list of numbers" + self._bounds()
        elif self.kind == "pair":
            text = "a list of two positive numbers [shape, rate]"
        else:
            text = {"bool": "true or false", "str": "a string"}[self.kind]
        return text + (" or null" if self.nullable else "")

    def _bounds(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return (" " + " and ".join(parts)) if parts else ""

    def apply(self, key: str, value: Any) -> Any:
        """Return ``value`` converted to this kind, or raise ConfigError naming ``key``."""
        if value is None:
            if self.nullable:
                return None
            raise _invalid(key, value, self)
        converted = _CONVERTERS[self.kind](value, self)
        if converted is _INVALID:
            raise _invalid(key, value, self)
        return converted


_INVALID = object()


def _invalid(key: str, value: Any, check: _Check) -> ConfigError:
    return ConfigError(
        f"invalid value for {key}: {value!r}; it must be {check.describe()}. "
        f"Fix it in the config file or override it with {key}=VALUE."
    )


def _in_bounds(number: float, check: _Check) -> bool:
    if check.low is not None and (number <= check.low if check.low_open else number < check.low):
        return False
    return check.high is None or number <= check.high


def _to_int(value: Any, check: _Check) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return _INVALID
    return value if _in_bounds(value, check) else _INVALID


def _to_float(value: Any, check: _Check) -> Any:
    # PyYAML reads exponents without a dot (1e-6) as strings, so numeric strings are accepted.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _INVALID
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _INVALID
    return float(value) if _in_bounds(value, check) else _INVALID


def _to_float_list(value: Any, check: _Check) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        return _INVALID
    numbers = [_to_float(item, check) for item in value]
    return _INVALID if any(number is _INVALID for number in numbers) else numbers


def _to_pair(value: Any, check: _Check) -> Any:
    positive = _Check("float", low=0.0, low_open=True)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        return _INVALID
    numbers = [_to_float(item, positive) for item in value]
    return _INVALID if any(number is _INVALID for number in numbers) else numbers


_CONVERTERS = {
    "int": _to_int,
    "float": _to_float,
    "float_list": _to_float_list,
    "pair": _to_pair,
    "bool": lambda value, check: value if isinstance(value, bool) else _INVALID,
    "str": lambda value, check: value if isinstance(value, str) and value else _INVALID,
    "choice": lambda value, check: value if value in check.choices else _INVALID,
}


def _field(default: Any, check: _Check, help: str) -> Any:
    factory = (lambda: list(default)) if isinstance(default, list) else None
    metadata = {"check": check, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"section": True})


# -- schema --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    root: str | None = _field(None, _Check("str", nullable=True), "dataset root folder")
    layout: str | None = _field(
        None, _Check("choice", choices=LAYOUTS, nullable=True), "dataset layout; null detects it from the folders"
    )
    max_train_images: int | None = _field(
        None, _Check("int", low=2, nullable=True), "seeded subsample of the normal training images; null uses all"
    )
    max_test_images: int | None = _field(
        None,
        _Check("int", low=2, nullable=True),
        "seeded subsample of the test images, stratified by label; null uses all",
    )
    max_valid_images: int | None = _field(
        None, _Check("int", low=1, nullable=True), "seeded subsample of the normal validation images; null uses all"
    )
    holdout_fraction: float = _field(
        0.1,
        _Check("float", low=0.0, high=0.5, low_open=True),
        "fraction of normal training images held out for the Dice thresholds when the dataset has no valid split",
    )
    seed: int = _field(0, _Check("int", low=0), "seed of every image subsample")


@dataclasses.dataclass
class BackboneConfig:
    name: str = _field("dinov2_vits14", _Check("str"), "backbone name, e.g. dinov2_vits14 or offline")
    weights: str | None = _field(None, _Check("str", nullable=True), "local weights file; null uses the default")
    resolution: int = _field(448, _Check("int", low=14), "length of the shorter image edge after resizing, pixels")
    device: str = _field("cpu", _Check("str"), DEVICES_HELP)
    batch_size: int = _field(16, _Check("int", low=1), "images per backbone call")


@dataclasses.dataclass
class CacheConfig:
    dir: str | None = _field(
        None, _Check("str", nullable=True), "embedding cache root; null uses $DINODPMM_CACHE or the user cache"
    )
    dtype: str = _field("float16", _Check("choice", choices=("float16", "float32")), "storage dtype of the cache")


@dataclasses.dataclass
class GibbsConfig:
    num_chains: int = _field(4, _Check("int", low=1), "independent chains")
    num_sweeps: int = _field(200, _Check("int", low=1), "sweeps per chain, burn-in included")
    burn_in: int = _field(50, _Check("int", low=0), "sweeps discarded at the start of each chain")
    thin: int = _field(1, _Check("int", low=1), "keep every thin-th sweep after burn-in")
    subsample: int | None = _field(
        20000, _Check("int", low=2, nullable=True), "training patches the sampler sees; null uses all"
    )
    split_merge: int = _field(0, _Check("int", low=0), "split-merge proposals per sweep")


@dataclasses.dataclass
class OnlineEMConfig:
    images_per_step: int = _field(12, _Check("int", low=1), "training images per minibatch")
    num_epochs: int = _field(40, _Check("int", low=1), "passes over the training images")
    rate: float = _field(
        0.2, _Check("float", low=0.0, high=1.0, low_open=True), "weight of each minibatch in the moving statistics"
    )


@dataclasses.dataclass
class SklearnConfig:
    max_iter: int = _field(500, _Check("int", low=1), "iterations of scikit-learn's batch variational inference")
    subsample: int | None = _field(
        100000, _Check("int", low=2, nullable=True), "training patches scikit-learn sees; null uses all"
    )


@dataclasses.dataclass
class FitConfig:
    algorithm: str = _field("svi", _Check("choice", choices=ALGORITHMS), "inference algorithm")
    truncation: int = _field(500, _Check("int", low=2), "number of components of the truncated process")
    covariance: str = _field("diag", _Check("choice", choices=COVARIANCES), "component covariance family")
    alpha: float = _field(1.0, _Check("float", low=0.0, low_open=True), "DP concentration (initial value)")
    alpha_prior: list[float] | None = _field(
        None, _Check("pair", nullable=True), "[shape, rate] of a Gamma prior on alpha; null keeps alpha fixed"
    )
    batch_size: int = _field(4096, _Check("int", low=1), "SVI minibatch size in patches")
    num_steps: int | None = _field(
        None, _Check("int", low=1, nullable=True), "SVI steps; null stops at convergence or max_steps"
    )
    max_steps: int = _field(5000, _Check("int", low=1), "SVI step limit when num_steps is null")
    learning_rate: float = _field(0.05, _Check("float", low=0.0, low_open=True), "initial Adam step size of SVI")
    seed: int = _field(0, _Check("int", low=0), "seed of the fit")
    gibbs: GibbsConfig = _section(GibbsConfig)
    online_em: OnlineEMConfig = _section(OnlineEMConfig)
    # The external reference of `dinodpmm compare`; `fit.algorithm` cannot select it.
    sklearn: SklearnConfig = _section(SklearnConfig)


@dataclasses.dataclass
class ScoreConfig:
    name: str | None = _field(
        None, _Check("choice", choices=SCORES, nullable=True), "patch score; null uses the backbone's recommended score"
    )
    min_weight: float = _field(1e-6, _Check("float", low=0.0), "components at or below this weight are ignored")
    top_fraction: float = _field(
        0.01, _Check("float", low=0.0, high=1.0, low_open=True), "fraction of highest patch scores the image score averages"
    )
    sigma: float = _field(0.0, _Check("float", low=0.0), "Gaussian smoothing of anomaly maps in pixels; 0 for none")


@dataclasses.dataclass
class BaselineConfig:
    memory_bank: bool = _field(True, _Check("bool"), "score the exact nearest-neighbour memory bank too")
    max_patches: int | None = _field(
        None, _Check("int", low=1, nullable=True), "seeded subsample of training patches in the bank; null uses all"
    )
    seed: int = _field(0, _Check("int", low=0), "seed of the bank subsample")


@dataclasses.dataclass
class EvalConfig:
    fprs: list[float] = _field(
        [0.1, 0.05, 0.01],
        _Check("float_list", low=0.0, high=1.0, low_open=True),
        "false-positive rates on normal validation patches that set the Dice thresholds",
    )
    max_fpr: float = _field(0.3, _Check("float", low=0.0, high=1.0, low_open=True), "upper FPR of the AUPRO integral")


@dataclasses.dataclass
class PlotsConfig:
    enabled: bool = _field(True, _Check("bool"), "write the figures")
    num_assignment_images: int = _field(4, _Check("int", low=1), "test images in the component assignment figure")
    roc_pixels_per_image: int = _field(
        2048, _Check("int", low=1), "seeded pixel sample per image for drawing the pixel ROC curve"
    )
    note: str | None = _field(None, _Check("str", nullable=True), "extra line added to every figure footer")


@dataclasses.dataclass
class Config:
    data: DataConfig = _section(DataConfig)
    backbone: BackboneConfig = _section(BackboneConfig)
    cache: CacheConfig = _section(CacheConfig)
    fit: FitConfig = _section(FitConfig)
    score: ScoreConfig = _section(ScoreConfig)
    baseline: BaselineConfig = _section(BaselineConfig)
    eval: EvalConfig = _section(EvalConfig)
    plots: PlotsConfig = _section(PlotsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as nested plain dicts, the form YAML files use."""
        return dataclasses.asdict(self)


# -- building and checking --------------------------------------------------------------------------


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Return every dotted key of a section, for example ``fit.gibbs.num_chains``."""
    keys = []
    for field in dataclasses.fields(cls):
        if field.metadata.get("section"):
            keys.extend(valid_keys(_section_type(cls, field), prefix + field.name + "."))
        else:
            keys.append(prefix + field.name)
    return keys


def _section_type(cls: type, field: dataclasses.Field) -> type:
    """Return the dataclass of a section field (its default factory is the class itself)."""
    return field.default_factory


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"section {prefix.rstrip('.') or '<top level>'} must be a mapping of keys to values, got {raw!r}."
        )
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(prefix + name for name in fields)}."
        )
    values = {}
    for name, field in fields.items():
        if name not in raw:
            continue
        if field.metadata.get("section"):
            values[name] = _build(_section_type(cls, field), raw[name] or {}, prefix + name + ".")
        else:
            values[name] = field.metadata["check"].apply(prefix + name, raw[name])
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Check a nested dict against the schema and fill in defaults.

    Raises
    ------
    ConfigError
        If a key is unknown or a value violates its constraint.
    """
    return _check_relations(_build(Config, raw or {}, ""))


def _check_relations(config: Config) -> Config:
    gibbs = config.fit.gibbs
    if gibbs.burn_in >= gibbs.num_sweeps:
        raise ConfigError(
            f"invalid value for fit.gibbs.burn_in: {gibbs.burn_in}; it must be below "
            f"fit.gibbs.num_sweeps ({gibbs.num_sweeps}) so that some sweeps are kept."
        )
    if len(set(config.eval.fprs)) != len(config.eval.fprs) or not all(f < 1.0 for f in config.eval.fprs):
        raise ConfigError(
            f"invalid value for eval.fprs: {config.eval.fprs!r}; it must list distinct false-positive "
            "rates in (0, 1), for example [0.1, 0.05, 0.01]."
        )
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into ``(["a", "b"], value)``, the value parsed as a YAML scalar."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"invalid override {text!r}; overrides have the form key=value, for example fit.truncation=50."
        )
    try:
        parsed = _load_yaml(value, f"override {text!r}") if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in override {text!r}: not valid YAML ({error}).") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``raw`` with each ``key=value`` override set.

    Raises
    ------
    ConfigError
        If an override is malformed, names a whole section (``fit=null``, ``fit={}``), or
        continues below a key that is a value, not a section.
    """
    result = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _reject_section_override(path, text)
        node = result
        for depth, part in enumerate(path[:-1], start=1):
            # A section left empty in the file (``fit:``) is null and means all defaults.
            if node.get(part) is None and _section_named(path[:depth]) is not None:
                node[part] = {}
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"invalid override {text!r}: {part} is a value, not a section.")
            node = child
        node[path[-1]] = value
    return result


def _reject_section_override(path: Sequence[str], text: str) -> None:
    """Raise ConfigError when the dotted key ``path`` names a section, not a value."""
    section = _section_named(path)
    if section is None:
        return
    key = ".".join(path)
    keys = valid_keys(section, key + ".")
    raise ConfigError(
        f"invalid override {text!r}: {key} is a section, which an override cannot replace "
        f"as a whole; override its keys one by one, for example {keys[0]}=VALUE. "
        f"Keys of {key}: {', '.join(keys)}."
    )


def _section_named(path: Sequence[str]) -> type | None:
    """Return the dataclass of the section at ``path``, or None if ``path`` is not a section."""
    cls = Config
    for part in path:
        field = next((field for field in dataclasses.fields(cls) if field.name == part), None)
        if field is None or not field.metadata.get("section"):
            return None
        cls = _section_type(cls, field)
    return cls


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, Mapping) else value for key, value in raw.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping raises ConfigError.

    PyYAML keeps the last value of a repeated key, so a second ``fit:`` section would
    silently replace the first one.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "", self.name, set())
        return super().construct_document(node)


def _check_unique_keys(node: yaml.Node, prefix: str, source: str, visited: set[int]) -> None:
    """Raise ConfigError for the first key that a mapping under ``node`` repeats."""
    if id(node) in visited:  # an alias of a node already checked, possibly recursive
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix}{index}.", source, visited)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    # Keyed by tag and text, so that 1 and "1", an int and a str, stay different keys.
    first_lines: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        # A list or mapping as a key is never a valid config key, and the schema rejects it.
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.id}>"
        if isinstance(key_node, yaml.ScalarNode):
            line = key_node.start_mark.line + 1
            if (key_node.tag, key) in first_lines:
                raise ConfigError(
                    f"{source} contains the key {prefix}{key} twice, at lines "
                    f"{first_lines[key_node.tag, key]} and {line}; keep one of them."
                )
            first_lines[key_node.tag, key] = line
        _check_unique_keys(value_node, f"{prefix}{key}.", source, visited)


def _load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` with :class:`_UniqueKeyLoader`; ``source`` names it in messages."""
    loader = _UniqueKeyLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ConfigError
        If the file is not UTF-8 text or not valid YAML, repeats a key within one mapping,
        or its top level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass the path of a YAML experiment config.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8 YAML."
        ) from None
    try:
        raw = _load_yaml(text, f"config file {path}")
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, got {type(raw).__name__}.")
    return raw


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides.

    Parameters
    ----------
    path : str or pathlib.Path or None
        YAML file with nested sections.
    overrides : sequence of str
        ``key=value`` strings with dotted keys; each value is parsed as a YAML scalar,
        so ``fit.alpha_prior=[1, 1]`` and ``data.root=null`` work.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ConfigError
        If a key is unknown or repeated, a value is invalid, an override names a whole
        section, or the file is not UTF-8 text or not valid YAML.
    """
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def resolve_paths(config: Config, base: str | Path | None = None) -> Config:
    """Return a copy whose relative paths are absolute, resolved against ``base`` (default: the cwd)."""
    base = Path.cwd() if base is None else Path(base)
    raw = config.to_dict()
    for section, key in (("data", "root"), ("backbone", "weights"), ("cache", "dir")):
        value = raw[section][key]
        if value is not None:
            raw[section][key] = str((base / Path(value).expanduser()).resolve())
    return config_from_dict(raw)


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML, every key included, so the file alone reproduces a run."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
