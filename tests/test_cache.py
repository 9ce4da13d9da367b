"""Tests of the embedding cache, split extraction and the embed and cache commands."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

try:
    import resource
except ImportError:  # Windows
    resource = None
import torch
from PIL import Image

from dinodpmm.features import commands
from dinodpmm.features.base import Backbone
from dinodpmm.features.cache import CACHE_ENV_VAR, EmbeddingCache, default_cache_root
from dinodpmm.features.datasets import Sample, image_size, open_dataset
from dinodpmm.features.extract import SplitEmbeddings, embed_split

REPO_ROOT = Path(__file__).resolve().parents[1]
PATCH = 4


class FakeBackbone(Backbone):
    """Deterministic backbone: per-patch mean, std, min and max of the grayscale image.

    The grid is the image size in whole patches, so images of different sizes get
    different grids. ``calls`` records the number of images of each ``embed`` call.
    ``fail_after`` makes ``embed`` raise once that many images have been embedded.
    """

    name = "fake"
    dim = 4
    patch_size = PATCH

    def __init__(self, weights_digest: str = "ab" * 32, scale: float = 1.0, fail_after: int | None = None):
        self.weights_digest = weights_digest
        self.device = torch.device("cpu")
        self.scale = scale
        self.fail_after = fail_after
        self.calls: list[int] = []

    @property
    def settings(self) -> dict:
        return {"scale": self.scale}

    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        width, height = image_size
        return height // PATCH, width // PATCH

    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.fail_after is not None and sum(self.calls) + len(images) > self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(len(images))
        grids = {self.grid_shape(image.size) for image in images}
        if len(grids) != 1:
            raise ValueError(f"images do not share one grid: {grids}")
        tokens = np.stack([self._patch_statistics(image) for image in images])
        return torch.from_numpy(tokens), grids.pop()

    def _patch_statistics(self, image: Image.Image) -> np.ndarray:
        grid_h, grid_w = self.grid_shape(image.size)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)[: grid_h * PATCH, : grid_w * PATCH]
        patches = pixels.reshape(grid_h, PATCH, grid_w, PATCH).transpose(0, 2, 1, 3).reshape(grid_h * grid_w, -1)
        statistics = [patches.mean(1), patches.std(1), patches.min(1), patches.max(1)]
        return self.scale * np.stack(statistics, axis=1) / 255.0  # grid_h*grid_w 4


def _write_images(folder: Path, count: int, size: tuple[int, int] = (16, 12), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
        paths.append(folder / f"image_{seed}_{i:02d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _samples(paths: Sequence[Path], label: int = 0) -> list[Sample]:
    return [Sample(path, None, label, "good" if label == 0 else "Ungood") for path in paths]


def _direct_embedding(backbone: FakeBackbone, path: Path) -> np.ndarray:
    """Return the embedding of one image computed without the cache, (grid_h*grid_w, dim)."""
    with Image.open(path) as image:
        return FakeBackbone(backbone.weights_digest, backbone.scale)._patch_statistics(image)


def _entry_files(cache: EmbeddingCache, backbone: Backbone) -> list[Path]:
    return sorted(cache.backbone_directory(backbone).glob("*.npy"))


def _remove_bundles(cache: EmbeddingCache, backbone: Backbone) -> None:
    for path in (cache.backbone_directory(backbone) / "bundles").iterdir():
        path.unlink()


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Five 16x12 images (grid 3x4) and three 8x20 images (grid 5x2), interleaved."""
    wide = _write_images(tmp_path / "images", 5, size=(16, 12), seed=1)
    tall = _write_images(tmp_path / "images", 3, size=(8, 20), seed=2)
    return [wide[0], tall[0], wide[1], wide[2], tall[1], wide[3], tall[2], wide[4]]


@pytest.fixture
def cache(tmp_path) -> EmbeddingCache:
    return EmbeddingCache(tmp_path / "cache")


def test_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "from_env"))
    assert default_cache_root() == tmp_path / "from_env"
    assert EmbeddingCache().root == tmp_path / "from_env"
    assert EmbeddingCache(tmp_path / "explicit").root == tmp_path / "explicit"


def test_root_default_user_cache(monkeypatch):
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    assert default_cache_root().parts[-2:] == ("dinodpmm", "embeddings")


def test_dtype_invalid(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of float16, float32, got 'float64'"):
        EmbeddingCache(tmp_path, dtype="float64")


@pytest.mark.parametrize(
    "change",
    ["image_bytes", "settings", "weights_digest", "dtype"],
    ids=["image-bytes", "settings", "weights-digest", "dtype"],
)
def test_key_changes_miss(tmp_path, change):
    path = _write_images(tmp_path, 1)[0]
    backbone = FakeBackbone()
    cache = EmbeddingCache(tmp_path / "cache")
    key = cache.image_key(backbone, path)
    if change == "image_bytes":
        Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(path)
    elif change == "settings":
        backbone = FakeBackbone(scale=2.0)
    elif change == "weights_digest":
        backbone = FakeBackbone(weights_digest="cd" * 32)
    else:
        cache = EmbeddingCache(tmp_path / "cache", dtype="float32")
    assert cache.image_key(backbone, path) != key


def test_same_bytes_one_entry(tmp_path, cache):
    original = _write_images(tmp_path / "first", 1)[0]
    copy = tmp_path / "second" / "renamed.png"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    backbone = FakeBackbone()
    embed_split(backbone, _samples([original]), cache, progress=False)
    embed_split(backbone, _samples([copy]), cache, progress=False)
    assert backbone.calls == [1]
    assert len(_entry_files(cache, backbone)) == 1


def test_split_values_match(images, cache):
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    for i, path in enumerate(images):
        # float16 storage rounds to nearest, so the stored values equal the cast exactly.
        expected = _direct_embedding(backbone, path).astype(np.float16)
        np.testing.assert_array_equal(embeddings.image_patches(i), expected, err_msg=str(path))


def test_split_index_and_grids(images, cache):
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images, label=1), cache, progress=False)
    grids = [embeddings.grid(i) for i in range(embeddings.num_images)]
    assert grids == [(3, 4), (5, 2), (3, 4), (3, 4), (5, 2), (3, 4), (5, 2), (3, 4)]
    assert embeddings.num_patches == 5 * 12 + 3 * 10
    assert embeddings.index[1].row_start == 12
    assert embeddings.index[1].row_stop == 22
    assert [record.image for record in embeddings.index] == [str(path) for path in images]
    np.testing.assert_array_equal(embeddings.labels, np.ones(8, dtype=np.int64))
    assert embeddings.backbone["name"] == "fake"


@pytest.mark.parametrize("batch_size", [1, 2, 16], ids=["batch-1", "batch-2", "batch-16"])
def test_batches_share_grid(images, cache, batch_size):
    backbone = FakeBackbone()
    embed_split(backbone, _samples(images), cache, batch_size=batch_size, progress=False)
    # FakeBackbone.embed raises on mixed grids, so reaching here means every batch shared one.
    assert max(backbone.calls) <= batch_size
    assert sum(backbone.calls) == len(images)
    assert len(backbone.calls) == -(-5 // batch_size) + -(-3 // batch_size)


def test_second_run_hits(images, cache):
    backbone = FakeBackbone()
    first = embed_split(backbone, _samples(images), cache, progress=False)
    calls = list(backbone.calls)
    second = embed_split(backbone, _samples(images), cache, progress=False)
    assert backbone.calls == calls
    assert second.path == first.path
    np.testing.assert_array_equal(second.patches, first.patches)


def test_bundle_skips_entries(images, cache):
    backbone = FakeBackbone()
    first = np.array(embed_split(backbone, _samples(images), cache, progress=False).patches)
    for path in _entry_files(cache, backbone):
        path.unlink()
    second = embed_split(backbone, _samples(images), cache, progress=False)
    assert sum(backbone.calls) == len(images)
    np.testing.assert_array_equal(second.patches, first)


def test_entries_reused_new_bundle(images, cache):
    backbone = FakeBackbone()
    embed_split(backbone, _samples(images), cache, progress=False)
    subset = embed_split(backbone, _samples(images[::-1][:3]), cache, progress=False)
    assert sum(backbone.calls) == len(images)
    assert subset.num_images == 3
    assert cache.info().num_bundles == 2


def test_resume_after_crash(images, cache):
    crashing = FakeBackbone(fail_after=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_split(crashing, _samples(images), cache, batch_size=2, progress=False)
    # Batches of the 3x4 grid come first: two full batches (4 images) were stored.
    assert sum(crashing.calls) == 4
    assert len(_entry_files(cache, crashing)) == 4
    # A writer killed mid-write leaves a temporary file, never a partial entry.
    key = cache.image_key(crashing, images[-1])
    leftover = cache.backbone_directory(crashing) / f".{key}.npy.k1ll3d0x.tmp"
    leftover.write_bytes(b"\x93NUMPY partial")

    resumed = FakeBackbone()
    embeddings = embed_split(resumed, _samples(images), cache, batch_size=2, progress=False)
    assert sum(resumed.calls) == len(images) - 4
    expected = _direct_embedding(resumed, images[-1]).astype(np.float16)
    np.testing.assert_array_equal(embeddings.image_patches(len(images) - 1), expected)
    assert cache.info().num_temporary_files == 1


@pytest.mark.parametrize("damage", ["truncate", "empty", "header"], ids=["truncated", "empty", "bad-header"])
def test_damaged_entry_recomputed(images, cache, caplog, damage):
    backbone = FakeBackbone()
    embed_split(backbone, _samples(images), cache, progress=False)
    _remove_bundles(cache, backbone)
    entry = cache.entry_path(backbone, cache.image_key(backbone, images[3]))
    content = entry.read_bytes()
    damaged = {"truncate": content[: len(content) - 10], "empty": b"", "header": b"not a numpy file" + content[16:]}
    entry.write_bytes(damaged[damage])

    with caplog.at_level(logging.WARNING, logger="dinodpmm.features.cache"):
        embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    assert backbone.calls[-1] == 1
    assert sum(backbone.calls) == len(images) + 1
    assert any(str(entry) in record.getMessage() for record in caplog.records)
    assert entry.read_bytes() == content
    expected = _direct_embedding(backbone, images[3]).astype(np.float16)
    np.testing.assert_array_equal(embeddings.image_patches(3), expected)


def test_truncated_bundle_rebuilt(images, cache, caplog):
    backbone = FakeBackbone()
    first = embed_split(backbone, _samples(images), cache, progress=False)
    expected = np.array(first.patches)
    bundle_path = first.path
    # Drop the memory map before truncating the file under it.
    del first
    bundle_path.write_bytes(bundle_path.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="dinodpmm.features"):
        rebuilt = embed_split(backbone, _samples(images), cache, progress=False)
    assert sum(backbone.calls) == len(images)
    assert any("recomputed" in record.getMessage() for record in caplog.records)
    np.testing.assert_array_equal(rebuilt.patches, expected)


@pytest.mark.skipif(resource is None, reason="the resource module is POSIX-only")
def test_bundle_more_entries_than_fds(tmp_path, cache):
    paths = _write_images(tmp_path / "many", 80, seed=7)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        embeddings = embed_split(FakeBackbone(), _samples(paths), cache, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert embeddings.num_images == 80


def test_bundle_memory_mapped(images, cache):
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    assert isinstance(embeddings.patches, np.memmap)
    assert embeddings.patches.mode == "r"
    assert embeddings.patches.dtype == np.float16
    assert embeddings.patches.shape == (90, 4)


def test_bundle_random_rows(images, cache):
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    direct = np.concatenate([_direct_embedding(backbone, path) for path in images]).astype(np.float16)
    rows = np.random.default_rng(0).integers(0, embeddings.num_patches, size=50)
    np.testing.assert_array_equal(embeddings.patches[rows], direct[rows])


def test_bundle_open_path(images, cache):
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    reopened = SplitEmbeddings.open(embeddings.path)
    assert reopened.index == embeddings.index
    np.testing.assert_array_equal(reopened.patches, embeddings.patches)


def test_bundle_open_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bundle file .*missing\.npy does not exist"):
        SplitEmbeddings.open(tmp_path / "missing.npy")


def test_float32_storage(images, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache32", dtype="float32")
    backbone = FakeBackbone()
    embeddings = embed_split(backbone, _samples(images), cache, progress=False)
    assert embeddings.patches.dtype == np.float32
    np.testing.assert_array_equal(embeddings.image_patches(0), _direct_embedding(backbone, images[0]))


def test_store_float16_overflow(images, cache):
    backbone = FakeBackbone(scale=1e6)
    with pytest.raises(ValueError, match=r"above the float16 maximum 65504\. Use a float32 cache"):
        embed_split(backbone, _samples(images), cache, progress=False)


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        (np.zeros((12, 4)), r"must have shape \(grid_h, grid_w, 4\) .*got \(12, 4\)"),
        (np.full((3, 4, 4), np.nan), r"contains NaN or inf"),
    ],
    ids=["flat", "nan"],
)
def test_store_invalid(tmp_path, cache, embedding, message):
    with pytest.raises(ValueError, match=message):
        cache.store(FakeBackbone(), "0" * 64, embedding, source=tmp_path / "image.png")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, r"batch_size must be a positive integer, got 0"), ({"batch_size": 2.5}, r"got 2\.5")],
    ids=["zero", "float"],
)
def test_split_batch_size_invalid(images, cache, kwargs, message):
    with pytest.raises(ValueError, match=message):
        embed_split(FakeBackbone(), _samples(images), cache, progress=False, **kwargs)


def test_split_empty(cache):
    with pytest.raises(ValueError, match=r"samples of 'embed' is empty"):
        embed_split(FakeBackbone(), [], cache, progress=False)


class TransposedGridBackbone(FakeBackbone):
    """A backbone whose ``embed`` reports ``(grid_w, grid_h)``, disagreeing with ``grid_shape``."""

    def embed(self, images):
        tokens, (grid_h, grid_w) = super().embed(images)
        return tokens, (grid_w, grid_h)


def test_split_grid_disagreement(images, cache):
    with pytest.raises(RuntimeError, match=r"grid \(4, 3\) .*predicts .*grid \(3, 4\), so grid_shape\(\) and embed\(\) disagree"):
        embed_split(TransposedGridBackbone(), _samples(images), cache, progress=False)


def test_info_counts(images, cache):
    embed_split(FakeBackbone(), _samples(images), cache, progress=False)
    other = FakeBackbone(weights_digest="cd" * 32)
    other.name = "other/backbone"
    embed_split(other, _samples(images[:2]), cache, progress=False)
    info = cache.info()
    assert info.num_entries == 10
    assert info.entries_per_backbone == {"fake": 8, "other_backbone": 2}
    assert info.num_bundles == 2
    assert info.total_bytes == sum(path.stat().st_size for path in cache.root.rglob("*") if path.is_file()) - len(
        (cache.root / "CACHEDIR.TAG").read_bytes()
    )


def test_clear_one_backbone(images, cache):
    embed_split(FakeBackbone(), _samples(images), cache, progress=False)
    other = FakeBackbone(weights_digest="cd" * 32)
    other.name = "other"
    embed_split(other, _samples(images[:2]), cache, progress=False)
    assert cache.clear("fake") == 8
    assert cache.info().entries_per_backbone == {"other": 2}
    assert not (cache.root / "fake").exists()


def test_clear_all_keeps_foreign(images, cache):
    embed_split(FakeBackbone(), _samples(images), cache, progress=False)
    foreign = cache.root / "fake" / "notes.json"
    foreign.write_text("{}")
    assert cache.clear() == 8
    assert cache.info().num_entries == 0
    assert foreign.exists()
    assert (cache.root / "CACHEDIR.TAG").exists()


def test_clear_untagged_rejected(tmp_path):
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / ("a" * 64 + ".json")).write_text("{}")
    with pytest.raises(ValueError, match=r"project has no CACHEDIR\.TAG.*nothing was deleted"):
        EmbeddingCache(tmp_path / "project").clear()
    assert (tmp_path / "project" / "data" / ("a" * 64 + ".json")).exists()


def test_clear_missing_root(tmp_path):
    assert EmbeddingCache(tmp_path / "absent").clear() == 0


def test_root_file_rejected(tmp_path):
    root = tmp_path / "cache.npy"
    root.write_bytes(b"keep")
    with pytest.raises(NotADirectoryError, match=rf"cache root {re.escape(str(root))} is a file, not a directory"):
        EmbeddingCache(root)
    assert root.read_bytes() == b"keep"


def test_root_under_file_rejected(tmp_path):
    (tmp_path / "cache.npy").write_bytes(b"keep")
    root = tmp_path / "cache.npy" / "embeddings"
    message = rf"cache root {re.escape(str(root))} cannot be created because .*cache\.npy is a file"
    with pytest.raises(NotADirectoryError, match=message):
        EmbeddingCache(root)


def test_env_root_file_rejected(tmp_path, monkeypatch):
    (tmp_path / "cache.npy").write_bytes(b"keep")
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache.npy"))
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        EmbeddingCache()


def _fill_cache(root: str, paths: list[str], barrier) -> None:
    """Embed ``paths`` into the cache at ``root`` in a child process, starting at ``barrier``."""
    samples = _samples([Path(path) for path in paths])
    barrier.wait(timeout=120)
    embed_split(FakeBackbone(), samples, EmbeddingCache(root), batch_size=1, progress=False)


@pytest.mark.slow
def test_concurrent_writers(tmp_path):
    paths = _write_images(tmp_path / "images", 24, seed=3)
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    # Both workers start after their imports and write the same entries in the same
    # order, so they race on the os.replace of entries and of the bundle.
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_fill_cache, args=(str(root), [str(path) for path in paths], barrier))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0, 0]

    cache = EmbeddingCache(root)
    backbone = FakeBackbone()
    for path in paths:
        entry = cache.load(backbone, cache.image_key(backbone, path))
        assert entry is not None, path
        expected = _direct_embedding(backbone, path).astype(np.float16).reshape(3, 4, 4)
        np.testing.assert_array_equal(entry, expected, err_msg=str(path))
    info = cache.info()
    assert info.num_entries == 24
    assert info.num_temporary_files == 0
    assert info.num_bundles == 1
    bundle = embed_split(backbone, _samples(paths), cache, progress=False)
    assert backbone.calls == []
    assert bundle.num_patches == 24 * 12


@pytest.fixture
def fake_backbones_module(monkeypatch):
    """Replace ``dinodpmm.features.backbones`` with a module whose ``load_backbone`` returns a FakeBackbone."""
    requests: list[dict] = []

    def load_backbone(name, *, weights=None, device="cpu", resolution=448, batch_size=8, progress=None):
        requests.append(
            {
                "name": name,
                "weights": weights,
                "device": device,
                "resolution": resolution,
                "batch_size": batch_size,
                "progress": progress,
            }
        )
        if name != "fake":
            raise ValueError(f"unknown backbone {name!r}; available: fake")
        return FakeBackbone()

    module = types.ModuleType("dinodpmm.features.backbones")
    module.load_backbone = load_backbone
    monkeypatch.setitem(sys.modules, "dinodpmm.features.backbones", module)
    return requests


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dinodpmm")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _build_mvtec(root: Path) -> None:
    _write_images(root / "train" / "good", 3, seed=4)
    _write_images(root / "test" / "good", 2, seed=5)
    for path in _write_images(root / "test" / "crack", 2, seed=6):
        mask_path = root / "ground_truth" / "crack" / f"{path.stem}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 12), 255).save(mask_path)


def test_embed_command_fills(tmp_path, fake_backbones_module, capsys):
    _build_mvtec(tmp_path / "data")
    argv = ["embed", str(tmp_path / "data"), "--backbone", "fake", "--cache", str(tmp_path / "cache")]
    args = _parse([*argv, "--resolution", "224", "--batch-size", "2"])
    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "train: 3 images (3 normal, 0 anomalous), 36 patches x 4 float16" in output
    assert "test: 4 images (2 normal, 2 anomalous), 48 patches x 4 float16" in output
    assert fake_backbones_module[0] == {
        "name": "fake",
        "weights": None,
        "device": "cpu",
        "resolution": 224,
        "batch_size": 2,
        "progress": False,
    }
    assert EmbeddingCache(tmp_path / "cache").info().num_entries == 7


def test_embed_command_splits(tmp_path, fake_backbones_module, capsys, caplog):
    _build_mvtec(tmp_path / "data")
    argv = ["embed", str(tmp_path / "data"), "--backbone", "fake", "--cache", str(tmp_path / "cache")]
    args = _parse([*argv, "--splits", "valid", "test", "--dtype", "float32"])
    with caplog.at_level(logging.WARNING, logger="dinodpmm.features.commands"):
        assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "train:" not in output
    assert "test: 4 images (2 normal, 2 anomalous), 48 patches x 4 float32" in output
    assert any("skipping the valid split" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "{tmp}/absent", "--backbone", "fake"], r"dinodpmm embed: error: dataset root .*absent does not exist"),
        (["embed", "{tmp}/data", "--backbone", "vit_huge"], r"dinodpmm embed: error: unknown backbone 'vit_huge'"),
        (["embed", "{tmp}/data", "--backbone", "fake", "--layout", "resc"], r"dinodpmm embed: error: the train split of the resc"),
    ],
    ids=["missing-root", "unknown-backbone", "wrong-layout"],
)
def test_embed_command_errors(tmp_path, fake_backbones_module, capsys, argv, message):
    _build_mvtec(tmp_path / "data")
    args = _parse([arg.replace("{tmp}", str(tmp_path)) for arg in argv] + ["--cache", str(tmp_path / "cache")])
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    assert re.match(message, error)
    assert error.count("\n") == 1


def test_embed_command_batch_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["embed", str(tmp_path), "--backbone", "fake", "--batch-size", "0"])
    assert "--batch-size: must be at least 1, got 0" in capsys.readouterr().err


def test_cache_commands(images, tmp_path, capsys):
    cache = EmbeddingCache(tmp_path / "cache")
    embed_split(FakeBackbone(), _samples(images), cache, progress=False)
    args = _parse(["cache", "info", "--cache", str(cache.root)])
    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "entries: 8" in output
    assert "bundles: 1" in output
    assert "fake: 8 entries" in output

    args = _parse(["cache", "clear", "--backbone", "other", "--cache", str(cache.root)])
    assert args.handler(args) == 0
    assert "cached backbones: fake" in capsys.readouterr().out
    args = _parse(["cache", "clear", "--cache", str(cache.root)])
    assert args.handler(args) == 0
    assert "deleted 8 entries of all backbones" in capsys.readouterr().out
    assert cache.info().num_entries == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "{tmp}/data", "--backbone", "fake", "--cache", "{tmp}/cache.npy"],
        ["cache", "info", "--cache", "{tmp}/cache.npy"],
        ["cache", "clear", "--cache", "{tmp}/cache.npy"],
    ],
    ids=["embed", "info", "clear"],
)
def test_commands_reject_cache_file(tmp_path, fake_backbones_module, capsys, argv):
    _build_mvtec(tmp_path / "data")
    (tmp_path / "cache.npy").write_bytes(b"keep")
    args = _parse([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    command = " ".join(argv[:2]) if argv[0] == "cache" else "embed"
    expected = f"dinodpmm {command}: error: embedding cache root {tmp_path / 'cache.npy'} is a file, not a directory;"
    assert error.startswith(expected), error
    assert error.count("\n") == 1
    assert (tmp_path / "cache.npy").read_bytes() == b"keep"


def test_cache_clear_command_untagged(tmp_path, capsys):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep")
    args = _parse(["cache", "clear", "--cache", str(tmp_path / "project")])
    assert args.handler(args) == 2
    assert "has no CACHEDIR.TAG" in capsys.readouterr().err


def _data_root() -> Path:
    return Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))


def test_real_split_cached(tmp_path):
    root = _data_root() / "magnetic_tile"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set DINODPMM_DATA to the folder that contains magnetic_tile")
    samples = open_dataset(root).test[:40]
    backbone = FakeBackbone()
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_split(backbone, samples, cache, progress=False)
    calls = sum(backbone.calls)
    second = embed_split(backbone, samples, cache, progress=False)
    assert calls == 40
    assert sum(backbone.calls) == 40
    assert second.num_images == 40
    for i, sample in enumerate(samples):
        assert first.grid(i) == backbone.grid_shape(image_size(sample.image)), sample.image
    index = json.loads(first.path.with_suffix(".json").read_text(encoding="utf-8"))
    assert index["num_patches"] == first.num_patches


def test_cache_clear_missing_directory_fails(tmp_path, capsys):
    import argparse

    from dinodpmm.features import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["cache", "clear", "--cache", str(tmp_path / "absent")])
    assert args.handler(args) != 0
    assert "cache directory" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()
