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
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import UNKNOWN
from ..errors import DatasetError, ImageError
from ..pipeline.image import IMAGE_SUFFIXES, load_label_map
from ..vocab import check_class_names, load_class_names

__all__ = ["Sample", "SegmentationDataset", "FolderDataset", "Layout", "DATASETS",
           "get_dataset", "benchmark_classes", "read_label", "find_folder"]

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
            ``(H, W)`` int64 class indices, 255 for ignored pixels, with MMSegmentation's
            reduce-zero-label (0 -> 255, 255 stays, the others minus one) where it applies.

        Raises:
            DatasetError: The file is missing, unreadable or not a single-channel label map.
        """
        label = read_label(self.label_path)
        if self.reduce_zero_label:
            reduced = label - 1
            reduced[(label == 0) | (label == UNKNOWN)] = UNKNOWN
            return reduced
        return label


def read_label(path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` int64 label values as stored (``load_label_map``), with a
    ``DatasetError`` for a missing or unusable file."""
    try:
        return load_label_map(path).numpy()
    except ImageError as err:
        raise DatasetError(str(err)) from None


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
            return SegmentationDataset(self.name, self.samples[index], self.classes,
                                       ignore_index=self.ignore_index, root=self.root,
                                       reduce_zero_label=self.reduce_zero_label)
        return self.samples[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, "
                f"classes={len(self.classes)}, root={str(self.root)!r})")


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


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's files lie in its folder; ``{split}`` stands for the split's name.

    A dataset is registered as one entry of ``DATASETS``: its name -> a ``Layout`` (or any
    object with the same ``load(name, data_root, split)`` method).
    """

    title: str  # for messages
    folders: tuple[str, ...]  # the dataset folder relative to data_root ("." = data_root)
    images: str  # the image folder
    labels: str  # the label folder
    label_suffix: str  # a label's name: the image's stem + this
    split_files: tuple[str, ...] = ()  # a file listing the split's ids (the first found)
    pattern: str = "*.jpg"  # without a split file: the images, globbed under ``images``
    image_suffix: str = ".jpg"  # an image's name: its id + this
    splits: tuple[tuple[str, str], ...] = ()  # split name -> folder name on disk
    raw_suffix: str | None = None  # raw annotations that ``lposs convert <name>`` converts
    reduce_zero_label: bool = False

    def load(self, name: str, data_root, split: str) -> SegmentationDataset:
        """The dataset ``name`` of this layout under ``data_root``."""
        split = dict(self.splits).get(split, split)
        markers = [m.format(split=split) for m in self.split_files or (self.images,)]
        folder, marker = find_folder(data_root, self.folders, markers, self.title)
        if self.split_files:
            ids = _split_ids(folder / marker)
            images = [folder / self.images / f"{i}{self.image_suffix}" for i in ids]
        else:
            images = sorted((folder / marker).glob(self.pattern))
            if not images:
                raise DatasetError(f"no images found: expected {folder / marker / self.pattern}")
        image_dir, label_dir = (folder / d.format(split=split) for d in (self.images, self.labels))
        samples = []
        for image in images:
            id_ = image.name[: -len(self.image_suffix)]
            label = label_dir / image.parent.relative_to(image_dir) / (id_ + self.label_suffix)
            if not image.is_file():
                raise DatasetError(f"image not found: expected {image}")
            if not label.is_file():
                raise DatasetError(f"image {image} has no mask: expected {label}"
                                   f"{self._raw_hint(name, label, data_root)}")
            samples.append(Sample(id_, image, label, self.reduce_zero_label))
        return SegmentationDataset(name, samples, benchmark_classes(name), root=folder,
                                   reduce_zero_label=self.reduce_zero_label)

    def _raw_hint(self, name: str, label: Path, data_root) -> str:
        raw = label.with_name(label.name.replace(self.label_suffix, self.raw_suffix or ""))
        if self.raw_suffix is None or not raw.is_file():
            return ""
        return f" (raw annotations found: run `lposs convert {name} --data-root {data_root}`)"


def find_folder(data_root, candidates: Sequence[str], markers: Sequence[str],
                 title: str) -> tuple[Path, str]:
    """The first ``data_root/<candidate>`` holding one of ``markers``, and that marker."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root}")
    for candidate in candidates:
        for marker in markers:
            if (root / candidate / marker).exists():
                return root / candidate, marker
    raise DatasetError(f"{title} not found: expected {root / candidates[0] / markers[0]}")


def _split_ids(split_file: Path) -> list[str]:
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {split_file} lists no images")
    seen: set[str] = set()
    repeated = sorted({i for i in ids if i in seen or seen.add(i)})
    if repeated:
        raise DatasetError(f"split file {split_file} lists these ids more than once: "
                           f"{', '.join(repeated[:10])}{' ...' if len(repeated) > 10 else ''}")
    return ids


_VOC = {"folders": ("VOCdevkit/VOC2012", "VOC2012", "."), "images": "JPEGImages",
        "labels": "SegmentationClass", "label_suffix": ".png",
        "split_files": ("ImageSets/Segmentation/{split}.txt",)}
# MMSegmentation's layout says SegmentationContext; some guides write SegmentContext.
_CONTEXT = {"folders": ("VOCdevkit/VOC2010", "VOC2010", "."), "images": "JPEGImages",
            "labels": "SegmentationClassContext", "label_suffix": ".png",
            "split_files": ("ImageSets/SegmentationContext/{split}.txt",
                            "ImageSets/SegmentContext/{split}.txt")}
_COCO = {"folders": ("coco_stuff164k", "."), "images": "images/{split}",
         "labels": "annotations/{split}", "splits": (("val", "val2017"), ("train", "train2017")),
         "raw_suffix": ".png"}

DATASETS: dict[str, Layout] = {
    "voc": Layout("VOC2012", **_VOC),
    "voc20": Layout("VOC2012", **_VOC, reduce_zero_label=True),
    "context": Layout("VOC2010 (PASCAL Context)", **_CONTEXT),
    "context59": Layout("VOC2010 (PASCAL Context)", **_CONTEXT, reduce_zero_label=True),
    "coco_object": Layout("COCO-Stuff 164k", **_COCO, label_suffix="_instanceTrainIds.png"),
    "coco_stuff": Layout("COCO-Stuff 164k", **_COCO, label_suffix="_labelTrainIds.png"),
    "ade20k": Layout("ADEChallengeData2016",
                     ("ADEChallengeData2016", "ade/ADEChallengeData2016", "."),
                     "images/{split}", "annotations/{split}", ".png",
                     splits=(("val", "validation"), ("train", "training")),
                     reduce_zero_label=True),
    "cityscapes": Layout("Cityscapes", ("cityscapes", "."), "leftImg8bit/{split}",
                         "gtFine/{split}", "_gtFine_labelTrainIds.png",
                         pattern="*/*_leftImg8bit.png", image_suffix="_leftImg8bit.png",
                         raw_suffix="_gtFine_labelIds.png"),
}
"""The paper's benchmarks: name -> where its files lie (see the module docstring)."""


def get_dataset(name: str, data_root: str | os.PathLike, *,
                split: str = "val") -> SegmentationDataset:
    """Build a benchmark by name.

    Args:
        name: One of ``DATASETS``, or ``mess:<name>`` (``lposs.evaluation.mess.load_mess``).
        data_root: The folder holding ``VOCdevkit``, ``coco_stuff164k``,
            ``ADEChallengeData2016`` or ``cityscapes``, or that dataset folder itself.
        split: The split (``val``, ``train``, ...).

    Raises:
        ValueError: Unknown name, or a split that is not a plain name.
        TypeError: ``data_root`` is not a path.
        DatasetError: The dataset is missing or incomplete; the message names the expected path.
    """
    if isinstance(name, str) and name.startswith("mess:"):  # imports mess-benchmark
        from .mess import load_mess

        return load_mess(name[len("mess:"):], data_root)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}, "
                         "mess:<name>")
    if not isinstance(data_root, (str, os.PathLike)):
        raise TypeError(f"data_root must be a path, got {type(data_root).__name__}")
    if not isinstance(split, str) or not split or "/" in split or "\\" in split or ".." in split:
        raise ValueError(f"split must be a plain name such as 'val', got {split!r}")
    return DATASETS[name].load(name, data_root, split)
