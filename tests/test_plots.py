"""Tests of the figure helpers."""

import numpy as np

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
