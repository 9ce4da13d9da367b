"""Evaluation metrics for anomaly detection at image and pixel level.

Image level: AUROC of the image scores. Pixel level, over every pixel of every test
image: AUROC, average precision (AUPR), F1-max, AUPRO up to a false-positive rate of
0.3, and Dice at thresholds chosen on normal validation patches.

Every threshold curve is evaluated exactly, at each distinct score, with tied scores
grouped into one point as scikit-learn does, so the values match ``roc_auc_score``
and ``average_precision_score`` (on the float32 scores that :class:`PixelMetrics`
stores). Metrics that a test set cannot define, such as pixel AUROC without anomalous
pixels, are NaN and are logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_FPRS: tuple[float, ...] = (0.1, 0.05, 0.01)
DEFAULT_MAX_FPR = 0.3
# Pixels per step of the threshold sweep. Each step allocates about 140 bytes of
# temporaries per pixel (measured with tracemalloc on distinct scores), about 150 MB.
DEFAULT_CHUNK_SIZE = 2**20

# Rounding slack when deciding whether fpr * 100 is a whole percentage (0.07 * 100 = 7.000000000000001).
_WHOLE_PERCENT_TOLERANCE = 1e-9

# Distinct label values that a label error message lists before it counts the rest.
_MAX_LISTED_LABELS = 10

# Connected regions of a ground-truth mask use 8-connectivity (diagonal neighbours touch).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# -- threshold sweep ---------------------------------------------------------------------


@dataclasses.dataclass
class _CurveSums:
    """Running sums over the points of the threshold curves, in order of decreasing threshold.

    A point is the state after all samples with score >= one distinct score value are
    called positive: ``tp`` true and ``fp`` false positives, and ``pro``, the sum over
    those true positives of 1 / (size of their ground-truth region).
    """

    num_positive: int
    num_negative: int
    max_fpr: float
    tp: int = 0
    fp: int = 0
    pro: float = 0.0
    # Sum of (fp_j - fp_{j-1}) * (tp_j + tp_{j-1}), twice the ROC area in count units.
    # Each term is at most num_negative * 2 * num_positive, so int64 represents it
    # exactly for fewer than about 4e9 samples.
    auc_twice: int = 0
    precision_sum: float = 0.0  # sum of (tp_j - tp_{j-1}) * precision_j
    f1_max: float = 0.0
    pro_area: float = 0.0  # area under (fpr, pro / num_regions) up to max_fpr

    def add_points(self, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray | None, num_regions: int) -> None:
        """Add curve points (num_points,) that follow the last point added."""
        tp_prev = np.concatenate(([self.tp], tp[:-1]))  # P
        fp_prev = np.concatenate(([self.fp], fp[:-1]))  # P
        self.auc_twice += int(np.sum((fp - fp_prev) * (tp + tp_prev)))
        self.precision_sum += float(np.sum((tp - tp_prev) * (tp / (tp + fp))))
        self.f1_max = max(self.f1_max, float(np.max(2 * tp / (self.num_positive + tp + fp))))
        if pro is not None and num_regions > 0 and self.num_negative > 0:
            pro_prev = np.concatenate(([self.pro], pro[:-1]))
            self.pro_area += _area_below(fp_prev / self.num_negative, fp / self.num_negative,
                                         pro_prev / num_regions, pro / num_regions, self.max_fpr)
            self.pro = float(pro[-1])
        self.tp, self.fp = int(tp[-1]), int(fp[-1])


def _area_below(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray, limit: float) -> float:
    """Return the trapezoid area of the segments (x0, y0)-(x1, y1) left of ``x = limit``.

    A segment that crosses ``limit`` is cut there, with y linearly interpolated.
    """
    active = x0 < limit
    x0, x1, y0, y1 = x0[active], x1[active], y0[active], y1[active]
    width = x1 - x0
    x_cut = np.minimum(x1, limit)
    fraction = np.divide(x_cut - x0, width, out=np.ones_like(width), where=width > 0)
    y_cut = y0 + (y1 - y0) * fraction
    return float(np.sum((x_cut - x0) * (y0 + y_cut) / 2))


def _sweep(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    regions: tuple[np.ndarray, np.ndarray, int] | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> _CurveSums:
    """Sort ``scores`` (num_samples,) once and accumulate every curve sum in chunks.

    ``labels`` (num_samples,) is bool. ``regions`` is ``(positive_index, positive_weight,
    num_regions)``: the flat indices of the positive samples in increasing order, the
    inverse size of each one's ground-truth region, and the number of regions. Peak
    memory is the 8-byte sort order per sample plus about 140 bytes per chunk sample.
    """
    num_positive = int(np.count_nonzero(labels))
    sums = _CurveSums(num_positive, labels.size - num_positive, max_fpr)
    descending = np.argsort(scores)[::-1]
    running_tp, running_pro = 0, 0.0
    for start in range(0, scores.size, chunk_size):
        index = descending[start : start + chunk_size]
        chunk_scores, chunk_labels = scores[index], labels[index]
        ends = _group_ends(chunk_scores, scores, descending, start + index.size)  # last index of each tie group
        cumulative_tp = running_tp + np.cumsum(chunk_labels, dtype=np.int64)  # C
        tp = cumulative_tp[ends]
        fp = start + ends + 1 - tp
        running_tp = int(cumulative_tp[-1])
        pro = None
        if regions is not None:
            cumulative_pro = running_pro + np.cumsum(_region_weights(index, chunk_labels, regions))  # C
            pro, running_pro = cumulative_pro[ends], float(cumulative_pro[-1])
        if ends.size:
            sums.add_points(tp, fp, pro, 0 if regions is None else regions[2])
    return sums


def _group_ends(chunk_scores: np.ndarray, scores: np.ndarray, descending: np.ndarray, stop: int) -> np.ndarray:
    """Return the positions in the chunk where a run of tied scores ends."""
    is_end = np.empty(chunk_scores.size, dtype=bool)
    np.not_equal(chunk_scores[1:], chunk_scores[:-1], out=is_end[:-1])
    # The last score of the chunk ends its group unless the next chunk continues the tie.
    is_end[-1] = stop == scores.size or scores[descending[stop]] != chunk_scores[-1]
    return np.flatnonzero(is_end)


def _region_weights(index: np.ndarray, chunk_labels: np.ndarray, regions) -> np.ndarray:
    """Return 1 / region size for the positive samples of a chunk and 0 for the rest."""
    positive_index, positive_weight, _ = regions
    weights = np.zeros(index.size, dtype=np.float64)
    weights[chunk_labels] = positive_weight[np.searchsorted(positive_index, index[chunk_labels])]
    return weights


# -- image level --------------------------------------------------------------------------


def image_auroc(labels: np.ndarray | torch.Tensor | Sequence, scores: np.ndarray | torch.Tensor | Sequence) -> float:
    """Compute the area under the ROC curve of image scores.

    Parameters
    ----------
    labels : array-like of shape (num_images,)
        1 (or True) for anomalous and 0 (or False) for normal images.
    scores : array-like of shape (num_images,)
        Image scores, higher is more anomalous.

    Returns
    -------
    float
        AUROC in [0, 1], equal to ``sklearn.metrics.roc_auc_score(labels, scores)``;
        NaN, with a logged warning, when all images are normal or all are anomalous.

    Raises
    ------
    ValueError
        If the arrays are not 1-D of equal length, a label is not 0 or 1, or a score is
        NaN or infinite.
    TypeError
        If the labels are neither booleans nor numbers.
    """
    labels, scores = _binary_labels(labels, "labels"), _to_numpy(scores)
    if scores.ndim != 1 or scores.size != labels.size:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {labels.size} labels "
                         f"and scores of shape {scores.shape}.")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores must be finite, but image {bad} has score {scores[bad]!r}.")
    num_positive = int(labels.sum())
    if num_positive in (0, labels.size):
        logger.warning("image AUROC is undefined for %d anomalous of %d images; returning NaN.",
                       num_positive, labels.size)
        return math.nan
    sums = _sweep(scores, labels)
    return sums.auc_twice / (2 * sums.num_positive * sums.num_negative)


def _binary_labels(labels: np.ndarray | torch.Tensor | Sequence, name: str = "labels") -> np.ndarray:
    """Check image labels and return them as bool, True for anomalous.

    Parameters
    ----------
    labels : array-like of shape (num_images,)
        Booleans, or numbers that are all 0 (normal) or 1 (anomalous).
    name : str
        Name of the argument in error messages.

    Returns
    -------
    np.ndarray of bool, shape (num_images,)

    Raises
    ------
    TypeError
        If the labels are neither booleans nor numbers.
    ValueError
        If a numeric label is not 0 or 1, for example scikit-learn's -1 and 1.
    """
    values = _to_numpy(labels).reshape(-1)
    if values.dtype == np.bool_:
        return values
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be booleans or the numbers 0 (normal) and 1 (anomalous), "
                        f"got an array of dtype {values.dtype}.")
    found = np.unique(values)
    if not np.isin(found, (0, 1)).all():
        listed = ", ".join(f"{value:g}" for value in found[:_MAX_LISTED_LABELS])
        more = f" and {found.size - _MAX_LISTED_LABELS} more" if found.size > _MAX_LISTED_LABELS else ""
        raise ValueError(
            f"{name} must be 0 for normal and 1 for anomalous images (or False and True), but contain "
            f"the values {listed}{more}; map them to normal = 0 and anomalous = 1 first (scikit-learn's "
            "outlier detectors, for example, mark anomalies with -1 and normal samples with 1)."
        )
    return values == 1


# -- pixel level --------------------------------------------------------------------------


def thresholds_from_normal(scores: np.ndarray | torch.Tensor, fprs: Sequence[float] = DEFAULT_FPRS) -> np.ndarray:
    """Compute score thresholds that a given fraction of normal scores lies above.

    The threshold for ``fpr`` is the ``1 - fpr`` quantile of ``scores`` with numpy's
    default linear interpolation, so a fraction ``fpr`` of the normal scores (up to one
    sample) is at or above it. Use the patch scores of normal validation images.

    Parameters
    ----------
    scores : np.ndarray or torch.Tensor of any shape, num_scores elements in all
        Scores of normal samples.
    fprs : sequence of float
        False-positive rates in (0, 1).

    Returns
    -------
    np.ndarray of shape (len(fprs),)
        Thresholds, float64, in the order of ``fprs``.

    Raises
    ------
    ValueError
        If ``scores`` is empty or not finite, or an fpr lies outside (0, 1).
    """
    fprs = _checked_fprs(fprs)
    values = _to_numpy(scores).reshape(-1)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"scores must be a non-empty array of finite normal scores, got {values.size} "
                         f"values of which {int(np.count_nonzero(~np.isfinite(values)))} are NaN or infinite.")
    return np.quantile(values.astype(np.float64, copy=False), 1.0 - fprs)


class PixelMetrics:
    """Accumulator of anomaly maps and ground-truth masks for exact pixel-level metrics.

    :meth:`update` stores each map as float32 (4 bytes per pixel) and each mask as
    bool (1 byte per pixel), plus 8 bytes per anomalous pixel for the AUPRO regions:
    about 1 GB for 2e8 pixels. :meth:`compute` sorts all pixels once, which adds 8
    bytes per pixel for the sort order and about 140 bytes per pixel of one chunk for
    the sweep. Counts are int64 throughout, so sizes beyond 2**24 pixels stay exact.
    ``benchmarks/pixel_metrics_memory.py`` measured a peak of 3.7 GB for 2e8 pixels
    (the stored 1 GB, the concatenated arrays and the sort order).

    Parameters
    ----------
    chunk_size : int
        Pixels per step of the threshold sweep in :meth:`compute`.

    Attributes
    ----------
    num_images : int
        Images added so far.
    num_regions : int
        8-connected ground-truth regions over all images added.
    image_labels : list of bool
        Whether each image's mask has an anomalous pixel, in update order.

    Examples
    --------
    >>> pixels = PixelMetrics()
    >>> for heat, mask in zip(maps, masks):  # doctest: +SKIP
    ...     pixels.update(heat, mask)
    >>> pixels.compute()["pixel_auroc"]  # doctest: +SKIP
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        self.chunk_size = int(chunk_size)
        self._scores: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._region_weights: list[np.ndarray] = []
        self.num_images = 0
        self.num_regions = 0
        self.image_labels: list[bool] = []

    @property
    def num_pixels(self) -> int:
        """Number of pixels stored."""
        return sum(part.size for part in self._scores)

    @property
    def num_anomalous_pixels(self) -> int:
        """Number of pixels inside a ground-truth region."""
        return sum(part.size for part in self._region_weights)

    def update(self, anomaly_map: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> None:
        """Add one image, or a stack of images, to the accumulator.

        Parameters
        ----------
        anomaly_map : np.ndarray or torch.Tensor of shape (height, width) or (num_images, height, width)
            Pixel scores, higher is more anomalous; stored as float32.
        mask : np.ndarray or torch.Tensor of the same shape
            Ground truth; pixels with value > 0 are anomalous (0/255 PNG masks work as is).

        Raises
        ------
        ValueError
            If the shapes differ or are not 2-D or 3-D, a stack of maps and a stack of
            masks differ in length, a score is NaN or infinite, or the mask contains NaN.
            The message names the image index in update order.
        """
        scores, truth = _to_numpy(anomaly_map), _to_numpy(mask)
        if scores.ndim == 3 and truth.ndim == 3 and len(scores) != len(truth):
            raise ValueError(f"anomaly_map is a stack of {len(scores)} images but mask of {len(truth)} "
                             f"(images from index {self.num_images}); pass one mask per anomaly map.")
        if scores.ndim == 3 and truth.ndim == 3 and scores.shape == truth.shape:
            for image_scores, image_truth in zip(scores, truth):
                self.update(image_scores, image_truth)
            return
        self._check_image(scores, truth)
        truth = truth > 0
        labelled, num_regions = ndimage.label(truth, structure=_EIGHT_CONNECTED)
        region_sizes = np.bincount(labelled.reshape(-1))
        self._scores.append(scores.astype(np.float32).reshape(-1))
        self._masks.append(truth.reshape(-1))
        # Row-major positives of this image, in the order np.flatnonzero finds them later.
        self._region_weights.append(1.0 / region_sizes[labelled[truth]])
        self.num_regions += num_regions
        self.num_images += 1
        self.image_labels.append(bool(num_regions))

    def _check_image(self, scores: np.ndarray, truth: np.ndarray) -> None:
        image = self.num_images
        if scores.ndim != 2 or scores.shape != truth.shape:
            raise ValueError(f"image {image}: anomaly_map and mask must be 2-D arrays of equal shape "
                             f"(height, width), got {scores.shape} and {truth.shape}; resize the map "
                             "to the mask with scoring.anomaly_map.")
        if not np.isfinite(scores).all():
            count = int(np.count_nonzero(~np.isfinite(scores)))
            raise ValueError(f"image {image}: anomaly_map must be finite, but {count} pixels are NaN or infinite.")
        if truth.dtype.kind == "f" and not np.isfinite(truth).all():
            raise ValueError(f"image {image}: mask contains NaN or infinity; masks must be binary "
                             "(0 for normal, > 0 for anomalous).")

    def compute(self, max_fpr: float = DEFAULT_MAX_FPR) -> dict[str, float]:
        """Compute the threshold-free pixel metrics over every stored pixel.

        Parameters
        ----------
        max_fpr : float
            Upper false-positive rate of the AUPRO integral, in (0, 1].

        Returns
        -------
        dict of str to float
            ``pixel_auroc``: area under the ROC curve of all pixels.
            ``pixel_aupr``: average precision, ``sum_j (R_j - R_{j-1}) P_j`` over the
            distinct thresholds, as ``sklearn.metrics.average_precision_score``.
            ``pixel_f1_max``: maximum over thresholds of ``2 P R / (P + R)`` (max Dice).
            ``aupro``: area under the per-region-overlap curve (PRO against the
            false-positive rate on normal pixels), integrated from 0 to ``max_fpr`` with
            the curve interpolated at ``max_fpr``, divided by ``max_fpr``. PRO at a
            threshold is the mean over the 8-connected ground-truth regions of the
            fraction of the region's pixels at or above the threshold.
            All four are NaN, with a logged warning, when no pixel is anomalous;
            ``pixel_auroc`` and ``aupro`` are NaN when no pixel is normal.

        Raises
        ------
        ValueError
            If no image was added or ``max_fpr`` is outside (0, 1].
        """
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr!r}; AUPRO uses 0.3 by convention.")
        scores, masks, weights = self._consolidate()
        result = dict.fromkeys(("pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro"), math.nan)
        if not self._defined("pixel metrics", normal_needed=False):
            return result
        started = time.perf_counter()
        regions = (np.flatnonzero(masks), weights, self.num_regions)
        sums = _sweep(scores, masks, regions=regions, max_fpr=max_fpr, chunk_size=self.chunk_size)
        logger.info("pixel metrics over %d pixels took %.1f s", scores.size, time.perf_counter() - started)
        result["pixel_aupr"] = sums.precision_sum / sums.num_positive
        result["pixel_f1_max"] = sums.f1_max
        if self._defined("pixel AUROC and AUPRO", normal_needed=True):
            result["pixel_auroc"] = sums.auc_twice / (2 * sums.num_positive * sums.num_negative)
            result["aupro"] = min(1.0, sums.pro_area / max_fpr)
        return result

    def dice(self, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
        """Compute Dice over the whole set at fixed thresholds.

        A pixel is predicted anomalous when its score is at or above the threshold, and
        the counts are summed over all pixels of all images before the ratio
        ``2 TP / (2 TP + FP + FN)`` is taken.

        Parameters
        ----------
        thresholds : sequence of float, num_thresholds values
            For example the output of :func:`thresholds_from_normal`.

        Returns
        -------
        np.ndarray of shape (num_thresholds,)
            Dice per threshold, float64; NaN, with a logged warning, when no pixel is
            anomalous.
        """
        thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        scores, masks, _ = self._consolidate()
        if not self._defined("Dice", normal_needed=False):
            return np.full(thresholds.size, math.nan)
        predicted = np.zeros(thresholds.size, dtype=np.int64)
        true_positive = np.zeros(thresholds.size, dtype=np.int64)
        for start in range(0, scores.size, self.chunk_size):
            above = scores[start : start + self.chunk_size, None] >= thresholds  # C T
            predicted += np.count_nonzero(above, axis=0)
            true_positive += np.count_nonzero(above[masks[start : start + self.chunk_size]], axis=0)
        # 2 TP + FP + FN = (TP + FP) + (TP + FN) = predicted + anomalous.
        return 2 * true_positive / (predicted + self.num_anomalous_pixels)

    def _defined(self, what: str, *, normal_needed: bool) -> bool:
        if self.num_images == 0:
            raise ValueError("no images were added; call update(anomaly_map, mask) for each test image first.")
        num_anomalous, num_pixels = self.num_anomalous_pixels, self.num_pixels
        if num_anomalous == 0 or (normal_needed and num_anomalous == num_pixels):
            logger.warning("%s undefined: %d of %d pixels in %d images are anomalous; returning NaN.",
                           what, num_anomalous, num_pixels, self.num_images)
            return False
        return True

    def _consolidate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Join the per-image arrays into one array each and keep that as the stored state."""
        self._scores = [_concatenate_releasing(self._scores, np.float32)]
        self._masks = [_concatenate_releasing(self._masks, np.bool_)]
        self._region_weights = [_concatenate_releasing(self._region_weights, np.float64)]
        return self._scores[0], self._masks[0], self._region_weights[0]


def _concatenate_releasing(parts: list[np.ndarray], dtype) -> np.ndarray:
    """Concatenate ``parts``, dropping each part once copied, so the peak stays near one copy."""
    if len(parts) == 1:
        return parts[0]
    joined = np.empty(sum(part.size for part in parts), dtype=dtype)
    offset = 0
    for i in range(len(parts)):
        joined[offset : offset + parts[i].size] = parts[i]
        offset += parts[i].size
        parts[i] = None
    return joined


# -- everything at once ---------------------------------------------------------------------


def evaluate(
    image_scores: np.ndarray | torch.Tensor | Sequence[float],
    image_labels: np.ndarray | torch.Tensor | Sequence[bool],
    pixels: PixelMetrics | None = None,
    normal_scores: np.ndarray | torch.Tensor | None = None,
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, float]:
    """Compute every image and pixel metric of a test set.

    Parameters
    ----------
    image_scores : array-like of shape (num_images,)
        Image scores, higher is more anomalous.
    image_labels : array-like of shape (num_images,)
        1 (or True) for anomalous and 0 (or False) for normal images.
    pixels : PixelMetrics or None
        Anomaly maps and masks of the test images, one pair per image in the order of
        ``image_scores``; None when the set has no masks, which makes every pixel
        metric NaN.
    normal_scores : array-like or None
        Patch scores of normal validation images, for the Dice thresholds. None makes
        the Dice values and thresholds NaN, with a logged warning.
    fprs : sequence of float
        False-positive rates on ``normal_scores`` that set the Dice thresholds.
    max_fpr : float
        Upper false-positive rate of the AUPRO integral.

    Returns
    -------
    dict of str to float
        ``image_auroc``, ``pixel_auroc``, ``pixel_aupr``, ``pixel_f1_max`` and ``aupro``.
        For each fpr, ``dice_fprXX`` and ``threshold_fprXX``, where XX is the rate in
        percent from :func:`fpr_key` (``dice_fpr10``, ``dice_fpr05`` and ``dice_fpr01``
        by default). The counts ``num_images``, ``num_anomalous_images``,
        ``num_pixels``, ``num_anomalous_pixels`` and ``num_regions``. The definitions
        and NaN cases are those of :meth:`PixelMetrics.compute` and :meth:`PixelMetrics.dice`.

    Raises
    ------
    ValueError
        If the numbers of image scores, image labels and images in ``pixels`` differ, a
        label is not 0 or 1, or an input is not finite.
    """
    keys = [fpr_key(fpr) for fpr in _checked_fprs(fprs)]
    labels = _binary_labels(image_labels, "image_labels")
    _check_image_counts(_to_numpy(image_scores).size, labels.size, pixels)
    result = {"image_auroc": image_auroc(labels, image_scores)}
    result.update(_pixel_metrics(pixels, max_fpr))
    thresholds, dice = np.full(len(keys), math.nan), np.full(len(keys), math.nan)
    if normal_scores is None:
        logger.warning("no normal validation scores were given, so the Dice thresholds and values are NaN.")
    else:
        thresholds = thresholds_from_normal(normal_scores, fprs)
        if pixels is not None:
            dice = pixels.dice(thresholds)
    for key, threshold, value in zip(keys, thresholds, dice):
        result[f"dice_fpr{key}"] = float(value)
        result[f"threshold_fpr{key}"] = float(threshold)
    result.update(
        num_images=labels.size,
        num_anomalous_images=int(labels.sum()),
        num_pixels=pixels.num_pixels if pixels is not None else 0,
        num_anomalous_pixels=pixels.num_anomalous_pixels if pixels is not None else 0,
        num_regions=pixels.num_regions if pixels is not None else 0,
    )
    return result


def _check_image_counts(num_scores: int, num_labels: int, pixels: PixelMetrics | None) -> None:
    counts = {"image_scores": num_scores, "image_labels": num_labels}
    if pixels is not None:
        counts["pixels (anomaly maps with their masks)"] = pixels.num_images
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{count} in {name}" for name, count in counts.items())
        raise ValueError(f"the test set sizes differ: {listed}; pass one image score, one label and "
                         "one anomaly map with its mask per test image, in the same order.")


def _pixel_metrics(pixels: PixelMetrics | None, max_fpr: float) -> dict[str, float]:
    if pixels is None:
        return dict.fromkeys(("pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro"), math.nan)
    return pixels.compute(max_fpr)


def fpr_key(fpr: float) -> str:
    """Return the key suffix of a false-positive rate: its percentage, two digits when whole.

    0.1 gives ``"10"``, 0.05 gives ``"05"``, 0.01 gives ``"01"`` and 0.005 gives ``"0p5"``.
    """
    percent = fpr * 100
    if abs(percent - round(percent)) < _WHOLE_PERCENT_TOLERANCE:
        return f"{round(percent):02d}"
    return f"{percent:g}".replace(".", "p")


def _checked_fprs(fprs: Sequence[float]) -> np.ndarray:
    values = np.asarray(fprs, dtype=np.float64).reshape(-1)
    if values.size == 0 or not ((values > 0) & (values < 1)).all():
        raise ValueError(f"fprs must be false-positive rates in (0, 1), got {list(fprs)!r}; "
                         "for example (0.1, 0.05, 0.01).")
    keys = [fpr_key(v) for v in values]
    if len(set(keys)) != len(keys):
        raise ValueError(f"fprs must be distinct, got {list(fprs)!r}.")
    return values


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
