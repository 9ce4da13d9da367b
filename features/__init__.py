"""Backbones, preprocessing, dataset layouts and the on-disk embedding cache."""

from .backbones import DinoV2Backbone, available_backbones, load_backbone
from .base import Backbone
from .cache import CacheInfo, EmbeddingCache, default_cache_root
from .checkpoints import CheckpointError, WeightsNotFoundError
from .datasets import LAYOUTS, Dataset, Sample, Split, detect_layout, load_mask, open_dataset
from .extract import IndexRecord, SplitEmbeddings, embed_split
from .offline import OfflineBackbone
from .preprocess import ImageReadError, grid_shape, load_image, preprocess

__all__ = [
    "LAYOUTS",
    "Backbone",
    "CacheInfo",
    "CheckpointError",
    "Dataset",
    "DinoV2Backbone",
    "EmbeddingCache",
    "ImageReadError",
    "IndexRecord",
    "OfflineBackbone",
    "Sample",
    "Split",
    "SplitEmbeddings",
    "WeightsNotFoundError",
    "available_backbones",
    "default_cache_root",
    "detect_layout",
    "embed_split",
    "grid_shape",
    "load_backbone",
    "load_image",
    "load_mask",
    "open_dataset",
    "preprocess",
]
