"""Segmentation metrics: streaming mIoU, Boundary IoU and the patch-resolution oracle.

Conventions (METHOD.md, "Evaluation conventions"):

- One confusion matrix over the whole split; IoU per class; the mean is taken over the
  classes whose union is non-zero (the others are NaN and skipped).
- Ground-truth pixels equal to ``ignore_index`` are ignored entirely.
- A predicted value outside ``0..C-1`` (255, an "unknown" index, ...) is a miss: it counts
  in no class's predicted area, while its ground-truth pixel still counts in its class's
  union (a false negative). This holds for mIoU and Boundary IoU alike.
- Boundary IoU (Cheng et al. 2021): per image and class, the boundary band of a mask is the
  mask minus its erosion by ``d = max(1, round(0.02 * diagonal))`` iterations of a 3x3
  kernel, the image border counting as boundary. Predictions where the ground truth is
  ignored are ignored too. Band intersections and unions are summed per class over the
  split, then turned into IoUs like mIoU.

All counts are int64 tensors, so states from several images or processes add up exactly
(``SegmentationMetrics.merge``, or an all-reduce of its tensors). Reported values are
fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import UNKNOWN

__all__ = [
    "SegmentationMetrics",
    "confusion_matrix",
    "boundary_counts",
    "boundary_dilation",
    "mask_boundary",
    "mean_iou",
    "boundary_iou",
    "oracle_labels",
]


def _as_label_map(x: Any, name: str) -> torch.Tensor:
    """Converts an integer (H, W) numpy array or tensor to an int64 tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) label map, got shape {tuple(x.shape)}")
    return x.long()


def _check_pair(pred: Any, gt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    gt_t = _as_label_map(gt, "gt")
    pred_t = _as_label_map(pred, "pred").to(gt_t.device)
    if pred_t.shape != gt_t.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {tuple(pred_t.shape)} and "
            f"{tuple(gt_t.shape)}"
        )
    return pred_t, gt_t


def _check_classes(num_classes: Any, ignore_index: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index ({ignore_index}) must lie outside the class range 0..{num_classes - 1}"
        )


def _valid_gt(gt: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(H, W) bool: ground-truth pixels that belong to a class; rejects unexpected labels."""
    valid = (gt >= 0) & (gt < num_classes)
    stray = ~valid & (gt != ignore_index)
    if bool(stray.any()):
        bad = torch.unique(gt[stray])[:5].tolist()
        raise ValueError(
            f"gt holds labels {bad} outside 0..{num_classes - 1} that are not ignore_index "
            f"({ignore_index}); check num_classes and the dataset's label mapping"
        )
    return valid


def confusion_matrix(
    pred: Any, gt: Any, num_classes: int, *, ignore_index: int = UNKNOWN
) -> torch.Tensor:
    """Confusion matrix of one label map, with a column for missed pixels.

    Args:
        pred: (H, W) integer predicted labels; values outside 0..C-1 are misses.
        gt: (H, W) integer ground truth in 0..C-1 or ``ignore_index``.
        num_classes: C.
        ignore_index: ground-truth value to ignore.

    Returns:
        (C, C + 1) int64 counts on gt's device: rows = ground truth, columns 0..C-1 = the
        predicted class, last column = predictions outside 0..C-1 (misses: in no class's
        predicted area, but in the gt class's union).
    """
    _check_classes(num_classes, ignore_index)
    pred, gt = _check_pair(pred, gt)
    valid = _valid_gt(gt, num_classes, ignore_index)
    gt_v, pred_v = gt[valid], pred[valid]
    pred_v = torch.where((pred_v >= 0) & (pred_v < num_classes), pred_v, num_classes)
    counts = torch.bincount(gt_v * (num_classes + 1) + pred_v,
                            minlength=num_classes * (num_classes + 1))
    return counts.view(num_classes, num_classes + 1)


def boundary_dilation(height: int, width: int, ratio: float = 0.02) -> int:
    """Band width d = max(1, round(ratio * image diagonal)) (Python rounding, half to even)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    if not ratio > 0:
        raise ValueError(f"dilation_ratio must be positive, got {ratio!r}")
    return max(1, int(round(ratio * math.sqrt(height * height + width * width))))


def _prefix_sum(flags: torch.Tensor, dim: int) -> torch.Tensor:
    """Exclusive prefix sum along ``dim``: one longer, starting with 0."""
    csum = torch.cumsum(flags, dim=dim, dtype=torch.int32)
    shape = list(csum.shape)
    shape[dim] = 1
    return torch.cat([csum.new_zeros(shape), csum], dim=dim)


def _constant_windows(
    labels: torch.Tensor, ok: torch.Tensor | None, d: int, dim: int
) -> torch.Tensor:
    """True where the window [i-d, i+d] along ``dim`` lies inside the map, ``ok`` holds on
    all of it and ``labels`` is constant on it. Counts come from prefix sums: O(1) per pixel.
    """
    n = labels.shape[dim]
    idx = torch.arange(n, device=labels.device)
    lo, hi = (idx - d).clamp(0, n - 1), (idx + d).clamp(0, n - 1)
    # change[k] is set when labels[k] != labels[k + 1]; the window holds the pairs lo..hi-1.
    change = labels.narrow(dim, 1, n - 1) != labels.narrow(dim, 0, n - 1)
    changes = _prefix_sum(change, dim)
    result = (changes.index_select(dim, hi) - changes.index_select(dim, lo)) == 0
    if ok is not None:
        bad = _prefix_sum(~ok, dim)
        result &= (bad.index_select(dim, hi + 1) - bad.index_select(dim, lo)) == 0
    inside = (idx >= d) & (idx < n - d)
    view = [1] * labels.ndim
    view[dim] = n
    return result & inside.view(view)


def _interior(labels: torch.Tensor, d: int) -> torch.Tensor:
    """(..., H, W) bool: pixels whose (2d+1)^2 window is inside the image and of one label.

    For the mask of the pixel's own label this is exactly d iterations of 3x3 erosion with
    the outside of the image counting as background.
    """
    rows_ok = _constant_windows(labels, None, d, labels.ndim - 1)
    return _constant_windows(labels, rows_ok, d, labels.ndim - 2)


def mask_boundary(mask: Any, dilation: int) -> torch.Tensor:
    """Boundary band of binary masks: the mask minus its erosion.

    The erosion is ``dilation`` iterations of a 3x3 kernel on the zero-padded mask, so mask
    pixels within ``dilation`` pixels of the image border are boundary too.

    Args:
        mask: (..., H, W) bool or 0/1 integer masks (numpy or torch).
        dilation: number of 3x3 erosions d >= 1 (see ``boundary_dilation``).

    Returns:
        (..., H, W) bool band.
    """
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a numpy array or a torch tensor, got {type(mask).__name__}")
    if mask.ndim < 2 or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise ValueError(f"mask must have shape (..., H, W), got {tuple(mask.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    mask = mask != 0
    return mask & ~_interior(mask, dilation)


def boundary_counts(
    pred: Any, gt: Any, num_classes: int, *, ignore_index: int = UNKNOWN,
    dilation_ratio: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Boundary IoU intersection and union of one image.

    Args:
        pred: (H, W) integer predicted labels; values outside 0..C-1 are misses.
        gt: (H, W) integer ground truth in 0..C-1 or ``ignore_index``.
        num_classes: C.
        ignore_index: ground-truth value to ignore (predictions there are ignored too).
        dilation_ratio: band width as a fraction of the image diagonal.

    Returns:
        intersection (C,) and union (C,) int64 pixel counts of the gt and predicted bands.
    """
    _check_classes(num_classes, ignore_index)
    pred, gt = _check_pair(pred, gt)
    d = boundary_dilation(*gt.shape, ratio=dilation_ratio)
    gt_valid = _valid_gt(gt, num_classes, ignore_index)
    pred_valid = gt_valid & (pred >= 0) & (pred < num_classes)
    # Every pixel that is in no class (ignored, out of range) becomes -1: it then bounds
    # every class's mask, as its 0 does in each per-class binary mask.
    labels = torch.stack([torch.where(gt_valid, gt, -1), torch.where(pred_valid, pred, -1)])
    gt_band, pred_band = ~_interior(labels, d) & (labels >= 0)
    gt_area = torch.bincount(gt[gt_band], minlength=num_classes)
    pred_area = torch.bincount(pred[pred_band], minlength=num_classes)
    both = gt_band & pred_band & (gt == pred)
    intersection = torch.bincount(gt[both], minlength=num_classes)
    return intersection, gt_area + pred_area - intersection


def _iou(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """(C,) float64 IoU, NaN where the union is zero."""
    iou = intersection.double() / union.double().clamp(min=1)
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def _nanmean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


class SegmentationMetrics:
    """Streaming mIoU, accuracies and (optionally) Boundary IoU over a split.

    ``update`` one image at a time, then ``compute``. The state is three int64 tensors,
    ``confusion`` (C, C + 1) (rows = ground truth, last column = misses, see
    ``confusion_matrix``), ``boundary_intersection`` (C,) and
    ``boundary_union`` (C,), plus ``num_images``: states add up exactly, with ``merge`` or
    an in-place all-reduce of the tensors.

    Args:
        num_classes: C.
        ignore_index: ground-truth value to ignore.
        boundary: also accumulate Boundary IoU (a few ms per image).
        dilation_ratio: Boundary IoU band width as a fraction of the image diagonal.
        device: where the state lives (default CPU).
    """

    _TENSORS = ("confusion", "boundary_intersection", "boundary_union")

    def __init__(
        self, num_classes: int, *, ignore_index: int = UNKNOWN, boundary: bool = True,
        dilation_ratio: float = 0.02, device: torch.device | str | None = None,
    ) -> None:
        _check_classes(num_classes, ignore_index)
        boundary_dilation(1, 1, ratio=dilation_ratio)  # validates the ratio
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary = bool(boundary)
        self.dilation_ratio = float(dilation_ratio)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Clears the counts."""
        c = self.num_classes
        self.confusion = torch.zeros(c, c + 1, dtype=torch.int64, device=self.device)
        self.boundary_intersection = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.boundary_union = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.num_images = 0

    def update(self, pred: Any, gt: Any) -> dict[str, Any]:
        """Adds one image.

        Args:
            pred: (H, W) integer predicted labels (numpy or torch); outside 0..C-1 = miss.
            gt: (H, W) integer ground truth in 0..C-1 or ``ignore_index``.

        Returns:
            This image's counts in ``state_dict`` form (a per-image record that ``merge``
            accepts).
        """
        kwargs = {"ignore_index": self.ignore_index}
        confusion = confusion_matrix(pred, gt, self.num_classes, **kwargs).to(self.device)
        if self.boundary:
            inter, union = boundary_counts(pred, gt, self.num_classes,
                                           dilation_ratio=self.dilation_ratio, **kwargs)
            inter, union = inter.to(self.device), union.to(self.device)
        else:
            inter = union = torch.zeros_like(self.boundary_union)
        record = self._settings()
        record.update(num_images=1, confusion=confusion, boundary_intersection=inter,
                      boundary_union=union)
        self.merge(record)
        return record

    def _settings(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "boundary": self.boundary, "dilation_ratio": self.dilation_ratio}

    def state_dict(self) -> dict[str, Any]:
        """Settings, ``num_images`` and copies of the three count tensors."""
        state = self._settings()
        state["num_images"] = self.num_images
        state.update({name: getattr(self, name).clone() for name in self._TENSORS})
        return state

    def merge(self, other: SegmentationMetrics | Mapping[str, Any]) -> SegmentationMetrics:
        """Adds the counts of another metrics object or ``state_dict``; returns self.

        Raises:
            ValueError: if the two were set up differently or a tensor has the wrong shape.
        """
        state = other.state_dict() if isinstance(other, SegmentationMetrics) else other
        if not isinstance(state, Mapping):
            raise TypeError(f"other must be SegmentationMetrics or a state dict, got {state!r}")
        for key, value in self._settings().items():
            if key in state and state[key] != value:
                raise ValueError(f"cannot merge metrics with {key}={state[key]!r} into {value!r}")
        for name in self._TENSORS:
            mine, theirs = getattr(self, name), torch.as_tensor(state[name])
            if theirs.shape != mine.shape:
                raise ValueError(f"{name} must have shape {tuple(mine.shape)}, "
                                 f"got {tuple(theirs.shape)}")
            mine += theirs.to(device=mine.device, dtype=torch.int64)
        self.num_images += int(state.get("num_images", 0))
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SegmentationMetrics:
        """Rebuilds a metrics object from ``state_dict()`` output."""
        metrics = cls(int(state["num_classes"]), ignore_index=int(state["ignore_index"]),
                      boundary=bool(state["boundary"]),
                      dilation_ratio=float(state["dilation_ratio"]))
        return metrics.merge(state)

    def compute(self) -> dict[str, Any]:
        """Metrics over everything added so far, as fractions in [0, 1].

        Returns:
            dict with ``miou``, ``iou`` (per class, NaN for classes absent from both gt and
            prediction), ``pixel_accuracy``, ``mean_accuracy``, ``accuracy`` (per class,
            NaN without gt pixels), ``num_images``, ``num_pixels`` (non-ignored gt pixels)
            and, when ``boundary`` is on, ``boundary_miou`` and ``boundary_iou``. Means
            skip NaN classes.
        """
        conf = self.confusion.cpu()
        true_pos = conf.diagonal()
        gt_area, pred_area = conf.sum(1), conf[:, :-1].sum(0)  # misses: no predicted area
        iou = _iou(true_pos, gt_area + pred_area - true_pos)
        accuracy = _iou(true_pos, gt_area)
        num_pixels = int(gt_area.sum())
        result: dict[str, Any] = {
            "miou": _nanmean(iou),
            "iou": iou.tolist(),
            "pixel_accuracy": float(true_pos.sum()) / num_pixels if num_pixels else float("nan"),
            "mean_accuracy": _nanmean(accuracy),
            "accuracy": accuracy.tolist(),
            "num_images": self.num_images,
            "num_pixels": num_pixels,
        }
        if self.boundary:
            biou = _iou(self.boundary_intersection.cpu(), self.boundary_union.cpu())
            result.update(boundary_miou=_nanmean(biou), boundary_iou=biou.tolist())
        return result


def _label_maps(maps: Any, name: str) -> list[Any]:
    """A single (H, W) map, a (B, H, W) stack or a sequence of (H, W) maps -> list."""
    if isinstance(maps, (np.ndarray, torch.Tensor)):
        if maps.ndim == 2:
            return [maps]
        if maps.ndim == 3:
            return list(maps)
        raise ValueError(f"{name} must be (H, W), (B, H, W) or a sequence of (H, W) maps, "
                         f"got shape {tuple(maps.shape)}")
    if isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
        return list(maps)
    raise TypeError(f"{name} must be an array, a tensor or a sequence of them")


def _evaluate(preds: Any, gts: Any, num_classes: int, ignore_index: int, boundary: bool,
              dilation_ratio: float) -> dict[str, Any]:
    pred_list, gt_list = _label_maps(preds, "preds"), _label_maps(gts, "gts")
    if len(pred_list) != len(gt_list):
        raise ValueError(f"preds and gts must hold as many maps, got {len(pred_list)} and "
                         f"{len(gt_list)}")
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index, boundary=boundary,
                                  dilation_ratio=dilation_ratio)
    for pred, gt in zip(pred_list, gt_list):
        metrics.update(pred, gt)
    return metrics.compute()


def mean_iou(preds: Any, gts: Any, num_classes: int, ignore_index: int = UNKNOWN) -> float:
    """mIoU of one or several label maps (one confusion matrix over all of them).

    Args:
        preds: (H, W) map, (B, H, W) stack or sequence of (H, W) maps of predicted labels.
        gts: ground truth, same layout as ``preds``.
        num_classes: C.
        ignore_index: ground-truth value to ignore.

    Returns:
        mean IoU in [0, 1] over classes with a non-zero union (NaN if there are none).
    """
    return _evaluate(preds, gts, num_classes, ignore_index, False, 0.02)["miou"]


def boundary_iou(
    preds: Any, gts: Any, num_classes: int, *, ignore_index: int = UNKNOWN,
    dilation_ratio: float = 0.02,
) -> float:
    """Boundary IoU (Cheng et al. 2021) of one or several label maps, averaged over classes.

    Args:
        preds: (H, W) map, (B, H, W) stack or sequence of (H, W) maps of predicted labels.
        gts: ground truth, same layout as ``preds``.
        num_classes: C.
        ignore_index: ground-truth value to ignore.
        dilation_ratio: band width as a fraction of each image's diagonal.

    Returns:
        mean over classes with non-zero band union of the band IoU, in [0, 1].
    """
    result = _evaluate(preds, gts, num_classes, ignore_index, True, dilation_ratio)
    return result["boundary_miou"]


def oracle_labels(gt: Any, *, patch_size: int = 16, ignore_index: int = UNKNOWN) -> torch.Tensor:
    """Ground truth seen at patch resolution (the paper's oracle row).

    One-hot encodes every label value present (``ignore_index`` included, as a label of
    its own), resizes bilinearly (align_corners=False, no antialiasing) to
    (max(1, H // P), max(1, W // P)), back to (H, W), and takes the argmax (ties go to the
    smaller label value). Pixels that come out as ``ignore_index`` are misses in the metrics.

    Args:
        gt: (H, W) integer ground truth (numpy or torch).
        patch_size: P, the encoder's patch size.
        ignore_index: the void value; it takes part like any other label value.

    Returns:
        (H, W) int64 labels on gt's device, values taken from those present in ``gt``.
    """
    gt = _as_label_map(gt, "gt")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    height, width = gt.shape
    values, inverse = torch.unique(gt, return_inverse=True)
    onehot = F.one_hot(inverse, len(values)).permute(2, 0, 1)[None].float()
    small = (max(1, height // patch_size), max(1, width // patch_size))
    coarse = F.interpolate(onehot, size=small, mode="bilinear", align_corners=False,
                           antialias=False)
    back = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    # max(0).indices, not argmax(0): same first-index tie rule, several times faster on CPU.
    return values[back[0].max(0).indices]
