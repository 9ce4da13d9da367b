"""Tests of the image and pixel metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from dinodpmm.experiments.metrics import (
    PixelMetrics,
    evaluate,
    fpr_key,
    image_auroc,
    thresholds_from_normal,
)

EPS = np.finfo(np.float64).eps
METRIC_KEYS = ("pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro")


def random_maps(seed: int, num_images: int, height: int, width: int, levels: int = 6):
    """Return integer-valued float32 maps (many ties) and masks with blob-shaped regions."""
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, levels, size=(num_images, height, width)).astype(np.float32)
    blobs = ndimage.uniform_filter(rng.random((num_images, height, width)), size=(1, 3, 3))
    masks = blobs > np.quantile(blobs, 0.8)
    # Anomalous pixels score higher on average, so the metrics are away from 0.5.
    maps += masks * rng.integers(0, 3, size=masks.shape)
    return maps, masks


def accumulate(maps, masks, chunk_size: int = 2**21) -> PixelMetrics:
    pixels = PixelMetrics(chunk_size=chunk_size)
    for heat, mask in zip(maps, masks):
        pixels.update(heat, mask)
    return pixels


def f1_max_sklearn(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


def aupro_reference(maps, masks, max_fpr: float = 0.3) -> float:
    """Evaluate PRO region by region at every distinct threshold, then integrate."""
    regions = []
    for heat, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [heat[labelled == r] for r in range(1, count + 1)]
    normal = np.concatenate([heat[~mask] for heat, mask in zip(maps, masks)])
    fpr, pro = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fpr.append(np.mean(normal >= threshold))
        pro.append(np.mean([np.mean(region >= threshold) for region in regions]))
    return area_to_limit(np.array(fpr), np.array(pro), max_fpr) / max_fpr


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Return the trapezoid area under the increasing curve (x, y) from x[0] to ``limit``."""
    last = np.flatnonzero(x <= limit)[-1]
    xs, ys = list(x[: last + 1]), list(y[: last + 1])
    if x[last] < limit:
        xs.append(limit)
        ys.append(np.interp(limit, x[last : last + 2], y[last : last + 2]))
    return float(np.trapezoid(ys, xs))


# -- agreement with scikit-learn ---------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "num_images", "height", "width"),
    [(0, 1, 5, 7), (1, 3, 16, 16), (2, 8, 20, 13), (3, 2, 64, 64)],
    ids=["tiny", "small", "odd", "larger"],
)
def test_pixel_metrics_match_sklearn(seed, num_images, height, width):
    maps, masks = random_maps(seed, num_images, height, width)
    result = accumulate(maps, masks, chunk_size=37).compute()
    labels, scores = masks.ravel(), maps.ravel()
    tolerance = labels.size * EPS

    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=tolerance)
    assert result["pixel_aupr"] == pytest.approx(average_precision_score(labels, scores), abs=tolerance)
    assert result["pixel_f1_max"] == pytest.approx(f1_max_sklearn(labels, scores), abs=tolerance)


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_aupro_matches_region_loop(seed):
    maps, masks = random_maps(seed, 3, 24, 24, levels=40)
    result = accumulate(maps, masks, chunk_size=50).compute()
    assert result["aupro"] == pytest.approx(aupro_reference(maps, masks), abs=maps.size * EPS)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 1000, 2**21], ids=["c1", "c2", "c7", "c1000", "default"])
def test_chunk_size_invariance(chunk_size):
    maps, masks = random_maps(4, 4, 15, 11, levels=3)  # few levels: tie runs cross chunks
    expected = accumulate(maps, masks, chunk_size=maps.size).compute()
    result = accumulate(maps, masks, chunk_size=chunk_size).compute()
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(expected[key], abs=maps.size * EPS), key


@pytest.mark.parametrize(("seed", "size"), [(0, 10), (1, 57), (2, 400)], ids=["n10", "n57", "n400"])
def test_image_auroc_matches_sklearn(seed, size):
    rng = np.random.default_rng(seed)
    labels = rng.random(size) < 0.4
    labels[:2] = [True, False]
    scores = np.round(rng.normal(size=size) + labels, 1)  # rounding makes ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=size * EPS)


def test_image_auroc_one_class_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="dinodpmm.experiments.metrics"):
        value = image_auroc(np.zeros(5, dtype=bool), np.arange(5.0))
    assert math.isnan(value)
    assert "image AUROC is undefined" in caplog.text


# -- AUPRO by hand -------------------------------------------------------------------------


def test_aupro_perfect_detector():
    maps, masks = random_maps(5, 3, 12, 12)
    perfect = np.where(masks, 2.0, 1.0) + 0.1 * maps  # every anomalous pixel above every normal
    assert accumulate(perfect, masks).compute()["aupro"] == pytest.approx(1.0, abs=perfect.size * EPS)


def test_aupro_known_curve():
    # Region A (2 px) scores 10; region B (4 px) scores 8, 8, 5, -1; the 10 normal pixels
    # score 9, 7, 6 and seven times 0. PRO is 0.5 for FPR in [0, 0.1] and 0.75 on
    # [0.1, 0.3], then jumps to 0.875 at 0.3: area 0.05 + 0.15 = 0.2.
    heat = np.array([[10, 10, 9, 8, 8, 5, -1, 7, 6, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    truth = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    pixels = PixelMetrics()
    pixels.update(heat, truth)
    assert pixels.num_regions == 2
    assert pixels.compute()["aupro"] == pytest.approx(0.2 / 0.3, abs=heat.size * EPS)


def test_aupro_interpolates_at_limit():
    # One region of 2 px: one at 10, one tied at 5 with 4 of 10 normals; 6 normals at 0.
    # The tie group moves (0, 0.5) to (0.4, 1.0); at FPR 0.3 PRO is 0.875.
    heat = np.array([[10, 5, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    truth = np.array([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    pixels = PixelMetrics()
    pixels.update(heat, truth)
    assert pixels.compute()["aupro"] == pytest.approx(0.3 * (0.5 + 0.875) / 2 / 0.3, abs=12 * EPS)


def test_regions_use_eight_connectivity():
    pixels = PixelMetrics()
    pixels.update(np.arange(9.0).reshape(3, 3), np.eye(3))  # a diagonal line
    assert pixels.num_regions == 1


def test_single_region_pro_is_recall():
    # With one region PRO is the pixel recall, so AUPRO is the ROC area up to 0.3 over 0.3.
    maps, _ = random_maps(6, 1, 30, 30, levels=50)
    truth = np.zeros((1, 30, 30), dtype=bool)
    truth[0, 10:20, 5:15] = True
    maps[truth] += 10
    fpr, tpr, _ = roc_curve(truth.ravel(), maps.ravel())
    expected = area_to_limit(fpr, tpr, 0.3) / 0.3
    assert accumulate(maps, truth).compute()["aupro"] == pytest.approx(expected, abs=maps.size * EPS)


# -- undefined cases -------------------------------------------------------------------


def test_all_normal_masks_nan(caplog):
    maps, _ = random_maps(7, 2, 8, 8)
    with caplog.at_level(logging.WARNING, logger="dinodpmm.experiments.metrics"):
        result = accumulate(maps, np.zeros_like(maps, dtype=bool)).compute()
    for key in METRIC_KEYS:
        assert math.isnan(result[key]), key
    assert "0 of 128 pixels" in caplog.text


def test_all_anomalous_masks(caplog):
    maps, _ = random_maps(8, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="dinodpmm.experiments.metrics"):
        result = accumulate(maps, np.ones_like(maps, dtype=bool)).compute()
    assert math.isnan(result["pixel_auroc"])
    assert math.isnan(result["aupro"])
    assert result["pixel_aupr"] == pytest.approx(1.0)
    assert "pixel AUROC and AUPRO undefined" in caplog.text


def test_evaluate_all_normal_set(caplog):
    maps, _ = random_maps(9, 3, 8, 8)
    pixels = accumulate(maps, np.zeros_like(maps, dtype=bool))
    with caplog.at_level(logging.WARNING, logger="dinodpmm.experiments.metrics"):
        result = evaluate([0.1, 0.2, 0.3], [False, False, False], pixels, normal_scores=np.arange(100.0))
    for key in ("image_auroc", *METRIC_KEYS, "dice_fpr10", "dice_fpr05", "dice_fpr01"):
        assert math.isnan(result[key]), key
    assert result["threshold_fpr10"] == pytest.approx(np.quantile(np.arange(100.0), 0.9))


# -- Dice at thresholds --------------------------------------------------------------


def test_dice_by_hand():
    first = np.array([[0.9, 0.6], [0.2, 0.1]], dtype=np.float32)
    first_mask = np.array([[1, 1], [0, 0]], dtype=np.uint8) * 255
    second = np.array([[0.7, 0.3], [0.8, 0.4]], dtype=np.float32)
    second_mask = np.array([[0, 0], [1, 0]], dtype=np.uint8)
    pixels = PixelMetrics()
    pixels.update(first, first_mask)
    pixels.update(second, second_mask)
    # t = 0.65: predicted {0.9, 0.7, 0.8}; TP = 2 (0.9, 0.8), FP = 1, FN = 1 (0.6) -> 4 / 6.
    # t = 0.5:  predicted {0.9, 0.6, 0.7, 0.8}; TP = 3, FP = 1, FN = 0 -> 6 / 7.
    # t = 0.95: nothing predicted; TP = 0 -> 0.
    dice = pixels.dice([0.65, 0.5, 0.95])
    assert dice[0] == pytest.approx(4 / 6)
    assert dice[1] == pytest.approx(6 / 7)
    assert dice[2] == 0.0


def test_dice_threshold_inclusive():
    pixels = PixelMetrics()
    pixels.update(np.array([[1.0, 0.0]]), np.array([[1, 0]]))
    assert pixels.dice([1.0])[0] == 1.0


@pytest.mark.parametrize("fpr", [0.1, 0.05, 0.01, 0.25], ids=["fpr10", "fpr05", "fpr01", "fpr25"])
def test_thresholds_leave_fpr_above(fpr):
    scores = np.random.default_rng(0).permutation(1000).astype(np.float64)
    threshold = thresholds_from_normal(scores, [fpr])[0]
    assert np.count_nonzero(scores >= threshold) == round(fpr * 1000)


def test_thresholds_reject_bad_fpr():
    with pytest.raises(ValueError, match=r"fprs must be false-positive rates in \(0, 1\), got \[0.1, 1.0\]"):
        thresholds_from_normal(np.arange(10.0), [0.1, 1.0])


def test_fpr_key_names():
    assert [fpr_key(f) for f in (0.1, 0.05, 0.01, 0.005)] == ["10", "05", "01", "0p5"]


# -- evaluate ---------------------------------------------------------------------------


def test_evaluate_keys_and_values():
    maps, masks = random_maps(10, 4, 16, 16)
    pixels = accumulate(maps, masks)
    image_scores = maps.reshape(4, -1).max(1)
    labels = masks.reshape(4, -1).any(1)
    normal = np.random.default_rng(1).normal(3, 1, 500)
    result = evaluate(image_scores, labels, pixels, normal)
    expected_keys = {
        "image_auroc", "pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro",
        "dice_fpr10", "dice_fpr05", "dice_fpr01",
        "threshold_fpr10", "threshold_fpr05", "threshold_fpr01",
        "num_images", "num_anomalous_images", "num_pixels", "num_anomalous_pixels", "num_regions",
    }
    assert set(result) == expected_keys
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    thresholds = thresholds_from_normal(normal)
    assert result["dice_fpr05"] == pytest.approx(pixels.dice(thresholds)[1])
    assert result["num_pixels"] == maps.size
    assert result["num_anomalous_pixels"] == int(masks.sum())


def test_evaluate_without_normal_scores(caplog):
    maps, masks = random_maps(11, 2, 8, 8)
    with caplog.at_level(logging.WARNING, logger="dinodpmm.experiments.metrics"):
        result = evaluate([0.0, 1.0], [False, True], accumulate(maps, masks))
    assert math.isnan(result["dice_fpr10"])
    assert math.isnan(result["threshold_fpr01"])
    assert "no normal validation scores" in caplog.text


# -- input validation ------------------------------------------------------------------


def test_update_shape_mismatch_names_image():
    pixels = PixelMetrics()
    pixels.update(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"image 1: anomaly_map and mask must be 2-D arrays of equal shape"):
        pixels.update(np.zeros((4, 4)), np.zeros((4, 5)))


def test_update_rejects_nan_score():
    heat = np.zeros((3, 3))
    heat[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"image 0: anomaly_map must be finite, but 1 pixels are NaN"):
        PixelMetrics().update(heat, np.zeros((3, 3)))


def test_update_rejects_nan_mask():
    mask = np.zeros((3, 3))
    mask[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image 0: mask contains NaN"):
        PixelMetrics().update(np.zeros((3, 3)), mask)


def test_update_accepts_stack():
    maps, masks = random_maps(12, 3, 6, 6)
    pixels = PixelMetrics()
    pixels.update(maps, masks.astype(np.uint8) * 255)
    assert pixels.num_images == 3
    assert pixels.num_anomalous_pixels == int(masks.sum())


def test_update_stack_length_mismatch():
    pixels = PixelMetrics()
    pixels.update(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"anomaly_map is a stack of 3 images but mask of 2 \(images from index 1\)"):
        pixels.update(np.zeros((3, 4, 4)), np.zeros((2, 4, 4)))
    assert pixels.num_images == 1


@pytest.mark.parametrize(
    ("num_scores", "num_labels", "num_maps", "message"),
    [
        (4, 3, 4, "4 in image_scores, 3 in image_labels, 4 in pixels"),
        (4, 4, 3, "4 in image_scores, 4 in image_labels, 3 in pixels"),
        (5, 4, 4, "5 in image_scores, 4 in image_labels, 4 in pixels"),
    ],
    ids=["labels", "maps", "scores"],
)
def test_evaluate_counts_mismatch(num_scores, num_labels, num_maps, message):
    maps, masks = random_maps(13, num_maps, 6, 6)
    labels = np.resize([False, True], num_labels)
    with pytest.raises(ValueError, match=rf"the test set sizes differ: {re.escape(message)}"):
        evaluate(np.arange(num_scores, dtype=float), labels, accumulate(maps, masks))


def test_evaluate_counts_mismatch_without_pixels():
    with pytest.raises(ValueError, match=r"the test set sizes differ: 3 in image_scores, 2 in image_labels;"):
        evaluate([0.1, 0.2, 0.3], [0, 1])


@pytest.mark.parametrize(
    "labels",
    [
        np.array([False, True, False, True, True]),
        np.array([0, 1, 0, 1, 1]),
        np.array([0.0, 1.0, 0.0, 1.0, 1.0]),
        torch.tensor([False, True, False, True, True]),
        [0, 1, 0, 1, 1],
    ],
    ids=["bool", "int", "float", "tensor", "list"],
)
def test_image_auroc_label_types(labels):
    scores = np.array([0.3, 0.5, 0.1, 0.2, 0.9])
    expected = roc_auc_score([0, 1, 0, 1, 1], scores)
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=5 * EPS)


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        ([1, -1, 1, -1], "-1, 1"),
        ([0, 255, 0, 255], "0, 255"),
        ([0, 1, 2, 1], "0, 1, 2"),
        ([0.0, float("nan"), 1.0, 1.0], "0, 1, nan"),
    ],
    ids=["sklearn", "png", "three", "nan"],
)
def test_labels_outside_zero_one(labels, found):
    scores = [0.1, 0.2, 0.3, 0.4]
    message = rf"must be 0 for normal and 1 for anomalous images .* contain the values {found};"
    with pytest.raises(ValueError, match=rf"^labels {message}"):
        image_auroc(labels, scores)
    with pytest.raises(ValueError, match=rf"^image_labels {message}"):
        evaluate(scores, labels)


def test_labels_not_numeric():
    with pytest.raises(TypeError, match=r"labels must be booleans or the numbers 0 \(normal\) and 1 \(anomalous\)"):
        image_auroc(["good", "bad"], [0.1, 0.2])


def test_compute_without_images():
    with pytest.raises(ValueError, match=r"no images were added"):
        PixelMetrics().compute()


def test_compute_twice_and_update_after():
    maps, masks = random_maps(13, 4, 8, 8)
    pixels = accumulate(maps[:2], masks[:2])
    pixels.compute()
    for heat, mask in zip(maps[2:], masks[2:]):
        pixels.update(heat, mask)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixels.compute()["pixel_auroc"] == pytest.approx(expected, abs=maps.size * EPS)


# -- beyond float32 integer precision -------------------------------------------------------


def exact_curve_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return AUROC and AP of integer scores from per-value counts, the AUROC in integer arithmetic."""
    values = scores.astype(np.int64)
    positive = np.bincount(values[labels], minlength=values.max() + 1)[::-1].astype(np.int64)
    total = np.bincount(values, minlength=values.max() + 1)[::-1].astype(np.int64)
    negative = total - positive
    present = total > 0
    positive, negative = positive[present], negative[present]
    tp, fp = np.cumsum(positive), np.cumsum(negative)
    tp_prev, fp_prev = tp - positive, fp - negative
    auc_twice = sum(int(d) * int(s) for d, s in zip(fp - fp_prev, tp + tp_prev))
    auroc = auc_twice / (2 * int(tp[-1]) * int(fp[-1]))
    ap = float(np.sum(positive * (tp / (tp + fp)))) / int(tp[-1])
    return auroc, ap


def test_counts_beyond_float32_precision():
    # 2**24 + 3 pixels: float32 cannot count past 2**24 exactly, int64 must.
    num_pixels = 2**24 + 3
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 1000, num_pixels).astype(np.float32)
    labels = rng.random(num_pixels) < 0.01 * (1 + scores / 250)
    pixels = PixelMetrics()
    pixels.update(scores.reshape(1, -1), labels.reshape(1, -1))
    result = pixels.compute()
    auroc, ap = exact_curve_metrics(scores, labels)
    assert pixels.num_pixels == num_pixels
    assert result["pixel_auroc"] == pytest.approx(auroc, abs=1e3 * EPS)
    assert result["pixel_aupr"] == pytest.approx(ap, abs=1e3 * EPS)


# -- real brain MRI masks ----------------------------------------------------------------


def test_real_masks_end_to_end(lgg_root):
    # Mean FLAIR intensity per 16 px patch as the patch score. Tumours are hyperintense,
    # so this simple baseline detects part of them and its AUPRO lies inside (0, 1).
    from PIL import Image

    from dinodpmm.experiments.scoring import anomaly_map, image_score

    anomalous = sorted((lgg_root / "test" / "Ungood" / "img").glob("*.png"))[:12]
    normal = sorted((lgg_root / "test" / "good" / "img").glob("*.png"))[:12]
    pixels, maps, masks, image_values = PixelMetrics(), [], [], []
    for path in anomalous + normal:
        image = np.asarray(Image.open(path), dtype=np.float32) / 255
        label_path = lgg_root / "test" / "Ungood" / "label" / path.name
        mask = np.asarray(Image.open(label_path)) if path in anomalous else np.zeros(image.shape, np.uint8)
        patches = image.reshape(16, 16, 16, 16).mean(axis=(1, 3)).reshape(-1)
        heat = anomaly_map(patches, (16, 16), image.shape, sigma=4.0)
        pixels.update(heat, mask)
        maps.append(heat)
        masks.append(mask > 0)
        image_values.append(image_score(patches))
    labels = [True] * len(anomalous) + [False] * len(normal)
    result = evaluate(image_values, labels, pixels, normal_scores=np.concatenate(maps[len(anomalous):]))
    all_masks, all_maps = np.concatenate(masks).ravel(), np.concatenate(maps).ravel()
    assert pixels.num_regions >= len(anomalous)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, image_values), abs=24 * EPS)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(all_masks, all_maps), abs=all_maps.size * EPS)
    assert result["pixel_aupr"] == pytest.approx(average_precision_score(all_masks, all_maps), abs=all_maps.size * EPS)
    assert 0.0 < result["aupro"] < 1.0
    # A higher fpr leaves more normal scores above the threshold, so the threshold is lower.
    assert result["threshold_fpr10"] <= result["threshold_fpr05"] <= result["threshold_fpr01"]
    for key in ("dice_fpr10", "dice_fpr05", "dice_fpr01"):
        assert 0.0 <= result[key] <= 1.0, key
