"""The eight benchmarks of the paper in their MMSegmentation layouts, and a generic folder dataset.

A dataset is a list of :class:`Sample` (an id, an image path and a label path) with its class
names and label conventions. Nothing here loads an image: the segmenter reads ``image_path``.
``Sample.load_label`` reads the label PNG keeping palette indices and applies
reduce-zero-label (0 -> 255, others minus one) where the benchmark uses it.

Layouts (``data_root`` holds the dataset folders below, or is one of them itself)::

    VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/val.txt}
    VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext/val.txt}
    coco_stuff164k/{images,annotations}/val2017  (labels <stem>_labelTrainIds.png and
                                                  <stem>_instanceTrainIds.png; see convert.py)
    ADEChallengeData2016/{images,annotations}/validation  (also found under ade/)
    cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png,
    cityscapes/gtFine/val/<city>/*_gtFine_labelTrainIds.png
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import UNKNOWN
from ..errors import DatasetError, ImageError
from ..pipeline.image import IMAGE_SUFFIXES, load_label_map
from ..vocab import check_class_names, load_class_names

__all__ = [
    "Sample",
    "SegmentationDataset",
    "FolderDataset",
    "DATASETS",
    "get_dataset",
    "benchmark_classes",
    "reduce_zero_label",
    "read_label",
    "dataset_dir",
]

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its ground truth.

    Attributes:
        id: Unique name of the sample within its dataset (the file stem for most layouts).
        image_path: The RGB image (not loaded here).
        label_path: The label PNG (palette or greyscale indices).
        reduce_zero_label: Whether ``load_label`` maps 0 -> 255 and shifts other labels by -1.
    """

    id: str
    image_path: Path
    label_path: Path
    reduce_zero_label: bool = False

    def load_label(self) -> np.ndarray:
        """Read the ground truth.

        Returns:
            ``(H, W)`` int64 class indices, 255 for ignored pixels, with reduce-zero-label
            applied when the dataset uses it.

        Raises:
            DatasetError: The file is missing, unreadable or not a single-channel label map.
        """
        label = read_label(self.label_path)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return label


def read_label(path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` int64 label values as stored (``load_label_map``), with a
    ``DatasetError`` for a missing or unusable file."""
    try:
        return load_label_map(path).numpy()
    except ImageError as err:
        raise DatasetError(str(err)) from None


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSegmentation's reduce-zero-label: 0 -> 255, 255 stays 255, other values minus one.

    Args:
        label: ``(H, W)`` integer labels.

    Returns:
        ``(H, W)`` int64 labels.
    """
    label = np.asarray(label, dtype=np.int64)
    out = label - 1
    out[(label == 0) | (label == UNKNOWN)] = UNKNOWN
    return out


class SegmentationDataset(Sequence):
    """An ordered list of samples with the class names and label conventions of a benchmark.

    Args:
        name: Short name (``"voc"``, ``"folder"``, ...).
        samples: The samples, in evaluation order.
        classes: Class names, index = label value; ``;`` separates synonyms.
        ignore_index: Label value that is ignored in evaluation.
        reduce_zero_label: Whether the samples' labels were shifted down by one (0 -> 255).
        root: The dataset folder, for messages and records.
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample],
        classes: Sequence[str],
        *,
        ignore_index: int = UNKNOWN,
        reduce_zero_label: bool = False,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.name = name
        self.samples = list(samples)
        self.classes = check_class_names(classes, source=f"dataset {name!r}")
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SegmentationDataset(
                self.name,
                self.samples[index],
                self.classes,
                ignore_index=self.ignore_index,
                reduce_zero_label=self.reduce_zero_label,
                root=self.root,
            )
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        return self.samples[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, "
            f"classes={len(self.classes)}, root={str(self.root)!r})"
        )


class FolderDataset(SegmentationDataset):
    """Images and label masks in two folders, matched by file stem.

    Args:
        images_dir: Folder of images (jpg, png, bmp, tif, webp; not recursive).
        masks_dir: Folder of label masks ``<stem>.png`` (or bmp/tif), palette or greyscale.
        class_names: The class names (index = label value), or a class-name file
            (one name per line, ``;`` synonyms, blank lines and ``#`` comments skipped).
        ignore_index: Ignored label value.
        reduce_zero_label: Map 0 -> 255 and shift the other labels down by one on load.
        name: Name recorded on the dataset.

    Raises:
        DatasetError: A folder is missing, holds no images, or an image has no mask.
        ClassNamesError: The class list is empty or has empty or duplicate names.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        class_names: Sequence[str] | str | os.PathLike,
        *,
        ignore_index: int = UNKNOWN,
        reduce_zero_label: bool = False,
        name: str = "folder",
    ) -> None:
        if isinstance(class_names, (str, os.PathLike)):
            class_names = load_class_names(class_names)
        images_dir, masks_dir = Path(images_dir), Path(masks_dir)
        for what, folder in (("images folder", images_dir), ("masks folder", masks_dir)):
            if not folder.is_dir():
                raise DatasetError(f"{what} not found: expected {folder}")
        masks = _files_by_stem(masks_dir, MASK_EXTENSIONS)
        samples = []
        for stem, image_path in _files_by_stem(images_dir, IMAGE_SUFFIXES).items():
            if stem not in masks:
                raise DatasetError(
                    f"image {image_path} has no mask: expected {masks_dir / (stem + '.png')}"
                )
            samples.append(Sample(stem, image_path, masks[stem], reduce_zero_label))
        if not samples:
            raise DatasetError(
                f"no images found in {images_dir} (extensions: {', '.join(IMAGE_SUFFIXES)})"
            )
        super().__init__(
            name,
            samples,
            class_names,
            ignore_index=ignore_index,
            reduce_zero_label=reduce_zero_label,
            root=images_dir.parent,
        )


def _files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in extensions:
            continue
        if path.stem in files:
            raise DatasetError(
                f"two files share the stem {path.stem!r}: {files[path.stem]}, {path}"
            )
        files[path.stem] = path
    return files


# ---------------------------------------------------------------------------------------------
# Class names


def benchmark_classes(name: str) -> list[str]:
    """The class names of a benchmark (``lposs/data/class_names.json``, METHOD.md conventions)."""
    table = _class_table()
    if name not in table:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(sorted(table))}")
    return list(table[name])


@functools.lru_cache(maxsize=1)
def _class_table() -> dict[str, tuple[str, ...]]:
    text = resources.files("lposs").joinpath("data/class_names.json").read_text(encoding="utf-8")
    return {name: tuple(classes) for name, classes in json.loads(text).items()}


# ---------------------------------------------------------------------------------------------
# The benchmarks


def dataset_dir(
    data_root,
    candidates: Sequence[str],
    marker: str,
    title: str,
    *,
    alternatives: Sequence[str] = (),
) -> tuple[Path, str]:
    """Find the dataset folder: the first ``data_root/<candidate>`` holding ``marker``.

    Returns the folder and the marker found (``marker`` or one of ``alternatives``).
    """
    if not isinstance(data_root, (str, os.PathLike)):
        raise TypeError(f"data_root must be a path, got {type(data_root).__name__}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root}")
    for candidate in candidates:
        folder = (root / candidate) if candidate != "." else root
        for found in (marker, *alternatives):
            if (folder / found).exists():
                return folder, found
    raise DatasetError(f"{title} not found: expected {root / candidates[0] / marker}")


def _check_pair(image: Path, label: Path, hint: str = "") -> None:
    if not image.is_file():
        raise DatasetError(f"image not found: expected {image}")
    if not label.is_file():
        raise DatasetError(f"image {image} has no mask: expected {label}{hint}")


def _split_file_samples(
    folder: Path, split_file: Path, image_dir: str, label_dir: str, reduce: bool
) -> list[Sample]:
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {split_file} lists no images")
    seen: set[str] = set()
    repeated = sorted({i for i in ids if i in seen or seen.add(i)})
    if repeated:
        raise DatasetError(f"split file {split_file} lists these ids more than once: "
                           f"{', '.join(repeated[:10])}{' ...' if len(repeated) > 10 else ''}")
    samples = []
    for id_ in ids:
        image = folder / image_dir / f"{id_}.jpg"
        label = folder / label_dir / f"{id_}.png"
        _check_pair(image, label)
        samples.append(Sample(id_, image, label, reduce))
    return samples


def _glob_samples(
    image_dir: Path,
    pattern: str,
    image_suffix: str,
    label_dir: Path,
    label_suffix: str,
    reduce: bool,
    hint: Callable[[Path], str] | None = None,
) -> list[Sample]:
    samples = []
    for image in sorted(image_dir.glob(pattern)):
        stem = image.name[: -len(image_suffix)]
        label = label_dir / image.parent.relative_to(image_dir) / f"{stem}{label_suffix}"
        _check_pair(image, label, hint(label) if hint else "")
        samples.append(Sample(stem, image, label, reduce))
    if not samples:
        raise DatasetError(f"no images found: expected {image_dir / pattern}")
    return samples


def _make(name: str, samples: list[Sample], reduce: bool, root: Path) -> SegmentationDataset:
    return SegmentationDataset(
        name, samples, benchmark_classes(name), reduce_zero_label=reduce, root=root
    )


def _check_split(split) -> None:
    if not isinstance(split, str) or not split or "/" in split or "\\" in split or ".." in split:
        raise ValueError(f"split must be a plain name such as 'val', got {split!r}")


def _voc(name: str, data_root, split: str, reduce: bool) -> SegmentationDataset:
    _check_split(split)
    marker = f"ImageSets/Segmentation/{split}.txt"
    folder, _ = dataset_dir(data_root, ("VOCdevkit/VOC2012", "VOC2012", "."), marker, "VOC2012")
    samples = _split_file_samples(
        folder, folder / marker, "JPEGImages", "SegmentationClass", reduce
    )
    return _make(name, samples, reduce, folder)


def _context(name: str, data_root, split: str, reduce: bool) -> SegmentationDataset:
    _check_split(split)
    # MMSegmentation's layout says SegmentationContext; some guides write SegmentContext.
    folder, marker = dataset_dir(
        data_root,
        ("VOCdevkit/VOC2010", "VOC2010", "."),
        f"ImageSets/SegmentationContext/{split}.txt",
        "VOC2010 (PASCAL Context)",
        alternatives=(f"ImageSets/SegmentContext/{split}.txt",),
    )
    samples = _split_file_samples(
        folder, folder / marker, "JPEGImages", "SegmentationClassContext", reduce
    )
    return _make(name, samples, reduce, folder)


def _coco(name: str, data_root, split: str, suffix: str, convert: str) -> SegmentationDataset:
    _check_split(split)
    root = data_root
    split = f"{split}2017" if split in ("val", "train") else split
    folder, _ = dataset_dir(
        data_root, ("coco_stuff164k", "."), f"images/{split}", "COCO-Stuff 164k"
    )

    def hint(label: Path) -> str:
        raw = label.with_name(label.name.replace(suffix, ".png"))
        if raw.is_file():
            return f" (raw annotations found: run `lposs convert {convert} --data-root {root}`)"
        return ""

    samples = _glob_samples(
        folder / "images" / split,
        "*.jpg",
        ".jpg",
        folder / "annotations" / split,
        suffix,
        False,
        hint,
    )
    return _make(name, samples, False, folder)


def load_voc(data_root, *, split: str = "val") -> SegmentationDataset:
    """PASCAL VOC 2012, 21 classes (background as synonyms), 255 ignored."""
    return _voc("voc", data_root, split, reduce=False)


def load_voc20(data_root, *, split: str = "val") -> SegmentationDataset:
    """PASCAL VOC 2012 without background: 20 classes, reduce-zero-label."""
    return _voc("voc20", data_root, split, reduce=True)


def load_context(data_root, *, split: str = "val") -> SegmentationDataset:
    """PASCAL Context, 60 classes with the literal class "background" (labels 0..59)."""
    return _context("context", data_root, split, reduce=False)


def load_context59(data_root, *, split: str = "val") -> SegmentationDataset:
    """PASCAL Context without background: 59 classes, reduce-zero-label."""
    return _context("context59", data_root, split, reduce=True)


def load_coco_object(data_root, *, split: str = "val") -> SegmentationDataset:
    """COCO-Object: 80 things + background (synonyms), ``<stem>_instanceTrainIds.png``."""
    return _coco("coco_object", data_root, split, "_instanceTrainIds.png", "coco_object")


def load_coco_stuff(data_root, *, split: str = "val") -> SegmentationDataset:
    """COCO-Stuff 164k, 171 classes, ``<stem>_labelTrainIds.png``, 255 ignored."""
    return _coco("coco_stuff", data_root, split, "_labelTrainIds.png", "coco_stuff")


def load_ade20k(data_root, *, split: str = "val") -> SegmentationDataset:
    """ADE20K (ADEChallengeData2016), 150 classes, reduce-zero-label."""
    _check_split(split)
    sub = {"val": "validation", "train": "training"}.get(split, split)
    folder, _ = dataset_dir(
        data_root,
        ("ADEChallengeData2016", "ade/ADEChallengeData2016", "."),
        f"images/{sub}",
        "ADEChallengeData2016",
    )
    samples = _glob_samples(
        folder / "images" / sub, "*.jpg", ".jpg", folder / "annotations" / sub, ".png", True
    )
    return _make("ade20k", samples, True, folder)


def load_cityscapes(data_root, *, split: str = "val") -> SegmentationDataset:
    """Cityscapes fine annotations, 19 classes, ``*_gtFine_labelTrainIds.png``, 255 ignored."""
    _check_split(split)
    root = data_root
    folder, _ = dataset_dir(data_root, ("cityscapes", "."), f"leftImg8bit/{split}", "Cityscapes")

    def hint(label: Path) -> str:
        raw = label.with_name(label.name.replace("_labelTrainIds", "_labelIds"))
        if raw.is_file():
            return f" (labelIds found: run `lposs convert cityscapes --data-root {root}`)"
        return ""

    samples = _glob_samples(
        folder / "leftImg8bit" / split,
        "*/*_leftImg8bit.png",
        "_leftImg8bit.png",
        folder / "gtFine" / split,
        "_gtFine_labelTrainIds.png",
        False,
        hint,
    )
    return _make("cityscapes", samples, False, folder)


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "voc": load_voc,
    "voc20": load_voc20,
    "context": load_context,
    "context59": load_context59,
    "coco_object": load_coco_object,
    "coco_stuff": load_coco_stuff,
    "ade20k": load_ade20k,
    "cityscapes": load_cityscapes,
}


def get_dataset(name: str, data_root: str | os.PathLike, **kwargs) -> SegmentationDataset:
    """Build a benchmark by name.

    Args:
        name: One of ``DATASETS`` (voc, voc20, context, context59, coco_object, coco_stuff,
            ade20k, cityscapes), or ``mess:<name>`` (``lposs.evaluation.mess.load_mess``).
        data_root: The folder holding ``VOCdevkit``, ``coco_stuff164k``,
            ``ADEChallengeData2016`` or ``cityscapes``, or that dataset folder itself.
        **kwargs: Passed to the loader (``split``, default ``"val"``).

    Raises:
        ValueError: Unknown name.
        DatasetError: The dataset is missing or incomplete; the message names the expected path.
    """
    if isinstance(name, str) and name.startswith("mess:"):  # imports mess-benchmark
        from .mess import load_mess

        return load_mess(name[len("mess:"):], data_root)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}, "
                         "mess:<name>")
    return DATASETS[name](data_root, **kwargs)
