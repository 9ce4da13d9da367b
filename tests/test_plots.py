"""Tests of the figure helpers."""

import numpy as np
import pytest
from PIL import Image

from dinodpmm.experiments import plots


def _case(height, width):
    rng = np.random.default_rng(0)
    mask = np.zeros((height, width), dtype=bool)
    mask[: height // 4, : width // 4] = True
    return {"title": "case", "image": rng.random((height, width)), "mask": mask,
            "maps": {"dpmm": rng.random((height, width))}}


def test_display_size_shrinks_large_image():
    shrunk = plots._display_size(_case(3000, 2000))
    assert shrunk["image"].shape == (1000, 667)
    assert shrunk["mask"].shape == (1000, 667)
    assert shrunk["maps"]["dpmm"].shape == (1000, 667)
    assert shrunk["mask"][:250, :166].all()


def test_display_size_keeps_small_image():
    case = _case(448, 300)
    assert plots._display_size(case)["image"] is case["image"]


def test_overlay_of_large_image(tmp_path):
    path = plots.plot_overlays([_case(4100, 900)], tmp_path / "overlay.png", "backbone: test")
    assert path.stat().st_size > 0


@pytest.mark.parametrize(("side", "stride"), [(1024, 1), (1025, 2), (2048, 2), (2049, 3)],
                         ids=["limit", "above", "double", "above-double"])
def test_display_stride_boundaries(side, stride):
    assert plots.display_stride(side, 10) == stride
    assert plots.display_stride(10, side) == stride


def test_display_size_keeps_thin_defect():
    case = _case(3000, 2000)
    case["mask"][:] = False
    case["mask"][1001, :] = True  # one row, skipped by a stride of 3 starting at row 0
    shrunk = plots._display_size(case)
    assert shrunk["mask"][333].all()
    assert shrunk["mask"].sum() == shrunk["mask"].shape[1]


@pytest.mark.parametrize("mode", ["L", "I;16"], ids=["8bit", "16bit"])
def test_display_image_reduces_large(mode):
    array = np.zeros((2100, 900), dtype=np.uint16 if mode == "I;16" else np.uint8)
    array[:, 450:] = 200
    image = Image.fromarray(array)
    assert image.mode == mode
    display = plots.display_image(image)
    assert display.shape == (700, 300)
    assert display.min() == 0.0
    assert display.max() == 1.0
