"""Turn raw benchmark annotations into the train-id label PNGs that ``datasets`` reads.

Three conversions, each with its mapping written out as a 256-entry lookup table (raw value ->
train id, 255 = ignored):

* COCO-Stuff 164k: ``annotations/<split>/<stem>.png`` (raw ids 0..181, 255 unlabeled) ->
  ``<stem>_labelTrainIds.png`` with the 171 used ids renumbered 0..170 (``COCO_STUFF_LUT``;
  MMSegmentation's ``tools/dataset_converters/coco_stuff164k.py``).
* COCO-Object: the same raw PNGs -> ``<stem>_instanceTrainIds.png`` with background 0 and the
  80 thing classes 1..80 (``COCO_OBJECT_LUT``; GroupViT's ``convert_coco_object.py``, used by
  TCL and CLIP-DINOiser, hence by the paper), or rasterised from a COCO instances JSON.
* Cityscapes: ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png``
  with cityscapesscripts' id -> trainId table (``CITYSCAPES_LUT``).

Every output is written to a temporary file next to it and moved into place (``os.replace``),
so an interrupted run leaves no partial PNG; existing outputs are skipped unless
``overwrite=True``, so a rerun finishes an interrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..output.files import atomic_write
from ..progress import Progress, StageCounter
from .datasets import DATASETS, find_folder, read_label

__all__ = [
    "ConversionResult",
    "convert_coco_stuff",
    "convert_coco_object",
    "convert_cityscapes",
    "COCO_STUFF_LABEL_IDS",
    "COCO_STUFF_LUT",
    "COCO_OBJECT_LUT",
    "CITYSCAPES_TRAIN_IDS",
    "CITYSCAPES_LUT",
    "decode_rle",
    "polygons_to_mask",
]


# COCO-Stuff raw PNG values are COCO category ids minus one: 0..90 things (11 of them unused
# by COCO: 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90), 91..181 stuff, 255 unlabeled. The used
# ids, in order; the position of a raw id in this tuple is its train id (0..170).
COCO_STUFF_LABEL_IDS: tuple[int, ...] = (
    *range(0, 11),  # person .. fire hydrant             -> 0..10
    *range(12, 25),  # stop sign .. giraffe               -> 11..23
    26, 27,  # backpack, umbrella                         -> 24, 25
    *range(30, 44),  # handbag .. bottle                  -> 26..39
    *range(45, 65),  # wine glass .. bed                  -> 40..59
    66,  # dining table                                   -> 60
    69,  # toilet                                         -> 61
    *range(71, 82),  # tv .. refrigerator                 -> 62..72
    *range(83, 90),  # book .. toothbrush                 -> 73..79
    *range(91, 182),  # banner .. wood (stuff)            -> 80..170
)  # fmt: skip
assert len(COCO_STUFF_LABEL_IDS) == 171

COCO_STUFF_LUT = np.full(256, 255, dtype=np.uint8)
COCO_STUFF_LUT[list(COCO_STUFF_LABEL_IDS)] = np.arange(171, dtype=np.uint8)

# COCO-Object (GroupViT/TCL/CLIP-DINOiser): thing train ids shifted up by one, every stuff id
# and the unlabeled 255 become background 0 (so nothing is ignored), unused ids 255.
COCO_OBJECT_LUT = np.full(256, 255, dtype=np.uint8)
COCO_OBJECT_LUT[list(COCO_STUFF_LABEL_IDS[:80])] = np.arange(1, 81, dtype=np.uint8)
COCO_OBJECT_LUT[91:182] = 0
COCO_OBJECT_LUT[255] = 0

# cityscapesscripts/helpers/labels.py: the ids of the 19 train classes, in train-id order
# (road, sidewalk, building, ..., bicycle); every other id (license plate's -1 is not stored
# in labelIds PNGs) is ignored, 255.
CITYSCAPES_TRAIN_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26,
                                         27, 28, 31, 32, 33)
CITYSCAPES_LUT = np.full(256, 255, dtype=np.uint8)
CITYSCAPES_LUT[list(CITYSCAPES_TRAIN_IDS)] = np.arange(19, dtype=np.uint8)


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion did: outputs written, outputs kept (they existed and
    ``overwrite=False``), and one message per input that could not be converted."""

    written: int
    skipped: int
    failed: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.written + self.skipped


# ---------------------------------------------------------------------------------------------
# Conversions. Each takes ``data_root`` (the folder holding the dataset folder, or that folder
# itself), ``splits`` (default: those present), ``overwrite`` (rewrite existing outputs) and
# ``progress``, called as ``progress("converting annotations", done, total)``.


def convert_coco_stuff(data_root: str | os.PathLike, *, splits: Sequence[str] | str | None = None,
                       overwrite: bool = False,
                       progress: Progress | None = None) -> ConversionResult:
    """COCO-Stuff 164k raw PNGs -> ``<stem>_labelTrainIds.png`` (171 classes, 255 ignored);
    default splits ``val2017`` and ``train2017``, those present."""
    jobs = _lut_jobs(_coco_raw_files(data_root, splits), COCO_STUFF_LUT, ".png",
                     "_labelTrainIds.png")
    return _run(jobs, overwrite, progress)


def convert_coco_object(
    data_root: str | os.PathLike,
    *,
    splits: Sequence[str] | str | None = None,
    instances_json: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConversionResult:
    """Write COCO-Object labels ``<stem>_instanceTrainIds.png`` (background 0, things 1..80).

    By default they are derived from the raw COCO-Stuff PNGs with ``COCO_OBJECT_LUT``, the
    convention of the numbers in the paper (GroupViT's converter, reused by TCL and
    CLIP-DINOiser): each thing pixel gets its thing index + 1 (COCO category-id order), every
    stuff and unlabeled pixel is background 0.

    With ``instances_json`` (e.g. ``annotations/instances_val2017.json``; a relative path not
    found from the working directory is taken inside the dataset folder) the labels are
    rasterised from the instance annotations instead, for one split (``splits``, default
    ``val2017``): background 0, the JSON's categories sorted by id -> 1..n, instances
    painted in file order (a later one wins where they overlap), crowd regions 255
    (ignored) unless a non-crowd instance covers them.
    Polygons are filled by the pixel-centre rule (a pixel is in when its centre is inside,
    the rule pycocotools approximates), so masks can differ from pycocotools' by a pixel
    along edges; RLE masks (compressed or not) are decoded exactly.
    """
    if instances_json is None:
        jobs = _lut_jobs(_coco_raw_files(data_root, splits), COCO_OBJECT_LUT, ".png",
                         "_instanceTrainIds.png")
        return _run(jobs, overwrite, progress)
    splits = _as_splits(splits) or ["val2017"]
    if len(splits) != 1:
        raise ValueError(f"splits must name one split with instances_json, got {splits}")
    folder = _coco_folder(data_root)
    json_path = Path(instances_json)
    if not json_path.is_absolute() and not json_path.is_file():
        json_path = folder / json_path
    jobs = _instance_jobs(json_path, folder / "annotations" / splits[0])
    return _run(jobs, overwrite, progress)


def convert_cityscapes(data_root: str | os.PathLike, *, splits: Sequence[str] | str | None = None,
                       overwrite: bool = False,
                       progress: Progress | None = None) -> ConversionResult:
    """Cityscapes ``*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 classes);
    default: every split of ``gtFine``."""
    gt = find_folder(data_root, DATASETS["cityscapes"].folders, ["gtFine"], "Cityscapes")[0]
    gt = gt / "gtFine"
    names = _as_splits(splits) or sorted(p.name for p in gt.iterdir() if p.is_dir())
    sources = _raw_files(gt, names, "*/*_gtFine_labelIds.png", "Cityscapes labelIds")
    return _run(_lut_jobs(sources, CITYSCAPES_LUT, "_labelIds.png", "_labelTrainIds.png"),
                overwrite, progress)


# ---------------------------------------------------------------------------------------------
# COCO annotation decoding (no pycocotools)


def decode_rle(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode a COCO run-length encoding, compressed (``counts`` string) or not (a list).

    Runs alternate background/foreground starting with background, over the pixels in
    column-major order. Compressed counts store each run in 5-bit groups offset by 48 ('0'),
    a 0x20 bit meaning "more groups follow", sign-extended from the 0x10 bit of the last
    group, and from the fourth run on as the difference to the run two places before.

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes | list[int]}``.
        height, width: Expected size, checked when given.

    Returns:
        ``(H, W)`` bool mask.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("rle must be a dict with 'size' and 'counts'")
    h, w = (int(v) for v in rle["size"])
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"RLE size {h}x{w} differs from the image size {height}x{width}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts cover {counts.sum()} pixels, expected {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def _rle_string_to_counts(s: str | bytes) -> list[int]:
    data = s.encode("ascii") if isinstance(s, str) else s
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE counts string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons ``[x1, y1, x2, y2, ...]`` (pixel coordinates, corner at (0, 0)).

    A pixel (r, c) is inside a polygon when its centre (c + 0.5, r + 0.5) is (even-odd
    rule; a centre on a left/top edge is in, on a right/bottom edge out), so the square
    ``[10, 20] x [10, 20]`` fills rows and columns 10..19. Several polygons are united.

    Returns:
        ``(height, width)`` bool mask.
    """
    mask = np.zeros((height, width), dtype=bool)
    centres_y = np.arange(height, dtype=np.float64)[:, None] + 0.5
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64)
        if xy.ndim != 1 or xy.size % 2 or xy.size < 6:
            raise ValueError(f"a polygon needs >= 3 (x, y) pairs, got {xy.size} numbers")
        x0, y0 = xy[0::2], xy[1::2]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        crosses = (y0 <= centres_y) != (y1 <= centres_y)  # (H, edges)
        dy = np.where(y1 != y0, y1 - y0, 1.0)
        x_at = x0 + (centres_y - y0) / dy * (x1 - x0)  # edge x at each row centre
        rows, edges = np.nonzero(crosses)
        # First column whose centre lies at or right of the crossing; parity toggles there.
        start = np.clip(np.ceil(x_at[rows, edges] - 0.5), 0, width).astype(np.int64)
        toggles = np.zeros((height, width + 1), dtype=np.int32)
        np.add.at(toggles, (rows, start), 1)
        mask |= (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return mask


def _annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, dict):
        return decode_rle(seg, height, width)
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")


# ---------------------------------------------------------------------------------------------
# Jobs and atomic writing


def _as_splits(splits) -> list[str]:
    if isinstance(splits, str):
        return [splits]
    if splits is not None and not all(isinstance(s, str) for s in splits):
        raise TypeError("splits must be a string or a list of strings")
    return list(splits or [])


def _coco_folder(data_root) -> Path:
    return find_folder(data_root, DATASETS["coco_stuff"].folders, ["annotations"],
                       "COCO-Stuff 164k")[0]


def _coco_raw_files(data_root, splits) -> list[Path]:
    ann = _coco_folder(data_root) / "annotations"
    names = _as_splits(splits) or \
        [s for s in ("val2017", "train2017") if (ann / s).is_dir()] or ["val2017"]
    return _raw_files(ann, names, "*.png", "raw COCO-Stuff annotations",
                      " (from stuffthingmaps_trainval2017.zip)")


def _raw_files(folder: Path, splits: list[str], pattern: str, what: str,
               hint: str = "") -> list[Path]:
    """The files ``folder/<split>/<pattern>`` of each split (no train-id outputs)."""
    files = []
    for split in splits:
        if not (folder / split).is_dir():
            raise DatasetError(f"{what}: split not found: expected {folder / split}")
        files += sorted(p for p in (folder / split).glob(pattern) if "TrainIds" not in p.name)
    if not files:
        raise DatasetError(f"no {what} found: expected "
                           f"{folder}/{splits[0] if splits else '<split>'}/{pattern}{hint}")
    return files


def _lut_jobs(sources: list[Path], lut: np.ndarray, old: str, new: str):
    """(output, make) per source: its values through ``lut``, named with ``old`` -> ``new``."""
    def reader(src: Path) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            raw = read_label(src)
            if raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
                raise DatasetError(f"{src} holds values outside 0..255; expected raw 8-bit ids")
            return lut[raw]

        return read

    return [(src.with_name(src.name[: -len(old)] + new), reader(src)) for src in sources]


def _instance_jobs(json_path: Path, out_dir: Path):
    if not json_path.is_file():
        raise DatasetError(f"COCO instances file not found: expected {json_path}")
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
        images, categories = coco["images"], coco["categories"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"malformed COCO instances file {json_path}: {exc}") from exc
    if not isinstance(images, list) or not images:
        raise DatasetError(f"COCO instances file {json_path} lists no images")
    category_ids = sorted(int(c["id"]) for c in categories)
    if len(category_ids) > 254:
        raise DatasetError(f"{json_path}: {len(category_ids)} categories do not fit 1..254")
    train_id = {cid: i + 1 for i, cid in enumerate(category_ids)}
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)

    def make(info: dict) -> Callable[[], np.ndarray]:
        def rasterise() -> np.ndarray:
            try:
                h, w = int(info["height"]), int(info["width"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{json_path}: image {info.get('id')} has no valid "
                                   "height and width") from None
            label = np.zeros((h, w), dtype=np.uint8)
            anns = by_image.get(info["id"], [])
            # Crowds first (ignored), then instances in file order over them.
            for ann in sorted(anns, key=lambda a: not a.get("iscrowd", 0)):
                try:
                    mask = _annotation_mask(ann, h, w)
                except ValueError as exc:
                    raise DatasetError(
                        f"{json_path}: annotation {ann.get('id')} of image {info['id']}: {exc}"
                    ) from exc
                if ann.get("iscrowd", 0):
                    label[mask] = 255
                elif ann.get("category_id") in train_id:
                    label[mask] = train_id[ann["category_id"]]
                else:
                    raise DatasetError(
                        f"{json_path}: annotation {ann.get('id')} has unknown category "
                        f"{ann.get('category_id')!r}"
                    )
            return label

        return rasterise

    return [
        (out_dir / (Path(info["file_name"]).stem + "_instanceTrainIds.png"), make(info))
        for info in images
    ]


def _run(jobs, overwrite: bool, progress: Progress | None) -> ConversionResult:
    """Writes each job's output; a bad input is reported in ``failed`` and the rest go on."""
    written = skipped = 0
    failed = []
    counter = StageCounter(progress, "converting annotations", len(jobs))
    for output, make in jobs:
        if output.exists() and not overwrite:
            skipped += 1
        else:
            try:
                label = make()
            except DatasetError as err:
                failed.append(str(err))
            else:
                _write_png_atomic(label, output)
                written += 1
        counter.advance()
    return ConversionResult(written=written, skipped=skipped, failed=tuple(failed))


def _write_png_atomic(label: np.ndarray, path: Path) -> None:
    """Write ``(H, W)`` uint8 labels as a greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    atomic_write(path, lambda f: image.save(f, format="PNG"))
