"""Figures of an experiment run, drawn with matplotlib's object-oriented API.

Every function writes one PNG and takes a ``footer``, a line drawn at the bottom of the
figure that names the backbone (see :func:`backbone_label`). No function touches
``matplotlib.pyplot``, so no GUI backend is selected and the global figure state of the
caller is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ..features.backbones import OFFLINE_BACKBONES

# Colour of each method in the ROC figure.
METHOD_COLORS = {"dpmm": "tab:blue", "memory_bank": "tab:orange"}
METHOD_LABELS = {"dpmm": "DPMM", "memory_bank": "memory bank"}
_DPI = 120
# Maximum side length, in pixels, of an image drawn in an overlay panel (see _display_size).
_MAX_DISPLAY_SIDE = 1024
# PIL modes with more than 8 bits per pixel.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# Unit of the x axis of each algorithm's trace.
_TRACE_UNITS = {"svi": "step", "gibbs": "sweep", "online-em": "epoch"}


def backbone_label(backbone: Mapping[str, Any]) -> str:
    """Return the line that names a backbone in figure footers.

    The weight-free backbones are labelled as baselines, so their figures cannot be
    taken for DINOv2 results.
    """
    name = backbone.get("name", "unknown")
    if name in OFFLINE_BACKBONES:
        return f"backbone: {name} (hand-crafted descriptors, a baseline without DINOv2 weights)"
    return f"backbone: {name} (resolution {backbone.get('resolution', '?')})"


def display_stride(height: int, width: int) -> int:
    """Return the whole-number stride that brings the longer side to at most ``_MAX_DISPLAY_SIDE`` pixels."""
    return max(1, -(-max(height, width) // _MAX_DISPLAY_SIDE))  # ceiling division


def display_image(image) -> np.ndarray:
    """Return a PIL image as grayscale float (height, width) in [0, 1], box-reduced for display if large.

    Reducing the PIL image first keeps a large image from being copied to float64 at
    full size (over 1 GB at 8000 x 8000 pixels).
    """
    stride = display_stride(image.height, image.width)
    if stride > 1:
        # PIL's reduce() rejects 16-bit modes, so those go through 32-bit float first.
        image = (image.convert("F") if image.mode in _HIGH_DEPTH_MODES else image.convert("L")).reduce(stride)
    return grayscale(image)


def grayscale(image) -> np.ndarray:
    """Return an image as float (height, width) in [0, 1] for display, whatever its mode and bit depth."""
    array = np.asarray(image.convert("F") if image.mode in _HIGH_DEPTH_MODES else image.convert("L"),
                       dtype=np.float64)
    low, high = np.percentile(array, [0.5, 99.5])
    # The floor keeps a constant image finite (all zeros) instead of dividing by zero.
    return np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0)


def _finish(figure: Figure, path: Path, footer: str) -> Path:
    # supxlabel, unlike figure.text, gets space from the constrained layout.
    figure.supxlabel(footer, fontsize=8, color="0.3")
    path.parent.mkdir(parents=True, exist_ok=True)
    # bbox_inches="tight" widens the canvas so that a footer longer than the axes is not clipped.
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def plot_overlays(cases: Sequence[Mapping[str, Any]], path: Path, footer: str) -> Path:
    """Draw one row per case: the image with its mask outline, then each method's anomaly map.

    Parameters
    ----------
    cases : sequence of dict
        Each with ``title`` (str), ``image`` (np.ndarray of shape (height, width), the
        grayscale image), ``mask`` (bool np.ndarray of shape (height, width)) and
        ``maps`` (dict from method name to an anomaly map of shape (height, width)).
    path : pathlib.Path
        Output PNG.
    footer : str
        Line naming the backbone.
    """
    methods = list(cases[0]["maps"]) if cases else []
    columns = 1 + len(methods)
    figure = Figure(figsize=(3.2 * columns, 3.2 * max(len(cases), 1) + 0.4), layout="constrained")
    axes = figure.subplots(max(len(cases), 1), columns, squeeze=False)
    for row, case in enumerate(map(_display_size, cases)):
        _show_image(axes[row, 0], case["image"], case["mask"], case["title"])
        for column, method in enumerate(methods, start=1):
            _show_map(axes[row, column], case, method)
    return _finish(figure, path, footer)


def _display_size(case: Mapping[str, Any]) -> dict[str, Any]:
    """Subsample a case's image, mask and maps by a whole stride to at most ``_MAX_DISPLAY_SIDE`` pixels a side.

    A panel is about 400 pixels wide at the figure's resolution, so the subsampling
    changes nothing visible, while matplotlib's RGBA copies of an 8000 x 8000 image
    would take gigabytes.
    """
    stride = display_stride(*case["image"].shape)
    if stride == 1:
        return dict(case)

    def shrink(array: np.ndarray) -> np.ndarray:
        return np.asarray(array)[::stride, ::stride]

    return {**case, "image": shrink(case["image"]), "mask": _max_pool(np.asarray(case["mask"], dtype=bool), stride),
            "maps": {method: shrink(heat) for method, heat in case["maps"].items()}}


def _max_pool(mask: np.ndarray, stride: int) -> np.ndarray:
    """Reduce a bool mask by ``stride`` so that a block is True when any of its pixels is (thin defects stay visible).

    The output has the shape of ``mask[::stride, ::stride]``; edge blocks may be partial.
    """
    height, width = mask.shape
    padded = np.zeros((-(-height // stride) * stride, -(-width // stride) * stride), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(padded.shape[0] // stride, stride, padded.shape[1] // stride, stride).any(axis=(1, 3))


def _show_image(ax, image: np.ndarray, mask: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray")
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _show_map(ax, case: Mapping[str, Any], method: str) -> None:
    ax.imshow(case["image"], cmap="gray")
    heat = ax.imshow(case["maps"][method], cmap="inferno", alpha=0.55)
    if case["mask"].any():
        ax.contour(case["mask"].astype(np.float32), levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(f"{METHOD_LABELS.get(method, method)} anomaly map", fontsize=8)
    ax.set_axis_off()
    bar = ax.figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    # Each panel has its own colour scale, from its lowest to its highest pixel score.
    bar.set_label("anomaly score (this image)", fontsize=7)


def plot_assignments(cases: Sequence[Mapping[str, Any]], path: Path, footer: str) -> Path:
    """Draw test images next to their patch grids coloured by the nearest mixture component.

    Parameters
    ----------
    cases : sequence of dict
        Each with ``title``, ``image`` (np.ndarray of shape (height, width)), ``mask``
        (bool np.ndarray of shape (height, width)) and ``assignment`` (int np.ndarray of shape (grid_h, grid_w)): the rank of the
        nearest component when components are sorted by decreasing weight.
    path : pathlib.Path
        Output PNG.
    footer : str
        Line naming the backbone.
    """
    figure = Figure(figsize=(6.4, 3.0 * max(len(cases), 1) + 0.4), layout="constrained")
    axes = figure.subplots(max(len(cases), 1), 2, squeeze=False)
    # tab20 repeats every 20 ranks, so two components can share a colour on large grids.
    colours = colormaps["tab20"]
    for row, case in enumerate(cases):
        _show_image(axes[row, 0], case["image"], case["mask"], case["title"])
        axes[row, 1].imshow(case["assignment"] % 20, cmap=colours, vmin=0, vmax=19, interpolation="nearest")
        num_used = len(np.unique(case["assignment"]))
        repeat = "; 20 colours, repeating" if num_used > 20 else ""
        axes[row, 1].set_title(f"nearest component per patch ({num_used} distinct{repeat})", fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    return _finish(figure, path, footer)


def plot_roc(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, footer: str) -> Path:
    """Draw image-level and pixel-level ROC curves of every method.

    Parameters
    ----------
    curves : dict
        ``{"image": {method: {"labels", "scores", "auroc"}}, "pixel": {...}}`` where
        ``labels`` and ``scores`` are np.ndarray of shape (num_samples,) and ``auroc``
        is the exact AUROC printed in the legend (the pixel curve may be drawn from a
        pixel sample).
    """
    figure = Figure(figsize=(9.0, 4.4), layout="constrained")
    axes = figure.subplots(1, 2, squeeze=False)[0]
    for ax, (level, methods) in zip(axes, curves.items()):
        for method, curve in methods.items():
            if len(np.unique(curve["labels"])) < 2:
                continue
            fpr, tpr, _ = roc_curve(curve["labels"], curve["scores"])
            label = f"{METHOD_LABELS.get(method, method)} (AUROC {curve['auroc']:.3f})"
            ax.plot(fpr, tpr, color=METHOD_COLORS.get(method), label=label)
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"{level}-level ROC", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    return _finish(figure, path, footer)


def plot_weights(weights: np.ndarray, path: Path, footer: str) -> Path:
    """Draw the expected mixture weights (num_components,) sorted in decreasing order on a log axis."""
    ordered = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    ax.semilogy(np.arange(1, ordered.size + 1), ordered, marker=".", markersize=3, linewidth=0.8)
    cumulative = np.cumsum(ordered)
    effective = int(np.searchsorted(cumulative, 0.99 * cumulative[-1]) + 1)
    ax.axvline(effective, color="tab:red", linestyle=":", label=f"99% of the mass: {effective} components")
    ax.set_xlabel("component rank")
    ax.set_ylabel("expected weight")
    ax.set_title(f"mixture weights, sorted ({ordered.size} components)", fontsize=10)
    ax.legend(fontsize=8)
    return _finish(figure, path, footer)


def plot_num_components(samples: np.ndarray, num_points: int, path: Path, footer: str) -> Path:
    """Draw a histogram of posterior draws (num_samples,) of the number of occupied components."""
    samples = np.asarray(samples)
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    low, high = int(samples.min()), int(samples.max())
    ax.hist(samples, bins=np.arange(low, high + 2) - 0.5, color="tab:blue", edgecolor="white")
    ax.set_xlabel(f"occupied components among {num_points} training patches")
    ax.set_ylabel("posterior draws")
    ax.set_title(f"posterior of the number of components (mean {samples.mean():.1f})", fontsize=10)
    return _finish(figure, path, footer)


def plot_trace(trace: Mapping[str, Sequence[Any]], algorithm: str, path: Path, footer: str) -> Path:
    """Draw every series of an inference trace (for SVI the per-step ELBO), one panel each.

    Series that hold one list per chain (the Gibbs sampler's) are drawn as one line per chain.
    """
    names = [name for name, values in trace.items() if len(values) > 0]
    figure = Figure(figsize=(6.4, 2.8 * max(len(names), 1) + 0.4), layout="constrained")
    axes = figure.subplots(max(len(names), 1), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        values = trace[name]
        series = values if isinstance(values[0], (list, tuple)) else [values]
        for chain, line in enumerate(series):
            ax.plot(np.arange(len(line)), line, linewidth=0.8, label=f"chain {chain}" if len(series) > 1 else None)
        ax.set_ylabel(name)
        ax.set_xlabel(_TRACE_UNITS.get(algorithm, "iteration"))
        if len(series) > 1:
            ax.legend(fontsize=7)
    axes[0].set_title(f"{algorithm} trace", fontsize=10)
    return _finish(figure, path, footer)
