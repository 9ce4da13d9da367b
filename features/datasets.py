"""Anomaly-detection dataset layouts: find the images, masks and labels of each split.

Supported layouts (``LAYOUTS``), all relative to the dataset root:

``brats``
    BMAD BraTS2021_slice: ``train/good/``, ``valid/good/img/``, ``valid/Ungood/img/``,
    ``valid/Ungood/label/``, and the same three image folders and one mask folder under
    ``test/``. A mask has the file name of its image.
``resc``
    BMAD RESC: ``Train/train/good/``, ``Val/val/{good,Ungood}/``,
    ``Val/val_label/Ungood/``, ``Test/test/{good,Ungood}/``, ``Test/test_label/Ungood/``.
    A mask has the file name of its image.
``liver``
    BMAD BTCV+LiTS: ``train/good/``, ``valid/img/{good,Ungood}/``, ``valid/label/Ungood/``,
    ``test/img/{good,Ungood}/``, ``test/label/Ungood/``. A mask has the file name of its
    image.
``mvtec``
    MVTec AD: ``train/good/``, ``test/<defect>/`` where the defect ``good`` is normal, and
    ``ground_truth/<defect>/<stem>_mask.<ext>``. There is no validation split.
``generic``
    ``train/`` (normal images only), ``test/`` and an optional ``masks/`` folder with the
    masks of test images. A mask's file name is the image's stem, optionally followed by
    ``_mask``, with any image extension: ``scan_07.png`` matches ``masks/scan_07.png`` or
    ``masks/scan_07_mask.tif``. A test image is anomalous when its mask has a nonzero
    pixel, and normal when it has no mask or an all-zero one. There is no validation
    split. :func:`open_dataset` accepts other folder names for this layout.

Image files have one of the extensions in ``IMAGE_EXTENSIONS`` (any case). Hidden files
(names starting with ``.``) are skipped. Samples are sorted by their path relative to the
root, so the order does not depend on the file system.

A mask pixel is anomalous when it is nonzero, so 0/1 and 0/255 masks both work. A normal
image has an all-zero mask. An anomalous image without a mask file also gets an all-zero
mask, and :func:`open_dataset` logs a warning with the count for each split where that
happens.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("brats", "resc", "liver", "mvtec", "generic")
SPLITS = ("train", "valid", "test")
NORMAL_DEFECT = "good"
# Defect type of anomalous images in the BMAD layouts (brats, resc, liver) and in generic.
BMAD_ANOMALOUS_DEFECT = "Ungood"
GENERIC_ANOMALOUS_DEFECT = "anomalous"
_MAX_LISTED_FILES = 5


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes
    ----------
    image : pathlib.Path
        Image file.
    mask : pathlib.Path or None
        Pixel-level annotation, or None when the image has no mask file.
    label : int
        0 for a normal image, 1 for an anomalous one.
    defect : str
        Defect type: ``"good"`` for normal images, the MVTec defect folder name,
        ``"Ungood"`` for anomalous images of the BMAD layouts, and ``"anomalous"`` for
        anomalous images of the ``generic`` layout.
    """

    image: Path
    mask: Path | None
    label: int
    defect: str


class Split(Sequence[Sample]):
    """The samples of one split in a deterministic order.

    Parameters
    ----------
    name : str
        ``"train"``, ``"valid"`` or ``"test"``.
    samples : sequence of Sample
        Samples in the order the split keeps.
    root : pathlib.Path
        Dataset root, used to print paths relative to it.
    """

    def __init__(self, name: str, samples: Sequence[Sample], root: Path) -> None:
        self.name = name
        self.root = root
        self.samples = tuple(samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Split: ...

    def __getitem__(self, index: int | slice) -> Sample | Split:
        if isinstance(index, slice):
            return Split(self.name, self.samples[index], self.root)
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def counts(self) -> dict[str, int]:
        """Number of ``"normal"`` and ``"anomalous"`` images."""
        anomalous = sum(sample.label for sample in self.samples)
        return {"normal": len(self.samples) - anomalous, "anomalous": anomalous}

    @property
    def defect_counts(self) -> dict[str, int]:
        """Number of images per defect type, in sorted order of the defect names."""
        return dict(sorted(Counter(sample.defect for sample in self.samples).items()))

    @property
    def missing_masks(self) -> int:
        """Number of anomalous images without a mask file."""
        return sum(1 for sample in self.samples if sample.label == 1 and sample.mask is None)

    @property
    def labels(self) -> np.ndarray:
        """Image labels, int64 of shape (num_images,): 0 normal, 1 anomalous."""
        return np.array([sample.label for sample in self.samples], dtype=np.int64)

    def __repr__(self) -> str:
        counts = self.counts
        return (
            f"Split({self.name!r}, {len(self)} images: "
            f"{counts['normal']} normal, {counts['anomalous']} anomalous)"
        )


class Dataset:
    """The splits of one dataset, as returned by :func:`open_dataset`.

    Attributes
    ----------
    root : pathlib.Path
        Dataset root.
    layout : str
        One of ``LAYOUTS``.
    splits : dict of str to Split
        The splits present, in the order ``train``, ``valid``, ``test``.
    """

    def __init__(self, root: Path, layout: str, splits: dict[str, Split]) -> None:
        self.root = root
        self.layout = layout
        self.splits = splits

    @property
    def train(self) -> Split:
        """Normal training images."""
        return self.splits["train"]

    @property
    def valid(self) -> Split | None:
        """Validation images, or None when the layout or the folder has none."""
        return self.splits.get("valid")

    @property
    def test(self) -> Split:
        """Test images, normal and anomalous."""
        return self.splits["test"]

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(
                f"split {name!r} is not in the {self.layout} dataset at {self.root}. "
                f"Available splits: {', '.join(self.splits)}"
            )
        return self.splits[name]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Normal and anomalous image counts per split."""
        return {name: split.counts for name, split in self.splits.items()}

    def summary(self) -> str:
        """Return a multi-line table of image counts per split and defect type."""
        lines = [f"{self.layout} dataset at {self.root}"]
        for name, split in self.splits.items():
            counts = split.counts
            defects = ", ".join(f"{defect} {n}" for defect, n in split.defect_counts.items())
            lines.append(
                f"  {name:<5} {len(split):>6} images: {counts['normal']:>6} normal, "
                f"{counts['anomalous']:>6} anomalous ({defects})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{name}={split.counts['normal']}+{split.counts['anomalous']}"
            for name, split in self.splits.items()
        )
        return f"Dataset(layout={self.layout!r}, root='{self.root}', {parts} normal+anomalous)"


@dataclass(frozen=True)
class _ImageFolder:
    """One folder of images with a shared label and an optional folder of their masks.

    ``label`` None means that the label comes from the mask: 1 for a mask with a
    nonzero pixel, else 0. ``mask_suffixes`` lists what may follow the image stem in a
    mask's stem.
    """

    images: Path
    label: int | None
    defect: str
    masks: Path | None = None
    mask_suffixes: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class _SplitSpec:
    """Location of one split: its top folder and the image folders inside it."""

    name: str
    top: Path
    folders: tuple[_ImageFolder, ...]
    required: bool


def is_image_file(path: Path) -> bool:
    """Return whether ``path`` names a visible file with an image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Return the image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and is_image_file(path))


def _bmad_split(name: str, top: Path, normal: Path, anomalous: Path, masks: Path) -> _SplitSpec:
    """Build a BMAD split: a normal folder, an anomalous folder and the anomalous masks."""
    folders = (
        _ImageFolder(normal, 0, NORMAL_DEFECT),
        _ImageFolder(anomalous, 1, BMAD_ANOMALOUS_DEFECT, masks),
    )
    return _SplitSpec(name, top, folders, required=name == "test")


def _train_split(folder: Path) -> _SplitSpec:
    return _SplitSpec("train", folder, (_ImageFolder(folder, 0, NORMAL_DEFECT),), required=True)


def _brats_splits(root: Path) -> list[_SplitSpec]:
    splits = [_train_split(root / "train" / "good")]
    for name in ("valid", "test"):
        top = root / name
        splits.append(
            _bmad_split(
                name,
                top,
                top / "good" / "img",
                top / "Ungood" / "img",
                top / "Ungood" / "label",
            )
        )
    return splits


def _resc_splits(root: Path) -> list[_SplitSpec]:
    splits = [_train_split(root / "Train" / "train" / "good")]
    for name, top_name, sub in (("valid", "Val", "val"), ("test", "Test", "test")):
        top = root / top_name
        splits.append(
            _bmad_split(
                name,
                top,
                top / sub / "good",
                top / sub / "Ungood",
                top / f"{sub}_label" / "Ungood",
            )
        )
    return splits


def _liver_splits(root: Path) -> list[_SplitSpec]:
    splits = [_train_split(root / "train" / "good")]
    for name in ("valid", "test"):
        top = root / name
        splits.append(
            _bmad_split(
                name,
                top,
                top / "img" / "good",
                top / "img" / "Ungood",
                top / "label" / "Ungood",
            )
        )
    return splits


def _mvtec_splits(root: Path) -> list[_SplitSpec]:
    test = root / "test"
    defects = sorted(path.name for path in test.iterdir() if path.is_dir()) if test.is_dir() else []
    folders = []
    for defect in defects:
        if defect == NORMAL_DEFECT:
            folders.append(_ImageFolder(test / defect, 0, NORMAL_DEFECT))
        else:
            masks = root / "ground_truth" / defect
            folders.append(_ImageFolder(test / defect, 1, defect, masks, ("_mask",)))
    return [_train_split(root / "train" / "good"), _SplitSpec("test", test, tuple(folders), True)]


def _generic_splits(root: Path, train_dir: str, test_dir: str, mask_dir: str) -> list[_SplitSpec]:
    masks = root / mask_dir
    test = _ImageFolder(
        root / test_dir, None, NORMAL_DEFECT, masks if masks.is_dir() else None, ("", "_mask")
    )
    return [_train_split(root / train_dir), _SplitSpec("test", root / test_dir, (test,), True)]


def _has_any_dir(*paths: Path) -> bool:
    return any(path.is_dir() for path in paths)


def _looks_like_brats(root: Path) -> bool:
    bmad = [root / split / kind / "img" for split in ("valid", "test") for kind in ("good", "Ungood")]
    return (root / "train" / "good").is_dir() and _has_any_dir(*bmad)


def _looks_like_liver(root: Path) -> bool:
    return (root / "train" / "good").is_dir() and _has_any_dir(
        root / "valid" / "img", root / "test" / "img"
    )


def _looks_like_mvtec(root: Path) -> bool:
    test = root / "test"
    if not (root / "train" / "good").is_dir() or not test.is_dir():
        return False
    return any(list_images(path) for path in test.iterdir() if path.is_dir())


def _looks_like_generic(root: Path) -> bool:
    return bool(list_images(root / "train")) and bool(list_images(root / "test"))


_DETECTORS: dict[str, Callable[[Path], bool]] = {
    "brats": _looks_like_brats,
    "resc": lambda root: (root / "Train" / "train").is_dir(),
    "liver": _looks_like_liver,
    "mvtec": _looks_like_mvtec,
    "generic": _looks_like_generic,
}


def detect_layout(root: str | Path) -> str:
    """Return the layout of the dataset at ``root`` from its folder structure.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a directory.
    ValueError
        If no layout or more than one layout matches.
    """
    root = _check_root(root)
    matches = [name for name, detect in _DETECTORS.items() if detect(root)]
    if len(matches) == 1:
        return matches[0]
    entries = sorted(path.name + ("/" if path.is_dir() else "") for path in root.iterdir())
    found = ", ".join(entries[:20]) or "nothing"
    if not matches:
        raise ValueError(
            f"could not detect the layout of the dataset at {root}, which contains: {found}. "
            f"Arrange it as one of {', '.join(LAYOUTS)} (see dinodpmm.features.datasets) "
            "or pass layout= explicitly"
        )
    raise ValueError(
        f"the dataset at {root} matches more than one layout ({', '.join(matches)}). "
        "Pass layout= explicitly"
    )


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist or is not a directory. "
            "Pass the folder that contains the train and test splits"
        )
    return root


def open_dataset(
    root: str | Path,
    layout: str | None = None,
    *,
    train_dir: str = "train",
    test_dir: str = "test",
    mask_dir: str = "masks",
) -> Dataset:
    """Find the images, masks and labels of every split of a dataset.

    Parameters
    ----------
    root : str or pathlib.Path
        Dataset root.
    layout : str, optional
        One of ``LAYOUTS``. Detected from the folder structure when None.
    train_dir, test_dir, mask_dir : str
        Folders of the ``generic`` layout, relative to ``root`` or absolute. Only the
        ``generic`` layout reads them.

    Returns
    -------
    Dataset
        ``train`` and ``test`` splits, plus ``valid`` where the layout has one and its
        folder exists.

    Raises
    ------
    FileNotFoundError
        If ``root`` or a required split folder is missing.
    ValueError
        If ``layout`` is unknown or undetectable, a split contains no images, a mask has
        no image, or an image matches more than one mask.
    """
    root = _check_root(root)
    if layout is None:
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}. "
            "Pass one of them, or None to detect it"
        )
    try:
        splits = _collect_splits(root, layout, train_dir, test_dir, mask_dir)
    except (FileNotFoundError, ValueError) as error:
        hint = _other_layout_hint(root, layout)
        if not hint:
            raise
        raise type(error)(f"{error}. {hint}") from None
    return Dataset(root, layout, splits)


def _collect_splits(root: Path, layout: str, train_dir: str, test_dir: str, mask_dir: str) -> dict[str, Split]:
    splits = {}
    for spec in _split_specs(root, layout, train_dir, test_dir, mask_dir):
        split = _collect_split(root, layout, spec)
        if split is not None:
            splits[spec.name] = split
    return splits


def _other_layout_hint(root: Path, layout: str) -> str:
    """Return a sentence naming the layouts other than ``layout`` that the folders match, or ""."""
    matches = [name for name, detect in _DETECTORS.items() if name != layout and detect(root)]
    if not matches:
        return ""
    if len(matches) == 1:
        return (
            f"The folders match the {matches[0]} layout, so use layout {matches[0]} or leave the "
            "layout unset to detect it"
        )
    return f"The folders match the layouts {', '.join(matches)}, so use the one that the data follows"


def _split_specs(
    root: Path, layout: str, train_dir: str, test_dir: str, mask_dir: str
) -> list[_SplitSpec]:
    if layout == "generic":
        return _generic_splits(root, train_dir, test_dir, mask_dir)
    builders = {
        "brats": _brats_splits,
        "resc": _resc_splits,
        "liver": _liver_splits,
        "mvtec": _mvtec_splits,
    }
    return builders[layout](root)


def _collect_split(root: Path, layout: str, spec: _SplitSpec) -> Split | None:
    """Return the split described by ``spec``, or None for an absent optional split."""
    present = [folder for folder in spec.folders if folder.images.is_dir()]
    if not spec.top.is_dir() and not spec.required:
        return None
    if not present:
        expected = ", ".join(str(folder.images) for folder in spec.folders) or f"{spec.top}/<defect>/"
        raise FileNotFoundError(
            f"the {spec.name} split of the {layout} dataset at {root} is missing because none "
            f"of {expected} exists. Create it or pass the correct layout"
        )
    samples = [sample for folder in present for sample in _collect_folder(folder)]
    if not samples:
        folders = ", ".join(str(folder.images) for folder in present)
        raise ValueError(
            f"the {spec.name} split of the {layout} dataset at {root} contains no images "
            f"(looked in {folders} for extensions {', '.join(IMAGE_EXTENSIONS)}). "
            "Add images, remove the empty folders, or pass the correct layout"
        )
    samples.sort(key=lambda sample: sample.image.relative_to(root).as_posix())
    split = Split(spec.name, samples, root)
    if split.missing_masks:
        logger.warning(
            "%d of %d anomalous images in the %s split of %s have no mask file, "
            "so their masks are all zero",
            split.missing_masks,
            split.counts["anomalous"],
            spec.name,
            root,
        )
    return split


def _collect_folder(folder: _ImageFolder) -> list[Sample]:
    images = list_images(folder.images)
    masks = _match_masks(folder, images)
    samples = []
    for image in images:
        mask = masks.get(image)
        label = folder.label
        defect = folder.defect
        if label is None:
            label = int(mask is not None and _mask_array(mask).any())
            defect = GENERIC_ANOMALOUS_DEFECT if label else NORMAL_DEFECT
        samples.append(Sample(image, mask, label, defect))
    return samples


def _match_masks(folder: _ImageFolder, images: list[Path]) -> dict[Path, Path]:
    """Map each image to its mask file, checking that every mask has exactly one image."""
    if folder.masks is None or not folder.masks.is_dir():
        return {}
    masks = list_images(folder.masks)
    masks_by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        masks_by_stem.setdefault(mask.stem, []).append(mask)
    matched: dict[Path, Path] = {}
    for image in images:
        candidates = [
            mask for suffix in folder.mask_suffixes for mask in masks_by_stem.get(image.stem + suffix, [])
        ]
        if len(candidates) > 1:
            raise ValueError(
                f"image {image} matches more than one mask: {', '.join(map(str, candidates))}. "
                "Keep one mask per image"
            )
        if candidates:
            matched[image] = candidates[0]
    orphans = sorted(set(masks) - set(matched.values()))
    if orphans:
        raise ValueError(
            f"{len(orphans)} mask(s) in {folder.masks} have no image in {folder.images}: "
            f"{_list_files(orphans)}. A mask's stem must be its image's stem followed by "
            f"{' or '.join(repr(suffix) for suffix in folder.mask_suffixes)}. "
            "Rename or remove these masks, or add the images"
        )
    return matched


def _list_files(paths: Sequence[Path]) -> str:
    listed = ", ".join(path.name for path in paths[:_MAX_LISTED_FILES])
    if len(paths) > _MAX_LISTED_FILES:
        listed += f" and {len(paths) - _MAX_LISTED_FILES} more"
    return listed


def image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of an image file, reading only its header."""
    with Image.open(path) as image:
        return image.size


def _mask_array(path: Path) -> np.ndarray:
    """Read a mask file as bool of shape (height, width): True where any channel is nonzero.

    Alpha channels are ignored, and palette images are compared by colour, not by index.
    """
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        array = np.asarray(image)
        has_alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa")
    if has_alpha:
        array = array[..., :-1]
    nonzero = array != 0
    if nonzero.ndim == 3:
        nonzero = nonzero.any(axis=-1)
    return nonzero


def load_mask(sample: Sample) -> np.ndarray:
    """Load the pixel-level annotation of a sample.

    Parameters
    ----------
    sample : Sample
        A sample of a split.

    Returns
    -------
    np.ndarray of bool, shape (height, width)
        True at anomalous pixels, the image's size. All False when ``sample.mask`` is
        None.

    Raises
    ------
    ValueError
        If the mask and the image differ in size.
    """
    width, height = image_size(sample.image)
    if sample.mask is None:
        return np.zeros((height, width), dtype=bool)
    mask = _mask_array(sample.mask)
    if mask.shape != (height, width):
        raise ValueError(
            f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
            f"{sample.image} is {width}x{height}. Resize the mask to the image's size"
        )
    return mask
