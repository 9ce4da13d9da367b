"""Finding, reading, converting and fingerprinting DINOv2 weights.

:func:`locate_weights` looks for a checkpoint in this order and stops at the first hit:

1. the file the caller passes: ``weights=PATH`` in Python, the config key
   ``backbone.weights``, or ``--weights PATH`` of ``dinodpmm embed``. A path that does
   not exist is an error, never a reason to look elsewhere;
2. the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<arch>_pretrain.pth``, where
   ``torch.hub.load`` and ``torch.hub.load_state_dict_from_url`` store Meta's files;
3. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) for the timm
   model id, for example ``timm/vit_small_patch14_dinov2.lvd142m``, read offline;
4. a download of Meta's checkpoint into the torch hub cache, unless disabled.

When every step fails, :class:`WeightsNotFoundError` lists each place and how to supply a
file. Nothing here ever falls back to random weights.

Two file formats load, both through :func:`read_state_dict`:

- Meta's original checkpoints (``dinov2_vits14_pretrain.pth``), with keys such as
  ``blocks.0.attn.qkv.weight``, ``blocks.0.ls1.gamma``, ``mask_token``, ``pos_embed`` for
  a 37x37 grid plus the class token (518 px), ``register_tokens`` in the ``_reg4``
  variants and SwiGLU ``mlp.w12`` / ``mlp.w3`` in ViT-g. They are read with
  ``torch.load(..., weights_only=True)``.
- timm or Hugging Face ``model.safetensors`` files with timm key names.

:func:`load_weights_into` converts either format with timm's own
``checkpoint_filter_fn`` and rejects missing or unexpected keys.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

logger = logging.getLogger(__name__)

META_URL_TEMPLATE = "https://dl.fbaipublicfiles.com/dinov2/{meta_arch}/{filename}"
HF_WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_HASH_CHUNK_BYTES = 1 << 20
_KEYS_SHOWN = 5
_BELONGS_HINT = (
    "Check that the file belongs to this backbone: same size (s, b, l, g) and a _reg4 "
    "file for a *_reg backbone."
)


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint for a backbone in any of the places :func:`locate_weights` checks."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture."""


@dataclass(frozen=True)
class CheckpointSpec:
    """Published locations of the pretrained weights of one DINOv2 architecture.

    Attributes
    ----------
    timm_arch : str
        timm model name, for example ``"vit_small_patch14_dinov2"``.
    meta_arch : str
        Meta's architecture folder, for example ``"dinov2_vits14"``.
    meta_filename : str
        Meta's checkpoint file name, for example ``"dinov2_vits14_pretrain.pth"``.
    hf_tag : str
        timm pretrained tag; the Hugging Face repository is ``timm/<timm_arch>.<hf_tag>``.
    """

    timm_arch: str
    meta_arch: str
    meta_filename: str
    hf_tag: str = "lvd142m"

    @property
    def meta_url(self) -> str:
        """Download URL of Meta's checkpoint."""
        return META_URL_TEMPLATE.format(meta_arch=self.meta_arch, filename=self.meta_filename)

    @property
    def hf_repo_id(self) -> str:
        """Hugging Face repository of the timm conversion."""
        return f"timm/{self.timm_arch}.{self.hf_tag}"


@dataclass(frozen=True)
class WeightsLocation:
    """A checkpoint file and the step of the search that found it.

    Attributes
    ----------
    path : pathlib.Path
        The checkpoint file.
    origin : str
        ``"file"``, ``"torch-hub-cache"``, ``"hf-hub-cache"`` or ``"download"``.
    """

    path: Path
    origin: str


def locate_weights(
    name: str,
    spec: CheckpointSpec,
    weights: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = True,
) -> WeightsLocation:
    """Find the checkpoint file for a backbone; the search order is in the module docstring.

    Parameters
    ----------
    name : str
        Backbone registry name, used in messages.
    spec : CheckpointSpec
        Where the weights of this architecture are published.
    weights : path-like, optional
        A checkpoint file chosen by the caller. When given, no other place is searched.
    allow_download : bool
        Whether to download Meta's checkpoint when no cache contains it.

    Raises
    ------
    WeightsNotFoundError
        If ``weights`` does not exist, or no searched location contains the checkpoint. The message
        lists every place searched and how to supply a file.
    """
    if weights is not None:
        return _user_file(name, Path(weights).expanduser())

    attempts: list[str] = []
    for finder in (_find_in_torch_hub_cache, _find_in_hf_hub_cache):
        location, attempt = finder(spec)
        if location is not None:
            logger.info("Using %s weights from %s", name, location.path)
            return location
        attempts.append(attempt)

    if allow_download:
        location, attempt = _try_download(spec)
        if location is not None:
            return location
        attempts.append(attempt)
    else:
        attempts.append(f"download from {spec.meta_url}: disabled (allow_download=False)")
    raise WeightsNotFoundError(_not_found_message(name, spec, attempts))


def torch_hub_checkpoint_path(spec: CheckpointSpec) -> Path:
    """Return where torch hub stores Meta's checkpoint; honours ``TORCH_HOME``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.meta_filename


def hf_hub_cache_dir() -> Path:
    """Return the Hugging Face hub cache folder, read from the environment at call time.

    ``huggingface_hub`` reads ``HF_HUB_CACHE`` and ``HF_HOME`` once at import, so changes
    made later in the same process would be missed without this.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def download_checkpoint(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` with a progress bar.

    torch hub's downloader writes to a temporary file and moves it into place, so a failed
    download leaves no partial checkpoint behind.
    """
    logger.info("Downloading %s to %s", url, destination)
    torch.hub.download_url_to_file(url, os.fspath(destination), progress=True)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict on the CPU.

    ``.safetensors`` files are read with safetensors; any other suffix with
    ``torch.load(weights_only=True)``, which loads tensors without running pickled code.
    A top-level ``"model"`` or ``"state_dict"`` entry is unwrapped.

    Raises
    ------
    CheckpointError
        If the file cannot be read or does not contain a mapping of names to tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            loaded = load_safetensors_file(os.fspath(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        # The weights-only unpickler raises KeyError or ValueError on arbitrary bytes, and
        # its own message suggests weights_only=False, which must not be followed here.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint '{path}': not a readable PyTorch or safetensors checkpoint "
            f"({reason}). Pass a DINOv2 .pth file from Meta or a timm .safetensors file."
        ) from err
    return _unwrap_state_dict(loaded, path)


def load_weights_into(
    model: VisionTransformer, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Convert a Meta or timm state dict with timm's filter and load it strictly.

    Parameters
    ----------
    model : timm.models.vision_transformer.VisionTransformer
        DINOv2 model created by timm; its parameters are overwritten in place.
    state_dict : mapping of str to torch.Tensor
        Meta-format or timm-format weights; left unchanged.
    source : str
        File name or description for error messages.

    Raises
    ------
    CheckpointError
        If keys are missing or unexpected after conversion, or a shape differs.
    """
    try:
        converted = checkpoint_filter_fn(dict(state_dict), model)
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:
        # Shape mismatches raise here even with strict=False, and timm's position
        # embedding resampling raises for a checkpoint of another variant.
        raise CheckpointError(
            f"checkpoint {source} does not fit timm '{_model_name(model)}': "
            f"{_first_lines(str(err))} {_BELONGS_HINT}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            _key_mismatch_message(model, source, result.missing_keys, result.unexpected_keys)
        )


def file_digest(path: str | os.PathLike[str]) -> str:
    """Return the sha256 hex digest of a file's bytes.

    Results are memoised per process on (resolved path, size, modification time), because
    hashing a ViT-g checkpoint (1.1 billion float32 parameters) takes seconds.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _file_digest_cached(resolved, stat.st_size, stat.st_mtime_ns)


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return a sha256 hex digest of a state dict's names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(f"{tensor.dtype}{tuple(state_dict[key].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_digest_cached(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _user_file(name: str, path: Path) -> WeightsLocation:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file for backbone '{name}' not found: '{path}' "
            f"({'is a directory' if path.is_dir() else 'does not exist'}). Pass the path "
            "of a .pth or .safetensors checkpoint."
        )
    return WeightsLocation(path=path, origin="file")


def _find_in_torch_hub_cache(spec: CheckpointSpec) -> tuple[WeightsLocation | None, str]:
    path = torch_hub_checkpoint_path(spec)
    if path.is_file():
        return WeightsLocation(path=path, origin="torch-hub-cache"), ""
    return None, f"torch hub cache: {path} not found (the folder follows $TORCH_HOME)"


def _find_in_hf_hub_cache(spec: CheckpointSpec) -> tuple[WeightsLocation | None, str]:
    cache_dir = hf_hub_cache_dir()
    place = f"Hugging Face hub cache: {spec.hf_repo_id} in {cache_dir}"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None, f"{place} not searched (huggingface_hub is not installed)"
    for filename in HF_WEIGHT_FILENAMES:
        found = try_to_load_from_cache(spec.hf_repo_id, filename, cache_dir=cache_dir)
        # The function returns a sentinel object (not a str) for files known to be absent.
        if isinstance(found, str) and os.path.isfile(found):
            return WeightsLocation(path=Path(found), origin="hf-hub-cache"), ""
    files = " or ".join(HF_WEIGHT_FILENAMES)
    return None, f"{place}: no {files} (the folder follows $HF_HUB_CACHE or $HF_HOME)"


def _try_download(spec: CheckpointSpec) -> tuple[WeightsLocation | None, str]:
    destination = torch_hub_checkpoint_path(spec)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        download_checkpoint(spec.meta_url, destination)
    except (OSError, RuntimeError, http.client.HTTPException) as err:
        # URLError, HTTPError, timeouts and SSL errors are all OSError subclasses.
        logger.warning("Download of %s failed: %s", spec.meta_url, err)
        return None, f"download from {spec.meta_url}: failed ({type(err).__name__}: {err})"
    return WeightsLocation(path=destination, origin="download"), ""


def _not_found_message(name: str, spec: CheckpointSpec, attempts: list[str]) -> str:
    """Return the message: what to do on its first line, then one line per place searched."""
    places = "\n".join(f"  - {attempt}" for attempt in attempts)
    return (
        f"no pretrained weights found for backbone '{name}'. Download {spec.meta_url} (or "
        f"{spec.hf_repo_id} from the Hugging Face hub) on a machine with internet access, "
        f"then copy it to {torch_hub_checkpoint_path(spec)}, where every command finds it, "
        "or pass its path: backbone.weights=PATH in a config file or as a key=value override "
        "(dinodpmm run and fit; score and evaluate read the run's config.yaml), --weights PATH "
        f"(dinodpmm embed), or load_backbone('{name}', weights=PATH) in Python. "
        f"Searched:\n{places}"
    )


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper_key in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper_key), Mapping):
                loaded = loaded[wrapper_key]
                break
    valid = isinstance(loaded, Mapping) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    )
    if not valid or not loaded:
        raise CheckpointError(
            f"checkpoint '{path}' does not contain a state dict (a non-empty mapping of "
            f"parameter names to tensors), got {type(loaded).__name__}. Pass the backbone "
            "weights file itself, not a training checkpoint."
        )
    return dict(loaded)


def _key_mismatch_message(
    model: VisionTransformer, source: str, missing: list[str], unexpected: list[str]
) -> str:
    return (
        f"checkpoint {source} does not match timm '{_model_name(model)}' after "
        f"conversion: {len(missing)} missing keys {missing[:_KEYS_SHOWN]}, "
        f"{len(unexpected)} unexpected keys {unexpected[:_KEYS_SHOWN]}. {_BELONGS_HINT}"
    )


def _first_lines(message: str) -> str:
    """Shorten torch's load error, which has one line per mismatched tensor."""
    lines = message.splitlines()
    if len(lines) <= _KEYS_SHOWN + 1:
        return message
    return "\n".join([*lines[: _KEYS_SHOWN + 1], f"\t... and {len(lines) - _KEYS_SHOWN - 1} more"])


def _model_name(model: VisionTransformer) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)
