"""Backbones, preprocessing, dataset layouts and the on-disk embedding cache.

The names below load their modules on first access, so that the ``dinodpmm`` command
builds its parser without importing torch and timm.
"""

from .._lazy import lazy_exports

# Public name -> module (relative to this package) that defines it. No name may equal
# a submodule's name: importing the submodule would rebind the package attribute.
_EXPORTS = {
    "DinoV2Backbone": ".backbones",
    "available_backbones": ".backbones",
    "load_backbone": ".backbones",
    "Backbone": ".base",
    "CacheInfo": ".cache",
    "EmbeddingCache": ".cache",
    "default_cache_root": ".cache",
    "CheckpointError": ".checkpoints",
    "WeightsNotFoundError": ".checkpoints",
    "LAYOUTS": ".datasets",
    "Dataset": ".datasets",
    "Sample": ".datasets",
    "Split": ".datasets",
    "detect_layout": ".datasets",
    "load_mask": ".datasets",
    "open_dataset": ".datasets",
    "IndexRecord": ".extract",
    "SplitEmbeddings": ".extract",
    "embed_split": ".extract",
    "OfflineBackbone": ".offline",
    "OfflineTextureBackbone": ".offline_texture",
    "ImageReadError": ".preprocess",
    "grid_shape": ".preprocess",
    "load_image": ".preprocess",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
