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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import UNKNOWN

__all__ = ["SegmentationMetrics", "boundary_iou", "mean_iou", "oracle_labels"]


def _label_map(x: Any, name: str) -> torch.Tensor:
    """An integer ``(H, W)`` numpy array or tensor as an int64 tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    if x.ndim != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) label map, got shape {tuple(x.shape)}")
    return x.long()


def _constant_windows(labels: torch.Tensor, ok: torch.Tensor | None, d: int,
                      dim: int) -> torch.Tensor:
    """True where the window [i-d, i+d] along ``dim`` lies inside the map, ``ok`` holds on
    all of it and ``labels`` is constant on it. Counts come from prefix sums: O(1) per pixel.
    """
    def prefix_sum(flags: torch.Tensor) -> torch.Tensor:  # exclusive: one longer, 0 first
        csum = torch.cumsum(flags, dim=dim, dtype=torch.int32)
        return F.pad(csum, (0, 0) * (flags.ndim - 1 - dim) + (1, 0))

    n = labels.shape[dim]
    idx = torch.arange(n, device=labels.device)
    lo, hi = (idx - d).clamp(0, n - 1), (idx + d).clamp(0, n - 1)
    # change[k] is set when labels[k] != labels[k + 1]; the window holds the pairs lo..hi-1.
    changes = prefix_sum(labels.narrow(dim, 1, n - 1) != labels.narrow(dim, 0, n - 1))
    result = (changes.index_select(dim, hi) - changes.index_select(dim, lo)) == 0
    if ok is not None:
        bad = prefix_sum(~ok)
        result &= (bad.index_select(dim, hi + 1) - bad.index_select(dim, lo)) == 0
    view = [1] * labels.ndim
    view[dim] = n
    return result & ((idx >= d) & (idx < n - d)).view(view)


def _interior(labels: torch.Tensor, d: int) -> torch.Tensor:
    """``(..., H, W)`` bool: pixels whose (2d+1)^2 window is inside the image and of one
    label; for the mask of a pixel's own label, d iterations of 3x3 erosion with the outside
    of the image counting as background."""
    rows_ok = _constant_windows(labels, None, d, labels.ndim - 1)
    return _constant_windows(labels, rows_ok, d, labels.ndim - 2)


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
    ``confusion`` (C, C + 1) (rows = ground truth, columns = the predicted class, the last
    column = predictions outside 0..C-1), ``boundary_intersection`` (C,) and
    ``boundary_union`` (C,), plus ``num_images``: states add up exactly, with ``merge`` or
    an in-place all-reduce of the tensors.

    Args:
        num_classes: C.
        ignore_index: ground-truth value to ignore (outside 0..C-1).
        boundary: also accumulate Boundary IoU (a few ms per image).
        dilation_ratio: Boundary IoU band width as a fraction of the image diagonal, > 0.
        device: where the state lives (default CPU).
    """

    _TENSORS = ("confusion", "boundary_intersection", "boundary_union")

    def __init__(
        self, num_classes: int, *, ignore_index: int = UNKNOWN, boundary: bool = True,
        dilation_ratio: float = 0.02, device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index ({ignore_index}) must lie outside the class range "
                             f"0..{num_classes - 1}")
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be positive, got {dilation_ratio!r}")
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
        gt = _label_map(gt, "gt")
        pred = _label_map(pred, "pred").to(gt.device)
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt must have the same shape, got {tuple(pred.shape)} "
                             f"and {tuple(gt.shape)}")
        c = self.num_classes
        valid = (gt >= 0) & (gt < c)
        stray = ~valid & (gt != self.ignore_index)
        if bool(stray.any()):
            raise ValueError(f"gt holds labels {torch.unique(gt[stray])[:5].tolist()} outside "
                             f"0..{c - 1} that are not ignore_index ({self.ignore_index}); "
                             "check num_classes and the dataset's label mapping")
        pred_valid = valid & (pred >= 0) & (pred < c)
        hits = torch.where(pred_valid, pred, c)[valid]  # misses go to the last column
        confusion = torch.bincount(gt[valid] * (c + 1) + hits, minlength=c * (c + 1))
        record = self._settings()
        record.update(num_images=1, confusion=confusion.view(c, c + 1).to(self.device))
        if self.boundary:
            inter, union = self._boundary_counts(pred, gt, valid, pred_valid)
        else:
            inter = union = torch.zeros_like(self.boundary_union)
        record.update(boundary_intersection=inter.to(self.device),
                      boundary_union=union.to(self.device))
        self.merge(record)
        return record

    def _boundary_counts(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                         pred_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) intersections and unions of one image's ground-truth and predicted bands."""
        height, width = gt.shape
        d = max(1, int(round(self.dilation_ratio * math.sqrt(height**2 + width**2))))
        # Every pixel that is in no class (ignored, out of range) becomes -1: it then bounds
        # every class's mask, as its 0 does in each per-class binary mask.
        labels = torch.stack([torch.where(valid, gt, -1), torch.where(pred_valid, pred, -1)])
        gt_band, pred_band = ~_interior(labels, d) & (labels >= 0)
        gt_area = torch.bincount(gt[gt_band], minlength=self.num_classes)
        pred_area = torch.bincount(pred[pred_band], minlength=self.num_classes)
        both = gt_band & pred_band & (gt == pred)
        intersection = torch.bincount(gt[both], minlength=self.num_classes)
        return intersection, gt_area + pred_area - intersection

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


def _evaluate(preds: Any, gts: Any, num_classes: int, ignore_index: int, boundary: bool,
              dilation_ratio: float) -> dict[str, Any]:
    """``compute()`` over one (H, W) map, a (B, H, W) stack or a sequence of (H, W) maps."""
    pred_list, gt_list = ([m] if getattr(m, "ndim", None) == 2 else list(m) for m in (preds, gts))
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
    gt = _label_map(gt, "gt")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    height, width = gt.shape
    values, inverse = torch.unique(gt, return_inverse=True)
    onehot = F.one_hot(inverse, len(values)).permute(2, 0, 1)[None].float()
    small = (max(1, height // patch_size), max(1, width // patch_size))
    coarse = F.interpolate(onehot, size=small, mode="bilinear", align_corners=False,
                           antialias=False)
    back = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    # max(0).indices, not argmax(0): same first-index tie rule, several times faster on CPU.
    return values[back[0].max(0).indices]
