"""The paper's reference numbers (``benchmarks/paper_tables.md``: Table 1 mIoU, Table 2
Boundary IoU), for reports that put our numbers beside them."""

from __future__ import annotations

__all__ = ["paper_reference"]


_TABLE_COLUMNS = (
    "voc",
    "coco_object",
    "context",
    "context59",
    "coco_stuff",
    "voc20",
    "ade20k",
    "cityscapes",
    "average",
)
_PAPER_MIOU = {  # Table 1
    "oracle": (91.5, 83.8, 86.6, 86.8, 86.0, 92.8, 80.6, 73.6, 85.2),
    "maskclip": (32.9, 16.3, 22.9, 25.5, 17.5, 61.8, 14.2, 25.0, 27.0),
    "clip-dinoiser": (62.2, 34.7, 32.5, 36.0, 24.6, 80.8, 20.1, 31.1, 40.2),
    "proxyclip": (59.3, 36.3, 34.4, 38.0, 25.7, 79.7, 19.4, 36.0, 41.1),
    "lavg": (61.8, 33.3, 31.5, 34.6, 22.8, 81.9, 14.8, 25.0, 38.2),
    "lposs": (61.1, 33.4, 34.6, 37.8, 25.9, 78.8, 21.8, 37.3, 41.3),
    "lposs+": (62.4, 34.3, 35.4, 38.6, 26.5, 79.3, 22.3, 37.9, 42.1),
}
_PAPER_BOUNDARY_IOU = {  # Table 2
    "oracle": (80.1, 61.3, 62.6, 68.0, 69.0, 83.5, 65.0, 66.4, 69.5),
    "maskclip": (17.2, 7.0, 9.2, 12.0, 9.3, 38.6, 8.2, 17.2, 14.8),
    "clip-dinoiser": (47.4, 17.5, 15.7, 22.4, 15.6, 71.1, 12.3, 22.1, 28.0),
    "lposs": (48.5, 18.4, 19.1, 24.8, 17.9, 70.1, 14.9, 28.4, 30.3),
    "lposs+": (51.2, 20.4, 21.6, 27.1, 19.2, 71.7, 16.0, 29.5, 32.1),
}


def paper_reference(dataset: str, method: str) -> dict[str, float | None] | None:
    """The paper's numbers for a dataset and method, for side-by-side reports.

    Args:
        dataset: A benchmark name of ``DATASETS``, or ``"average"`` (the tables' Avg column).
        method: ``oracle``, ``maskclip``, ``lposs``, ``lposs+`` (also ``clip-dinoiser``,
            ``proxyclip``, ``lavg``); case-insensitive.

    Returns:
        ``{"miou": float, "boundary_iou": float | None}`` in percent, or None when the
        paper has no number for this pair.
    """
    if not isinstance(dataset, str) or not isinstance(method, str):
        raise TypeError("dataset and method must be strings")
    method = method.strip().lower()
    if dataset not in _TABLE_COLUMNS or method not in _PAPER_MIOU:
        return None
    column = _TABLE_COLUMNS.index(dataset)
    boundary = _PAPER_BOUNDARY_IOU.get(method)
    return {
        "miou": _PAPER_MIOU[method][column],
        "boundary_iou": boundary[column] if boundary else None,
    }
