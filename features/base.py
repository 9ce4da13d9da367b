"""The interface every backbone implements, pretrained or offline."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


class Backbone(abc.ABC):
    """A frozen patch-embedding extractor with a square patch grid.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`embed`.

    Attributes
    ----------
    name : str
        Registry name, for example ``"dinov2_vits14"`` or ``"offline"``. Every output
        (cache keys, run metadata, metrics, plots) records it.
    dim : int
        Embedding dimension of one patch token.
    patch_size : int
        Side of one patch in pixels of the preprocessed image.
    weights_digest : str
        Hex digest identifying the weights (or the feature definition for a backbone
        without weights). The embedding cache keys entries on it.
    device : torch.device
        Device the backbone runs on.
    recommended_score : str
        Patch score that suits these embeddings: ``"cosine"`` for L2-normalised
        embeddings whose direction carries the meaning (DINOv2), ``"euclidean"`` for
        features whose magnitudes matter (the offline backbone). Configs use it.
    """

    recommended_score: str = "cosine"
    name: str
    dim: int
    patch_size: int
    weights_digest: str
    device: torch.device

    @abc.abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed images that share one patch grid after preprocessing.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images of any mode (``L``, ``I;16``, ``RGB``, ``RGBA``, ...).

        Returns
        -------
        tokens : torch.Tensor of shape (num_images, grid_h * grid_w, dim)
            Patch embeddings in row-major patch order, float32, on the CPU.
        grid : tuple of int
            ``(grid_h, grid_w)``.

        Raises
        ------
        ValueError
            If the images do not share one grid shape after preprocessing.
        """

    @abc.abstractmethod
    def grid_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Return ``(grid_h, grid_w)`` for an image of ``(width, height)`` pixels."""

    @property
    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Return every preprocessing and extraction setting that changes the embeddings.

        JSON-serialisable; the embedding cache hashes it into its keys.
        """

    def describe(self) -> dict[str, Any]:
        """Return the metadata that outputs store to name this backbone."""
        return {
            "name": self.name,
            "dim": self.dim,
            "patch_size": self.patch_size,
            "weights_digest": self.weights_digest,
            **self.settings,
        }
