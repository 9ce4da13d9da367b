"""DINOv2 backbones (timm implementations) and the backbone registry.

``load_backbone(name)`` returns a ready :class:`~dinodpmm.features.base.Backbone`:

========================  =================================  =====
name                      timm architecture                  dim
========================  =================================  =====
``dinov2_vits14``         ``vit_small_patch14_dinov2``       384
``dinov2_vitb14``         ``vit_base_patch14_dinov2``        768
``dinov2_vitl14``         ``vit_large_patch14_dinov2``       1024
``dinov2_vitg14``         ``vit_giant_patch14_dinov2``       1536
``dinov2_vits14_reg``     ``vit_small_patch14_reg4_dinov2``  384
``dinov2_vitb14_reg``     ``vit_base_patch14_reg4_dinov2``   768
``dinov2_vitl14_reg``     ``vit_large_patch14_reg4_dinov2``  1024
``dinov2_vitg14_reg``     ``vit_giant_patch14_reg4_dinov2``  1536
``offline``               none (:mod:`dinodpmm.features.offline`)
========================  =================================  =====

The ``_reg`` variants carry four register tokens. Models are built with
``dynamic_img_size=True``, so any input whose sides are multiples of 14 works, and the
patch tokens of the last block after the final LayerNorm are the embeddings.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from .base import Backbone
from .checkpoints import (
    CheckpointSpec,
    file_digest,
    load_weights_into,
    locate_weights,
    read_state_dict,
    state_dict_digest,
)
from .preprocess import (
    CROP_RULE,
    DEFAULT_RESOLUTION,
    INTENSITY_RULES,
    RESIZE_RULE,
    IntensityRule,
    grid_shape,
    preprocess,
)

logger = logging.getLogger(__name__)

PATCH_SIZE = 14
RANDOM_WEIGHTS = "random"
OFFLINE_NAME = "offline"
OFFLINE_TEXTURE_NAME = "offline-texture"
# The weight-free backbones: baselines, not DINOv2.
OFFLINE_BACKBONES = (OFFLINE_NAME, OFFLINE_TEXTURE_NAME)
POS_EMBED_INTERPOLATIONS: tuple[str, ...] = ("dinov2", "timm")
PosEmbedInterpolation = Literal["dinov2", "timm"]

# Meta's interpolate_pos_encoding adds 0.1 to the target grid before computing the
# bicubic scale factor (a guard against floor() rounding 31.999... down to 31). The
# offset also shifts the sampling positions, so it is kept to match Meta's models.
_DINOV2_INTERPOLATE_OFFSET = 0.1
# Smallest norm F.normalize divides by; only an all-zero token reaches it.
_L2_NORM_EPS = 1e-12

_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}


def _build_registry() -> dict[str, tuple[CheckpointSpec, int]]:
    registry = {}
    for letter, (size_word, dim) in _SIZES.items():
        meta_arch = f"dinov2_vit{letter}14"
        registry[meta_arch] = (
            CheckpointSpec(f"vit_{size_word}_patch14_dinov2", meta_arch, f"{meta_arch}_pretrain.pth"),
            dim,
        )
        registry[f"{meta_arch}_reg"] = (
            CheckpointSpec(
                f"vit_{size_word}_patch14_reg4_dinov2", meta_arch, f"{meta_arch}_reg4_pretrain.pth"
            ),
            dim,
        )
    return registry


DINOV2_REGISTRY: dict[str, tuple[CheckpointSpec, int]] = _build_registry()


def available_backbones() -> tuple[str, ...]:
    """Return every name :func:`load_backbone` accepts."""
    return (*DINOV2_REGISTRY, *OFFLINE_BACKBONES)


class DinoV2Backbone(Backbone):
    """Frozen DINOv2 ViT that returns last-block patch tokens after the final LayerNorm.

    Build it with :func:`load_backbone`, which finds and checks the weights. Prefix tokens
    (class and registers, ``model.num_prefix_tokens`` of them) are dropped.

    Parameters
    ----------
    name : str
        Registry name, for example ``"dinov2_vits14"``.
    model : timm.models.vision_transformer.VisionTransformer
        DINOv2 model with weights loaded, created with ``dynamic_img_size=True``.
    weights_digest : str
        sha256 of the checkpoint file or state dict; ``"random-init-..."`` for random weights.
    weights_source : str
        Where the weights came from, for example ``"file:/path/to.pth"``.
    device : str or torch.device
        Device for the forward pass; outputs always return to the CPU.
    resolution : int
        Length of the shorter image edge after resizing, in pixels.
    normalize : bool
        Whether to L2-normalise each patch token.
    intensity : {"dtype", "minmax"}
        Intensity scaling rule of :func:`~dinodpmm.features.preprocess.preprocess`.
    batch_size : int
        Images per forward pass.
    autocast : bool
        Run the forward pass under bfloat16 autocast; CUDA only.
    progress : bool or None
        Show a tqdm bar; ``None`` shows one when the images need more than one batch.
    pos_embed_interpolation : {"dinov2", "timm"}
        How position embeddings are resized to the patch grid. ``"dinov2"`` follows
        Meta's ``interpolate_pos_encoding`` (bicubic, scale factor ``(grid + 0.1) / 37``,
        no antialiasing), so embeddings match the original torch hub models. ``"timm"``
        uses timm's ``forward_features`` (bicubic to the exact size, antialiased). Both
        agree on a 37x37 grid (518 px).
    """

    recommended_score = "cosine"

    def __init__(
        self,
        name: str,
        model: VisionTransformer,
        *,
        weights_digest: str,
        weights_source: str,
        device: str | torch.device = "cpu",
        resolution: int = DEFAULT_RESOLUTION,
        normalize: bool = True,
        intensity: IntensityRule = "dtype",
        batch_size: int = 8,
        autocast: bool = False,
        progress: bool | None = None,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
    ) -> None:
        self.device = _check_device(device)
        _check_options(resolution, intensity, batch_size, autocast, self.device, pos_embed_interpolation)
        self.name = name
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = model.embed_dim
        self.patch_size = PATCH_SIZE
        self.weights_digest = weights_digest
        self.weights_source = weights_source
        self.resolution = resolution
        self.normalize = bool(normalize)
        self.intensity = intensity
        self.batch_size = batch_size
        self.autocast = bool(autocast)
        self.progress = progress
        self.pos_embed_interpolation = pos_embed_interpolation

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Return ``(grid_h, grid_w)`` for an image of ``(width, height)`` pixels."""
        return grid_shape(image_size, self.resolution, self.patch_size)

    @property
    def settings(self) -> dict[str, Any]:
        """Every preprocessing and model setting that changes the embeddings."""
        return {
            "architecture": self.model.pretrained_cfg.get("architecture"),
            "resolution": self.resolution,
            "resize": RESIZE_RULE,
            "crop": CROP_RULE,
            "intensity": self.intensity,
            "normalize": self.normalize,
            "autocast": "bfloat16" if self.autocast else None,
            "pos_embed_interpolation": self.pos_embed_interpolation,
            "tokens": "last block patch tokens after final LayerNorm",
        }

    def describe(self) -> dict[str, Any]:
        """Return the metadata that outputs store, including where the weights came from."""
        description = super().describe()
        architecture = self.settings["architecture"]
        description["weights_source"] = self.weights_source
        description["description"] = f"DINOv2 {self.name} (timm {architecture}), weights {self.weights_source}"
        return description

    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed images that share one patch grid after preprocessing.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images of any supported mode (``L``, ``I;16``, ``RGB``, ``RGBA``, ...).

        Returns
        -------
        tokens : torch.Tensor of shape (num_images, grid_h * grid_w, dim)
            Patch embeddings in row-major patch order, float32, on the CPU; unit L2 norm
            when ``normalize`` is set.
        grid : tuple of int
            ``(grid_h, grid_w)``.

        Raises
        ------
        ValueError
            If ``images`` is empty or the images do not share one grid shape.
        """
        images = list(images)
        grid = self._common_grid(images)
        show_progress = len(images) > self.batch_size if self.progress is None else self.progress
        chunks = []
        with tqdm(total=len(images), unit="image", desc=self.name, disable=not show_progress) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                chunks.append(self._embed_batch(batch))
                bar.update(len(batch))
        # Concatenating outside inference mode yields an ordinary tensor that autograd
        # code (for example Pyro's SVI) may save for backward.
        return torch.cat(chunks), grid

    def _common_grid(self, images: list[Image.Image]) -> tuple[int, int]:
        if not images:
            raise ValueError("images must contain at least one image, got an empty sequence.")
        grids = [self.grid_shape(image.size) for image in images]
        if any(grid != grids[0] for grid in grids):
            distinct = sorted(set(grids))
            raise ValueError(
                f"images must share one patch grid after preprocessing, got grids {distinct} "
                f"at resolution {self.resolution}; group images by grid_shape(image.size) and "
                "call embed once per group."
            )
        return grids[0]

    def _embed_batch(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack(
            [preprocess(image, self.resolution, self.patch_size, self.intensity) for image in images]
        )  # B 3 H W
        with torch.inference_mode(), self._autocast_context():
            tokens = self._patch_tokens(pixels.to(self.device))  # B P D
            tokens = tokens.float()
            if self.normalize:
                tokens = F.normalize(tokens, dim=-1, eps=_L2_NORM_EPS)
            return tokens.cpu()

    def _autocast_context(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_interpolation == "timm":
            features = self.model.forward_features(pixels)
        else:
            features = forward_features_dinov2(self.model, pixels)
        return features[:, self.model.num_prefix_tokens :]


def forward_features_dinov2(model: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """Run timm's DINOv2 blocks with position embeddings resized as Meta's code does.

    Mirrors ``VisionTransformer.forward_features`` (timm 1.0) with the position
    embedding step replaced by :func:`interpolate_pos_embed_dinov2`.

    Parameters
    ----------
    model : timm.models.vision_transformer.VisionTransformer
        DINOv2 model created with ``dynamic_img_size=True``.
    pixels : torch.Tensor of shape (num_images, 3, height, width)
        Normalised images; ``height`` and ``width`` are multiples of the patch size.

    Returns
    -------
    torch.Tensor of shape (num_images, num_prefix_tokens + grid_h * grid_w, dim)
        All tokens after the final LayerNorm, prefix tokens first.
    """
    patches = model.patch_embed(pixels)  # B gh gw D
    num_images, grid_h, grid_w, dim = patches.shape
    patches = patches.reshape(num_images, grid_h * grid_w, dim)
    pos_embed_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos_embed = interpolate_pos_embed_dinov2(model.pos_embed, (grid_h, grid_w), pos_embed_prefix)
    prefix = [
        token.expand(num_images, -1, -1)
        for token in (model.cls_token, model.reg_token)
        if token is not None
    ]
    if model.no_embed_class:
        # Register variants: the class token's position embedding is folded into
        # cls_token at conversion, and registers get no position embedding.
        tokens = torch.cat([*prefix, patches + pos_embed], dim=1)
    else:
        tokens = torch.cat([*prefix, patches], dim=1) + pos_embed
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    return model.norm(model.blocks(tokens))


def interpolate_pos_embed_dinov2(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resize a square grid of position embeddings as Meta's DINOv2 code does.

    Bicubic without antialiasing and with the scale factor ``(grid + 0.1) / source``, as in
    ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2, defaults
    ``interpolate_offset=0.1``, ``interpolate_antialias=False``).

    Parameters
    ----------
    pos_embed : torch.Tensor of shape (1, num_prefix_tokens + source_h * source_w, dim)
        Position embeddings over a square source grid (37x37 for DINOv2).
    grid : tuple of int
        Target ``(grid_h, grid_w)``.
    num_prefix_tokens : int
        Leading entries that belong to prefix tokens and are passed through unchanged.

    Returns
    -------
    torch.Tensor of shape (1, num_prefix_tokens + grid_h * grid_w, dim)
    """
    prefix, patch_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    source = math.isqrt(patch_pos.shape[1])
    assert source * source == patch_pos.shape[1], "DINOv2 position embeddings form a square grid"
    if tuple(grid) == (source, source):
        return pos_embed
    dim = patch_pos.shape[-1]
    scale = tuple((side + _DINOV2_INTERPOLATE_OFFSET) / source for side in grid)
    resized = F.interpolate(
        patch_pos.float().reshape(1, source, source, dim).permute(0, 3, 1, 2),
        scale_factor=scale,
        mode="bicubic",
        antialias=False,
    )  # 1 D gh gw
    assert tuple(resized.shape[-2:]) == tuple(grid), "offset keeps floor() at the target size"
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    resolution: int = DEFAULT_RESOLUTION,
    normalize: bool = True,
    intensity: IntensityRule = "dtype",
    batch_size: int = 8,
    autocast: bool = False,
    progress: bool | None = None,
    pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
    allow_download: bool = True,
    random_seed: int = 0,
) -> Backbone:
    """Create a backbone by registry name, with pretrained weights for DINOv2.

    Parameters
    ----------
    name : str
        One of :func:`available_backbones`.
    weights : path-like, mapping or "random", optional
        A checkpoint file (Meta ``.pth`` or timm ``.safetensors``), a state dict, or
        ``"random"`` for seeded random initialisation. ``"random"`` is meant for tests:
        it logs a warning and marks ``weights_digest`` as ``random-init``. ``None`` searches the torch hub and
        Hugging Face caches, then downloads; see :mod:`dinodpmm.features.checkpoints`.
    device : str or torch.device
        Device for the forward pass, ``"cpu"`` or ``"cuda"``.
    resolution : int
        Length of the shorter image edge after resizing, in pixels.
    normalize : bool
        Whether to L2-normalise each patch token.
    intensity : {"dtype", "minmax"}
        Intensity scaling rule; see :mod:`dinodpmm.features.preprocess`.
    batch_size : int
        Images per forward pass.
    autocast : bool
        bfloat16 autocast for the forward pass; requires a CUDA device.
    progress : bool or None
        Show a progress bar; ``None`` shows one when more than one batch is needed.
    pos_embed_interpolation : {"dinov2", "timm"}
        Position embedding resizing; see :class:`DinoV2Backbone`.
    allow_download : bool
        Whether to download Meta's checkpoint when no cache contains it.
    random_seed : int
        Seed for ``weights="random"``; ignored otherwise.

    Returns
    -------
    Backbone
        A :class:`DinoV2Backbone`, for ``name="offline"`` an
        :class:`~dinodpmm.features.offline.OfflineBackbone`, or for
        ``name="offline-texture"`` an
        :class:`~dinodpmm.features.offline_texture.OfflineTextureBackbone`. The two
        offline backbones take only ``device`` and ``resolution`` from these options.

    Raises
    ------
    ValueError
        If ``name`` is unknown or an option is invalid.
    dinodpmm.features.checkpoints.WeightsNotFoundError
        If no weights are found.
    dinodpmm.features.checkpoints.CheckpointError
        If the weights do not fit the architecture.
    """
    if name in OFFLINE_BACKBONES:
        return _load_offline(name, weights, device, resolution, intensity)
    if name not in DINOV2_REGISTRY:
        raise ValueError(
            f"name must be one of {', '.join(available_backbones())}; got {name!r}."
        )
    device = _check_device(device)
    _check_options(resolution, intensity, batch_size, autocast, device, pos_embed_interpolation)
    spec, _ = DINOV2_REGISTRY[name]
    model, digest, source = _build_model(name, spec, weights, allow_download, random_seed)
    return DinoV2Backbone(
        name,
        model,
        weights_digest=digest,
        weights_source=source,
        device=device,
        resolution=resolution,
        normalize=normalize,
        intensity=intensity,
        batch_size=batch_size,
        autocast=autocast,
        progress=progress,
        pos_embed_interpolation=pos_embed_interpolation,
    )


def create_dinov2_model(spec: CheckpointSpec, *, initialize: bool = True) -> VisionTransformer:
    """Create the timm model of ``spec`` without a classification head.

    ``initialize=False`` skips timm's weight initialisation (``weight_init="skip"``). Use
    it when a strictly checked checkpoint overwrites every parameter next, because the
    initialisation takes about a second for ViT-S on a CPU and far longer for ViT-g.
    """
    return timm.create_model(
        spec.timm_arch,
        pretrained=False,
        dynamic_img_size=True,
        num_classes=0,
        weight_init="" if initialize else "skip",
    )


def _build_model(
    name: str,
    spec: CheckpointSpec,
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None,
    allow_download: bool,
    random_seed: int,
) -> tuple[VisionTransformer, str, str]:
    """Return the model with weights loaded, the weights digest and the weights source."""
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        return _random_model(name, spec, random_seed)
    model = create_dinov2_model(spec, initialize=False)
    if isinstance(weights, Mapping):
        load_weights_into(model, weights, source="(state dict argument)")
        return model, state_dict_digest(weights), "state-dict"
    location = locate_weights(name, spec, weights, allow_download=allow_download)
    load_weights_into(model, read_state_dict(location.path), source=f"'{location.path}'")
    logger.info("Loaded %s weights from %s (%s)", name, location.path, location.origin)
    return model, file_digest(location.path), f"{location.origin}:{location.path}"


def _random_model(name: str, spec: CheckpointSpec, seed: int) -> tuple[VisionTransformer, str, str]:
    logger.warning(
        "Backbone %s uses RANDOM weights (seed %d); embeddings carry no pretrained meaning. "
        "Use weights='random' for tests only.",
        name,
        seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_dinov2_model(spec)
    digest = f"random-init-seed{seed}-{state_dict_digest(model.state_dict())}"
    return model, digest, f"random-init:seed={seed}"


def _load_offline(
    name: str, weights: object, device: str | torch.device, resolution: int, intensity: str
) -> Backbone:
    if weights is not None:
        raise ValueError(
            f"weights must be None for the offline backbone {name!r}, which has no weights; "
            f"got {weights!r}."
        )
    # NOTE: the offline backbone scales intensities by its own rule, so `intensity` and
    # the other DINOv2 options do not reach it. `intensity` is still checked for typos.
    _check_intensity(intensity)
    if name == OFFLINE_TEXTURE_NAME:
        from .offline_texture import OfflineTextureBackbone  # optional module, imported on use

        return OfflineTextureBackbone(resolution=resolution, device=_check_device(device))
    from .offline import OfflineBackbone  # optional module, imported on use

    return OfflineBackbone(resolution=resolution, device=_check_device(device))


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device is {str(device)!r} but CUDA is not available in this PyTorch build or "
            "machine; use device='cpu'."
        )
    return device


def _check_options(
    resolution: int,
    intensity: str,
    batch_size: int,
    autocast: bool,
    device: torch.device,
    pos_embed_interpolation: str,
) -> None:
    grid_shape((PATCH_SIZE, PATCH_SIZE), resolution, PATCH_SIZE)  # validates resolution
    _check_intensity(intensity)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if autocast and device.type != "cuda":
        raise ValueError(
            f"autocast=True (bfloat16) requires a CUDA device, got device={str(device)!r}; "
            "use autocast=False on the CPU."
        )
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(
            f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, got "
            f"{pos_embed_interpolation!r}."
        )


def _check_intensity(intensity: str) -> None:
    if intensity not in INTENSITY_RULES:
        raise ValueError(f"intensity must be one of {INTENSITY_RULES}, got {intensity!r}.")
