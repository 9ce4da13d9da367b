"""Tests for the DINOv2 registry, weight loading (Meta, timm, caches) and patch embeddings.

Pretrained weights are unavailable offline, so every test uses seeded random weights,
written to disk in Meta's and timm's formats and read back through the real loaders.
Forward passes run at 112 or 140 px (8x8 to 10x10 patches) to stay fast on a CPU.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from dinodpmm.features import backbones, checkpoints
from dinodpmm.features.backbones import (
    DINOV2_REGISTRY,
    DinoV2Backbone,
    available_backbones,
    create_dinov2_model,
    forward_features_dinov2,
    interpolate_pos_embed_dinov2,
    load_backbone,
)
from dinodpmm.features.preprocess import preprocess
from dinodpmm.features.checkpoints import (
    CheckpointError,
    WeightsNotFoundError,
    load_weights_into,
    read_state_dict,
)

RESOLUTION = 112
# Loaded and in-memory models run the same float32 operations on the same weights, so
# outputs agree to float32 rounding. The register conversion adds and subtracts the class
# position embedding, which costs a few ulps, and torch.testing's float32 defaults
# (rtol 1.3e-6, atol 1e-5) cover that.
FLOAT32_RTOL = 1.3e-6
FLOAT32_ATOL = 1e-5


def _seeded_model(name: str, seed: int = 0) -> torch.nn.Module:
    spec, _ = DINOV2_REGISTRY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_dinov2_model(spec)
        # timm initialises LayerScale to 1e-5, which would make every block nearly the
        # identity; larger values let a wrong weight change the output visibly.
        for key, value in model.state_dict().items():
            if key.endswith("gamma"):
                value.copy_(torch.rand_like(value))
    return model.eval()


def _to_meta_format(state_dict: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Invert timm's DINOv2 conversion: timm key names and layout to Meta's checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    meta = {}
    for key, value in state_dict.items():
        if _is_swiglu(state_dict, key):
            key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        meta[key] = value.clone()
    dim = meta["cls_token"].shape[-1]
    meta["mask_token"] = torch.randn(1, dim, generator=generator)
    if "reg_token" in meta:
        # timm folds the class token's position embedding into cls_token and keeps
        # only patch positions; Meta stores the 1 + 37 * 37 entries and plain tokens.
        class_pos = torch.randn(1, 1, dim, generator=generator)
        meta["register_tokens"] = meta.pop("reg_token")
        meta["cls_token"] = meta["cls_token"] - class_pos
        meta["pos_embed"] = torch.cat([class_pos, meta["pos_embed"]], dim=1)
    return meta


def _is_swiglu(state_dict: dict[str, torch.Tensor], key: str) -> bool:
    """Tell SwiGLUPacked MLPs (fc1 packs both gates: twice fc2's input width) from plain ones."""
    if ".mlp." not in key:
        return False
    block = key.split(".mlp.")[0]
    fc1_out = state_dict[f"{block}.mlp.fc1.weight"].shape[0]
    fc2_in = state_dict[f"{block}.mlp.fc2.weight"].shape[1]
    return fc1_out == 2 * fc2_in


def _images(count: int, size: tuple[int, int] = (120, 100), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(count)
    ]


def _reference(name: str, model: torch.nn.Module, **options) -> DinoV2Backbone:
    return DinoV2Backbone(
        name, model, weights_digest="reference", weights_source="memory", resolution=RESOLUTION, **options
    )


@pytest.fixture(scope="module")
def small_model():
    return _seeded_model("dinov2_vits14")


@pytest.fixture(scope="module")
def small_reg_model():
    return _seeded_model("dinov2_vits14_reg")


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory, small_model):
    path = tmp_path_factory.mktemp("meta") / "dinov2_vits14_pretrain.pth"
    torch.save(_to_meta_format(small_model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def reference_tokens(small_model):
    tokens, grid = _reference("dinov2_vits14", small_model).embed(_images(3))
    return tokens, grid


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point both hub caches at empty folders and make any download fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []

    def failing_download(url, destination):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(checkpoints, "download_checkpoint", failing_download)
    return calls


def test_registry_names():
    names = available_backbones()
    assert len(names) == 10
    assert "offline" in names
    assert "offline-texture" in names
    assert {"dinov2_vits14_reg", "dinov2_vitg14", "dinov2_vitg14_reg"} <= set(names)


@pytest.mark.parametrize(
    ("name", "arch", "filename"),
    [
        ("dinov2_vits14", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
        ("dinov2_vitg14", "vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth"),
        ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4_pretrain.pth"),
    ],
    ids=["small", "giant", "base-reg"],
)
def test_registry_specs(name, arch, filename):
    spec, _ = DINOV2_REGISTRY[name]
    assert spec.timm_arch == arch
    assert spec.meta_url.endswith(f"/{spec.meta_arch}/{filename}")
    assert spec.hf_repo_id == f"timm/{arch}.lvd142m"


def test_registry_dims_match_timm():
    for name, (spec, dim) in DINOV2_REGISTRY.items():
        assert timm.models.get_pretrained_cfg(f"{spec.timm_arch}.lvd142m") is not None, name
        assert dim == {"s": 384, "b": 768, "l": 1024, "g": 1536}[name[len("dinov2_vit")]], name


def test_unknown_name_rejected():
    with pytest.raises(ValueError, match="name must be one of .*dinov2_vits14_reg.*got 'dinov3'"):
        load_backbone("dinov3")


def test_meta_file_loads(meta_file, reference_tokens):
    backbone = load_backbone("dinov2_vits14", weights=meta_file, resolution=RESOLUTION)
    tokens, grid = backbone.embed(_images(3))
    torch.testing.assert_close(tokens, reference_tokens[0], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    assert grid == reference_tokens[1]


def test_meta_file_digest(meta_file):
    backbone = load_backbone("dinov2_vits14", weights=meta_file, resolution=RESOLUTION)
    assert backbone.weights_digest == hashlib.sha256(meta_file.read_bytes()).hexdigest()
    assert backbone.describe()["weights_source"] == f"file:{meta_file}"


def test_safetensors_loads(tmp_path, small_model, reference_tokens):
    path = tmp_path / "model.safetensors"
    save_file(small_model.state_dict(), path)
    backbone = load_backbone("dinov2_vits14", weights=path, resolution=RESOLUTION)
    tokens, _ = backbone.embed(_images(3))
    torch.testing.assert_close(tokens, reference_tokens[0], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_state_dict_argument_loads(small_model, reference_tokens):
    backbone = load_backbone("dinov2_vits14", weights=small_model.state_dict(), resolution=RESOLUTION)
    tokens, _ = backbone.embed(_images(3))
    torch.testing.assert_close(tokens, reference_tokens[0], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    assert backbone.weights_digest == checkpoints.state_dict_digest(small_model.state_dict())


def test_register_meta_file_loads(tmp_path, small_reg_model):
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    meta = _to_meta_format(small_reg_model.state_dict())
    assert "register_tokens" in meta
    torch.save(meta, path)
    backbone = load_backbone("dinov2_vits14_reg", weights=path, resolution=RESOLUTION)
    tokens, grid = backbone.embed(_images(2))
    expected, _ = _reference("dinov2_vits14_reg", small_reg_model).embed(_images(2))
    assert backbone.model.num_prefix_tokens == 5
    assert tokens.shape == (2, grid[0] * grid[1], 384)
    torch.testing.assert_close(tokens, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_swiglu_meta_keys_convert():
    # A one-block ViT-g layout (SwiGLU MLP) keeps the test small; the key names and the
    # packed w12 layout are those of the full dinov2_vitg14 checkpoint.
    kwargs = dict(depth=1, embed_dim=48, num_heads=2, dynamic_img_size=True, num_classes=0)
    torch.manual_seed(0)
    source = timm.create_model("vit_giant_patch14_dinov2", **kwargs)
    meta = _to_meta_format(source.state_dict())
    assert "blocks.0.mlp.w12.weight" in meta
    assert "blocks.0.mlp.w3.weight" in meta
    target = timm.create_model("vit_giant_patch14_dinov2", **kwargs)
    load_weights_into(target, meta, source="meta giant")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_torch_hub_cache_found(empty_caches, tmp_path, meta_file, reference_tokens):
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(meta_file.read_bytes())
    backbone = load_backbone("dinov2_vits14", resolution=RESOLUTION)
    tokens, _ = backbone.embed(_images(3))
    assert backbone.describe()["weights_source"] == f"torch-hub-cache:{cached}"
    assert empty_caches == []
    torch.testing.assert_close(tokens, reference_tokens[0], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_hf_hub_cache_found(empty_caches, tmp_path, small_model):
    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(small_model.state_dict(), snapshot / "model.safetensors")
    backbone = load_backbone("dinov2_vits14", resolution=RESOLUTION)
    assert backbone.describe()["weights_source"] == f"hf-hub-cache:{snapshot / 'model.safetensors'}"
    assert empty_caches == []


def test_download_fills_torch_cache(empty_caches, monkeypatch, tmp_path, meta_file):
    def fake_download(url, destination):
        destination.write_bytes(meta_file.read_bytes())

    monkeypatch.setattr(checkpoints, "download_checkpoint", fake_download)
    backbone = load_backbone("dinov2_vits14", resolution=RESOLUTION)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert backbone.describe()["weights_source"] == f"download:{cached}"
    assert cached.read_bytes() == meta_file.read_bytes()


def test_no_weights_error(empty_caches, tmp_path):
    with pytest.raises(WeightsNotFoundError) as caught:
        load_backbone("dinov2_vits14")
    message = str(caught.value)
    assert "'dinov2_vits14'" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth") in message
    assert "timm/vit_small_patch14_dinov2.lvd142m" in message
    assert str(tmp_path / "hf") in message
    assert "network is unreachable" in message
    assert empty_caches == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"]


def test_no_weights_error_names_options(empty_caches, tmp_path):
    with pytest.raises(WeightsNotFoundError) as caught:
        load_backbone("dinov2_vits14")
    first_line = str(caught.value).splitlines()[0]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert f"then copy it to {cached}, where every command finds it" in first_line
    assert "backbone.weights=PATH in a config file or as a key=value override (dinodpmm run and fit;" in first_line
    assert "score and evaluate read the run's config.yaml)" in first_line
    assert "--weights PATH (dinodpmm embed)" in first_line
    assert "load_backbone('dinov2_vits14', weights=PATH) in Python" in first_line
    assert first_line.endswith("Searched:")


def test_no_download_when_disabled(empty_caches):
    with pytest.raises(WeightsNotFoundError, match="disabled"):
        load_backbone("dinov2_vits14", allow_download=False)
    assert empty_caches == []


def test_missing_file_not_replaced(empty_caches, tmp_path, meta_file):
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(meta_file.read_bytes())
    with pytest.raises(WeightsNotFoundError, match="typo.pth.*does not exist"):
        load_backbone("dinov2_vits14", weights=tmp_path / "typo.pth")


def test_wrong_variant_rejected(meta_file):
    with pytest.raises(CheckpointError, match="does not fit timm 'vit_small_patch14_reg4_dinov2'"):
        load_backbone("dinov2_vits14_reg", weights=meta_file)


def test_missing_key_listed(tmp_path, small_model):
    state_dict = _to_meta_format(small_model.state_dict())
    del state_dict["blocks.3.ls1.gamma"]
    path = tmp_path / "incomplete.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \['blocks.3.ls1.gamma'\]"):
        load_backbone("dinov2_vits14", weights=path)


def test_unexpected_key_listed(small_model):
    state_dict = dict(small_model.state_dict(), **{"head.weight": torch.zeros(10, 384)})
    model = create_dinov2_model(DINOV2_REGISTRY["dinov2_vits14"][0], initialize=False)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['head.weight'\]"):
        load_weights_into(model, state_dict, source="extra head")


def test_wrong_size_rejected(small_model):
    # A narrower model of the same layout replaces a larger backbone, because the ViT-S
    # tensors have the wrong shapes for both and creating a ViT-B takes seconds.
    narrow = timm.create_model("vit_small_patch14_dinov2", embed_dim=48, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(CheckpointError, match="(?s)does not fit .*size mismatch.*and 15 more"):
        load_weights_into(narrow, small_model.state_dict(), source="'vits14'")


def test_corrupt_file_rejected(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*broken.pth"):
        read_state_dict(path)


def test_non_state_dict_rejected(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        read_state_dict(path)


def test_random_weights_marked(caplog):
    with caplog.at_level(logging.WARNING, logger=backbones.__name__):
        backbone = load_backbone("dinov2_vits14", weights="random", resolution=RESOLUTION)
    assert "RANDOM weights" in caplog.text
    assert backbone.weights_digest.startswith("random-init")
    assert "random-init" in backbone.describe()["description"]


def test_random_weights_seeded():
    first = load_backbone("dinov2_vits14", weights="random", random_seed=3)
    second = load_backbone("dinov2_vits14", weights="random", random_seed=3)
    other = load_backbone("dinov2_vits14", weights="random", random_seed=4)
    assert first.weights_digest == second.weights_digest
    assert first.weights_digest != other.weights_digest


def test_embed_shape_and_norm(reference_tokens):
    tokens, grid = reference_tokens
    assert grid == (8, 9)  # 120 x 100 -> 134 x 112 -> 126 x 112
    assert tokens.shape == (3, 72, 384)
    assert tokens.dtype == torch.float32
    assert tokens.device.type == "cpu"
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 72))


def test_embed_tokens_usable_in_autograd(reference_tokens):
    tokens, _ = reference_tokens
    assert not tokens.is_inference()
    weight = torch.ones(384, requires_grad=True)
    (tokens * weight).sum().backward()
    assert weight.grad is not None


def test_embed_unnormalised(small_model):
    tokens, _ = _reference("dinov2_vits14", small_model, normalize=False).embed(_images(1))
    assert not torch.allclose(tokens.norm(dim=-1), torch.ones(1, 72))


def test_embed_batching_invariant(small_model, reference_tokens):
    tokens, _ = _reference("dinov2_vits14", small_model, batch_size=2).embed(_images(3))
    torch.testing.assert_close(tokens, reference_tokens[0], rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_embed_rejects_mixed_grids(small_model):
    images = _images(1, size=(112, 112)) + _images(1, size=(224, 112))
    with pytest.raises(ValueError, match=r"share one patch grid.*\(8, 8\), \(8, 16\)"):
        _reference("dinov2_vits14", small_model).embed(images)


@pytest.mark.parametrize("size", [(30000, 3), (3, 30000)], ids=["wide", "tall"])
def test_embed_rejects_extreme_aspect(small_model, size):
    # At 112 px the shorter side has 8 patches and the longer one 80000.
    backbone = _reference("dinov2_vits14", small_model)
    message = r"would give a patch grid of \d+ x \d+ \(640,000 patches\) at resolution 112, more than"
    with pytest.raises(ValueError, match=message):
        backbone.grid_shape(size)
    with pytest.raises(ValueError, match=message):
        backbone.embed([Image.new("L", size)])


def test_embed_rejects_empty(small_model):
    with pytest.raises(ValueError, match="at least one image"):
        _reference("dinov2_vits14", small_model).embed([])


@pytest.mark.parametrize(
    "mode",
    ["L", "RGB", "RGBA", "I;16"],
    ids=["gray", "rgb", "rgba", "uint16"],
)
def test_embed_modes_finite(small_model, mode):
    rng = np.random.default_rng(5)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (100, 100), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (100, 100, 4), dtype=np.uint8)).convert(mode)
    assert image.mode == mode
    tokens, grid = _reference("dinov2_vits14", small_model).embed([image])
    assert grid == (8, 8)
    assert torch.isfinite(tokens).all()


def test_embed_sixteen_bit_like_eight_bit(small_model):
    eight = np.random.default_rng(6).integers(0, 256, (100, 100), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257
    backbone = _reference("dinov2_vits14", small_model)
    tokens8, _ = backbone.embed([Image.fromarray(eight)])
    tokens16, _ = backbone.embed([Image.fromarray(sixteen)])
    torch.testing.assert_close(tokens16, tokens8, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_settings_name_options(small_model):
    backbone = _reference("dinov2_vits14", small_model, intensity="minmax")
    description = backbone.describe()
    assert description["name"] == "dinov2_vits14"
    assert description["dim"] == 384
    assert description["resolution"] == RESOLUTION
    assert description["intensity"] == "minmax"
    assert description["crop"] == "center"
    assert description["normalize"] is True
    assert description["autocast"] is None
    assert description["architecture"] == "vit_small_patch14_dinov2"


@pytest.mark.parametrize(
    "arch",
    ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"],
    ids=["plain", "registers"],
)
def test_dinov2_forward_matches_timm_at_518(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, depth=1, dynamic_img_size=True, num_classes=0).eval()
    pixels = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        expected = model.forward_features(pixels)
        tokens = forward_features_dinov2(model, pixels)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_pos_embed_identity_at_source():
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed_dinov2(pos_embed, (37, 37), 1) is pos_embed


def test_pos_embed_resized_shape():
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    resized = interpolate_pos_embed_dinov2(pos_embed, (32, 64), 1)
    assert resized.shape == (1, 1 + 32 * 64, 8)
    torch.testing.assert_close(resized[:, :1], pos_embed[:, :1], rtol=0, atol=0)


def test_pos_embed_differs_from_timm():
    # The two rules disagree when downsampling (offset and antialiasing), which is why
    # the choice is part of the backbone settings.
    pos_embed = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    dinov2 = interpolate_pos_embed_dinov2(pos_embed, (32, 32), 1)
    timm_rule = resample_abs_pos_embed(pos_embed, new_size=(32, 32), old_size=(37, 37), num_prefix_tokens=1)
    assert dinov2.shape == timm_rule.shape
    assert not torch.allclose(dinov2, timm_rule, atol=1e-3)


def test_timm_interpolation_option(small_model):
    tokens, _ = _reference("dinov2_vits14", small_model, pos_embed_interpolation="timm").embed(_images(1))
    with torch.inference_mode():
        pixels = preprocess(_images(1)[0], RESOLUTION)[None]
        expected = torch.nn.functional.normalize(small_model.forward_features(pixels)[:, 1:], dim=-1)
    torch.testing.assert_close(tokens, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_autocast_needs_cuda():
    with pytest.raises(ValueError, match="autocast=True .*requires a CUDA device"):
        load_backbone("dinov2_vits14", weights="random", autocast=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_rejected():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_backbone("dinov2_vits14", weights="random", device="cuda")


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("resolution", 7, "resolution must be at least patch_size"),
        ("intensity", "auto", "intensity must be one of"),
        ("pos_embed_interpolation", "nearest", "pos_embed_interpolation must be one of"),
    ],
    ids=["batch-size", "resolution", "intensity", "pos-embed"],
)
def test_invalid_option_rejected(option, value, match):
    with pytest.raises(ValueError, match=match):
        load_backbone("dinov2_vits14", weights="random", **{option: value})


def test_offline_backbone_returned():
    pytest.importorskip("dinodpmm.features.offline")
    backbone = load_backbone("offline", resolution=RESOLUTION)
    assert backbone.name == "offline"
    assert backbone.grid_shape((256, 256)) == (8, 8)


def test_offline_rejects_weights(tmp_path):
    with pytest.raises(ValueError, match="weights must be None for the offline backbone"):
        load_backbone("offline", weights=tmp_path / "x.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(small_model, reference_tokens):
    model = _seeded_model("dinov2_vits14")
    backbone = DinoV2Backbone(
        "dinov2_vits14", model, weights_digest="reference", weights_source="memory",
        resolution=RESOLUTION, device="cuda",
    )
    tokens, _ = backbone.embed(_images(3))
    assert tokens.device.type == "cpu"
    # TF32 and different kernels on the GPU change float32 rounding; cosine similarity of
    # unit vectors stays within 1e-3 of 1 for a 12-block ViT-S.
    similarity = (tokens * reference_tokens[0]).sum(dim=-1)
    assert similarity.min() > 1 - 1e-3


def test_text_file_weights_raise_checkpoint_error(tmp_path):
    from dinodpmm.features.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "notes.pth"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch or safetensors checkpoint"):
        read_state_dict(path)
