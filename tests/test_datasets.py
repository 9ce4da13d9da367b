"""Tests of dataset layout detection, sample collection and mask loading."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodpmm.features.datasets import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    Sample,
    detect_layout,
    load_mask,
    open_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (12, 10)  # (width, height)


def _data_root() -> Path:
    return Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))


def _write_image(path: Path, value: int = 128, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def _write_mask(path: Path, foreground: int = 255, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """Write a mask whose top-left 3x2 pixels are ``foreground`` and the rest 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:2, :3] = foreground
    Image.fromarray(array).save(path)
    return path


def _expected_mask(size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[:2, :3] = True
    return mask


def _write_images(folder: Path, count: int, prefix: str = "img") -> list[Path]:
    return [_write_image(folder / f"{prefix}_{i}.png", value=10 * i) for i in range(count)]


def _anomalous_with_masks(images: Path, masks: Path, count: int, mask_suffix: str = "") -> None:
    for path in _write_images(images, count, prefix="bad"):
        _write_mask(masks / f"{path.stem}{mask_suffix}.png")


def _build_brats(root: Path) -> None:
    _write_images(root / "train" / "good", 3)
    for split, (normal, anomalous) in {"valid": (2, 1), "test": (2, 3)}.items():
        _write_images(root / split / "good" / "img", normal)
        _anomalous_with_masks(root / split / "Ungood" / "img", root / split / "Ungood" / "label", anomalous)


def _build_resc(root: Path) -> None:
    _write_images(root / "Train" / "train" / "good", 3)
    for top, sub, (normal, anomalous) in (("Val", "val", (2, 1)), ("Test", "test", (2, 3))):
        _write_images(root / top / sub / "good", normal)
        _anomalous_with_masks(root / top / sub / "Ungood", root / top / f"{sub}_label" / "Ungood", anomalous)


def _build_liver(root: Path) -> None:
    _write_images(root / "train" / "good", 3)
    for split, (normal, anomalous) in {"valid": (2, 1), "test": (2, 3)}.items():
        _write_images(root / split / "img" / "good", normal)
        _anomalous_with_masks(root / split / "img" / "Ungood", root / split / "label" / "Ungood", anomalous)


def _build_mvtec(root: Path) -> None:
    _write_images(root / "train" / "good", 3)
    _write_images(root / "test" / "good", 2)
    _anomalous_with_masks(root / "test" / "crack", root / "ground_truth" / "crack", 2, "_mask")
    _anomalous_with_masks(root / "test" / "hole", root / "ground_truth" / "hole", 1, "_mask")


def _build_generic(root: Path) -> None:
    _write_images(root / "train", 3)
    _write_images(root / "test", 2, prefix="ok")
    _anomalous_with_masks(root / "test", root / "masks", 3)


BUILDERS = {
    "brats": _build_brats,
    "resc": _build_resc,
    "liver": _build_liver,
    "mvtec": _build_mvtec,
    "generic": _build_generic,
}
# Expected (normal, anomalous) counts per split of each fixture tree.
EXPECTED_COUNTS = {
    "brats": {"train": (3, 0), "valid": (2, 1), "test": (2, 3)},
    "resc": {"train": (3, 0), "valid": (2, 1), "test": (2, 3)},
    "liver": {"train": (3, 0), "valid": (2, 1), "test": (2, 3)},
    "mvtec": {"train": (3, 0), "test": (2, 3)},
    "generic": {"train": (3, 0), "test": (2, 3)},
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS)
def test_layout_detected(tmp_path, layout):
    BUILDERS[layout](tmp_path)
    assert detect_layout(tmp_path) == layout


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS)
def test_layout_counts(tmp_path, layout):
    BUILDERS[layout](tmp_path)
    dataset = open_dataset(tmp_path)
    assert dataset.layout == layout
    assert list(dataset.splits) == list(EXPECTED_COUNTS[layout])
    for name, (normal, anomalous) in EXPECTED_COUNTS[layout].items():
        assert dataset[name].counts == {"normal": normal, "anomalous": anomalous}, name


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS)
def test_layout_masks_attached(tmp_path, layout):
    BUILDERS[layout](tmp_path)
    test = open_dataset(tmp_path).test
    for sample in test:
        assert (sample.mask is not None) == (sample.label == 1), sample.image
    for sample in test:
        expected = _expected_mask() if sample.label else np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0]), bool)
        np.testing.assert_array_equal(load_mask(sample), expected, err_msg=str(sample.image))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS)
def test_layout_order_sorted(tmp_path, layout):
    BUILDERS[layout](tmp_path)
    dataset = open_dataset(tmp_path)
    for split in dataset.splits.values():
        relative = [sample.image.relative_to(dataset.root).as_posix() for sample in split]
        assert relative == sorted(relative), split.name


def test_layout_override_wrong(tmp_path):
    _build_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train split of the resc dataset .*Train/train/good"):
        open_dataset(tmp_path, layout="resc")


@pytest.mark.parametrize(
    ("built", "requested"),
    [("mvtec", "brats"), ("brats", "mvtec"), ("brats", "resc"), ("liver", "brats")],
    ids=["mvtec-as-brats", "brats-as-mvtec", "brats-as-resc", "liver-as-brats"],
)
def test_layout_wrong_suggests_match(tmp_path, built, requested):
    BUILDERS[built](tmp_path)
    with pytest.raises((FileNotFoundError, ValueError)) as error_info:
        open_dataset(tmp_path, layout=requested)
    message = str(error_info.value)
    assert re.search(rf"split of the {requested} dataset at {re.escape(str(tmp_path))}", message), message
    assert message.endswith(
        f"The folders match the {built} layout, so use layout {built} or leave the layout unset to detect it"
    )


def test_layout_wrong_without_match(tmp_path):
    _build_brats(tmp_path)
    (tmp_path / "valid" / "good" / "img").rename(tmp_path / "valid" / "good" / "images")
    (tmp_path / "valid" / "Ungood" / "img").rename(tmp_path / "valid" / "Ungood" / "images")
    with pytest.raises(FileNotFoundError) as error_info:
        open_dataset(tmp_path, layout="brats")
    assert "The folders match" not in str(error_info.value)


@pytest.mark.parametrize(
    ("name", "requested", "expected_folder", "suggested"),
    [
        ("lgg_flair", "mvtec", "lgg_flair/test/Ungood", "brats"),
        ("magnetic_tile", "brats", "magnetic_tile/test/good/img", "mvtec"),
    ],
    ids=["lgg-as-mvtec", "tile-as-brats"],
)
def test_real_layout_mismatch(name, requested, expected_folder, suggested):
    root = _data_root() / name
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set DINODPMM_DATA to the folder that contains {name}")
    with pytest.raises((FileNotFoundError, ValueError)) as error_info:
        open_dataset(root, layout=requested)
    message = str(error_info.value)
    assert expected_folder in message
    assert f"match the {suggested} layout, so use layout {suggested}" in message


def test_layout_override_kept(tmp_path):
    _build_brats(tmp_path)
    assert open_dataset(tmp_path, layout="brats").layout == "brats"


def test_layout_unknown(tmp_path):
    _build_brats(tmp_path)
    with pytest.raises(ValueError, match=r"layout must be one of brats, resc, liver, mvtec, generic, got 'bmad'"):
        open_dataset(tmp_path, layout="bmad")


def test_layout_undetectable(tmp_path):
    _write_images(tmp_path / "images", 2)
    with pytest.raises(ValueError, match=r"could not detect the layout .*images/.*pass layout="):
        open_dataset(tmp_path)


def test_root_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"dataset root {re.escape(str(missing))} does not exist"):
        open_dataset(missing)


def test_brats_valid_absent(tmp_path):
    _build_brats(tmp_path)
    for path in sorted((tmp_path / "valid").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "valid").rmdir()
    dataset = open_dataset(tmp_path)
    assert dataset.valid is None
    assert list(dataset.splits) == ["train", "test"]


def test_split_folder_missing(tmp_path):
    _build_brats(tmp_path)
    (tmp_path / "valid" / "good" / "img").rename(tmp_path / "valid" / "good" / "images")
    (tmp_path / "valid" / "Ungood" / "img").rename(tmp_path / "valid" / "Ungood" / "images")
    with pytest.raises(FileNotFoundError, match=r"valid split of the brats dataset .*valid/good/img"):
        open_dataset(tmp_path, layout="brats")


def test_split_empty(tmp_path):
    _build_mvtec(tmp_path)
    for path in (tmp_path / "train" / "good").iterdir():
        path.rename(path.with_suffix(".txt"))
    with pytest.raises(ValueError, match=r"train split of the mvtec dataset .* contains no images .*train/good"):
        open_dataset(tmp_path, layout="mvtec")


def test_mask_without_image(tmp_path):
    _build_brats(tmp_path)
    _write_mask(tmp_path / "test" / "Ungood" / "label" / "stray_slice.png")
    with pytest.raises(ValueError, match=r"1 mask\(s\) in .*test/Ungood/label have no image .*stray_slice\.png"):
        open_dataset(tmp_path)


def test_mask_without_image_mvtec_suffix(tmp_path):
    _build_mvtec(tmp_path)
    _write_mask(tmp_path / "ground_truth" / "crack" / "bad_0.png")
    with pytest.raises(ValueError, match=r"no image in .*test/crack: bad_0\.png\. .*followed by '_mask'"):
        open_dataset(tmp_path)


def test_mask_ambiguous_generic(tmp_path):
    _build_generic(tmp_path)
    _write_mask(tmp_path / "masks" / "bad_1_mask.tif")
    with pytest.raises(ValueError, match=r"bad_1\.png matches more than one mask: .*bad_1\.png, .*bad_1_mask\.tif"):
        open_dataset(tmp_path)


def test_mask_size_mismatch(tmp_path):
    _build_brats(tmp_path)
    mask_path = tmp_path / "test" / "Ungood" / "label" / "bad_0.png"
    _write_mask(mask_path, size=(IMAGE_SIZE[0] + 1, IMAGE_SIZE[1]))
    sample = next(sample for sample in open_dataset(tmp_path).test if sample.mask == mask_path)
    with pytest.raises(ValueError, match=r"mask .*label/bad_0\.png is 13x10 pixels but its image .*img/bad_0\.png is 12x10"):
        load_mask(sample)


@pytest.mark.parametrize(
    ("mode", "foreground"),
    [("L", 255), ("L", 1), ("1", 1), ("RGB", (0, 0, 1)), ("RGBA", (255, 0, 0, 255)), ("I;16", 1)],
    ids=["0-255", "0-1", "bilevel", "rgb-blue-1", "rgba", "uint16"],
)
def test_mask_values_nonzero(tmp_path, mode, foreground):
    image = _write_image(tmp_path / "image.png")
    mask_path = tmp_path / "mask.png"
    if isinstance(foreground, tuple):
        # Colour channels 0, alpha (the fourth channel) opaque.
        background = tuple(0 if i < 3 else 255 for i in range(len(foreground)))
    else:
        background = 0
    mask = Image.new(mode, IMAGE_SIZE, background)
    for x in range(3):
        for y in range(2):
            mask.putpixel((x, y), foreground)
    mask.save(mask_path)
    loaded = load_mask(Sample(image, mask_path, 1, "Ungood"))
    assert loaded.dtype == bool
    np.testing.assert_array_equal(loaded, _expected_mask())


def test_mask_palette_by_colour(tmp_path):
    image = _write_image(tmp_path / "image.png")
    mask = Image.new("P", IMAGE_SIZE, 0)
    # Index 0 is white and index 1 black, so the index alone would invert the mask.
    mask.putpalette([255, 255, 255, 0, 0, 0])
    mask.paste(1, (3, 0, IMAGE_SIZE[0], IMAGE_SIZE[1]))
    mask.paste(1, (0, 2, 3, IMAGE_SIZE[1]))
    mask.save(tmp_path / "mask.png")
    loaded = load_mask(Sample(image, tmp_path / "mask.png", 1, "Ungood"))
    np.testing.assert_array_equal(loaded, _expected_mask())


def test_mask_missing_normal(tmp_path):
    image = _write_image(tmp_path / "image.png", size=(7, 5))
    loaded = load_mask(Sample(image, None, 0, "good"))
    assert loaded.shape == (5, 7)
    assert not loaded.any()


def test_mask_missing_anomalous_warns(tmp_path, caplog):
    _build_brats(tmp_path)
    for name in ("bad_0.png", "bad_2.png"):
        (tmp_path / "test" / "Ungood" / "label" / name).unlink()
    with caplog.at_level(logging.WARNING, logger="dinodpmm.features.datasets"):
        dataset = open_dataset(tmp_path)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "2 of 3 anomalous images in the test split" in warnings[0]
    assert dataset.test.missing_masks == 2
    without_mask = [sample for sample in dataset.test if sample.label == 1 and sample.mask is None]
    assert not load_mask(without_mask[0]).any()


def test_extensions_case_insensitive(tmp_path):
    _build_generic(tmp_path)
    for extension in IMAGE_EXTENSIONS:
        image = Image.new("RGB", IMAGE_SIZE, (1, 2, 3))
        image.save(tmp_path / "train" / f"extra{extension.upper()}", format=Image.registered_extensions()[extension])
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "train" / ".hidden.png")
    assert len(open_dataset(tmp_path).train) == 3 + len(IMAGE_EXTENSIONS)


def test_generic_mask_rules(tmp_path):
    _write_images(tmp_path / "train", 2)
    for stem in ("plain", "suffixed", "empty", "unmasked"):
        _write_image(tmp_path / "test" / f"{stem}.png")
    _write_mask(tmp_path / "masks" / "plain.bmp", foreground=1)
    _write_mask(tmp_path / "masks" / "suffixed_mask.tif")
    _write_mask(tmp_path / "masks" / "empty.png", foreground=0)
    labels = {sample.image.stem: sample.label for sample in open_dataset(tmp_path).test}
    assert labels == {"empty": 0, "plain": 1, "suffixed": 1, "unmasked": 0}


def test_generic_custom_folders(tmp_path):
    _write_images(tmp_path / "normal_scans", 2)
    _write_images(tmp_path / "eval", 1)
    _anomalous_with_masks(tmp_path / "eval", tmp_path / "annotations", 2)
    dataset = open_dataset(
        tmp_path, layout="generic", train_dir="normal_scans", test_dir="eval", mask_dir="annotations"
    )
    assert dataset.counts == {"train": {"normal": 2, "anomalous": 0}, "test": {"normal": 1, "anomalous": 2}}


def test_mvtec_defect_types(tmp_path):
    _build_mvtec(tmp_path)
    test = open_dataset(tmp_path).test
    assert test.defect_counts == {"crack": 2, "good": 2, "hole": 1}
    assert [sample.label for sample in test if sample.defect == "good"] == [0, 0]


def test_split_repr_counts(tmp_path):
    _build_brats(tmp_path)
    dataset = open_dataset(tmp_path)
    assert repr(dataset.test) == "Split('test', 5 images: 2 normal, 3 anomalous)"
    assert "train=3+0, valid=2+1, test=2+3" in repr(dataset)
    assert "valid      3 images:      2 normal,      1 anomalous (Ungood 1, good 2)" in dataset.summary()
    np.testing.assert_array_equal(dataset.test.labels, [1, 1, 1, 0, 0])


def test_split_slicing(tmp_path):
    _build_brats(tmp_path)
    test = open_dataset(tmp_path).test
    head = test[:2]
    assert len(head) == 2
    assert head.name == "test"
    assert head[1] == test[1]


def test_dataset_missing_split_key(tmp_path):
    _build_mvtec(tmp_path)
    with pytest.raises(KeyError, match=r"split 'valid' is not in the mvtec dataset .*Available splits: train, test"):
        open_dataset(tmp_path)["valid"]


def test_real_lgg_flair():
    root = _data_root() / "lgg_flair"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set DINODPMM_DATA to the folder that contains lgg_flair")
    dataset = open_dataset(root)
    assert dataset.layout == "brats"
    assert dataset.counts == {
        "train": {"normal": 1475, "anomalous": 0},
        "valid": {"normal": 76, "anomalous": 43},
        "test": {"normal": 316, "anomalous": 172},
    }
    assert dataset.test.missing_masks == 0
    anomalous = next(sample for sample in dataset.test if sample.label == 1)
    assert load_mask(anomalous).any()


def test_real_magnetic_tile():
    root = _data_root() / "magnetic_tile"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set DINODPMM_DATA to the folder that contains magnetic_tile")
    dataset = open_dataset(root)
    assert dataset.layout == "mvtec"
    assert dataset.valid is None
    assert dataset.counts == {"train": {"normal": 667, "anomalous": 0}, "test": {"normal": 143, "anomalous": 196}}
    assert dataset.test.defect_counts == {
        "blowhole": 58,
        "break": 43,
        "crack": 29,
        "fray": 16,
        "good": 143,
        "uneven": 50,
    }
    assert dataset.test.missing_masks == 0
