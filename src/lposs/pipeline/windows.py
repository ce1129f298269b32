"""The sliding-window arithmetic, written once: the grid, crops, patch centres and the
overlap-averaging stitch (``METHOD.md``, Pre-processing; LPOSS, last step).

Pure torch: every function runs on the device of its tensor inputs. The callers (the
segmenter) pass sizes checked by ``LPOSSConfig``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_grid", "window_setups", "crop_windows", "pad_to_multiple", "patch_positions",
           "stitch_windows"]


def _spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    count = max(length - size + stride - 1, 0) // stride + 1
    ends = [min(i * stride + size, length) for i in range(count)]
    return [(max(end - size, 0), end) for end in ends]


def window_grid(height: int, width: int, *, size: int = 224, stride: int = 112) -> Tensor:
    """Sliding-window boxes covering an ``H x W`` image, row-major: ``(n_win, 4)`` int64
    ``(y1, x1, y2, x2)``, end-exclusive, on the CPU.

    ``n_rows = max(H - size + stride - 1, 0) // stride + 1``; window row ``i`` spans
    ``y2 = min(i * stride + size, H)``, ``y1 = max(y2 - size, 0)`` (columns alike). The
    last window hugs the border; every window is ``min(size, H) x min(size, W)``.
    """
    rows, cols = _spans(height, size, stride), _spans(width, size, stride)
    return torch.tensor([(y1, x1, y2, x2) for y1, y2 in rows for x1, x2 in cols],
                        dtype=torch.long)


def window_setups(height: int, width: int,
                  windows: tuple[tuple[int, int], ...] | None) -> list[Tensor]:
    """The boxes of each ``(size, stride)`` setup (:func:`window_grid`); ``windows=None``
    (no windows): one setup of one box, the whole image.

    Returns:
        one ``(n_win, 4)`` int64 tensor of boxes per setup, on the CPU.
    """
    if windows is None:
        return [torch.tensor([[0, 0, height, width]])]
    return [window_grid(height, width, size=size, stride=stride) for size, stride in windows]


def crop_windows(image: Tensor, boxes: Tensor) -> Tensor:
    """``(C, H, W)`` image, ``(n, 4)`` boxes ``(y1, x1, y2, x2)`` of one size -> ``(n, C, h, w)``
    crops (the encoders pad them to their patch size)."""
    return torch.stack([image[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes.tolist()])


def pad_to_multiple(windows: Tensor, multiple: int) -> Tensor:
    """``(..., h, w)`` -> ``(..., ceil(h / m) * m, ceil(w / m) * m)``, zero-padded at the
    bottom/right to a multiple ``m`` of the patch size (``windows`` itself when it is one):
    the one window padding."""
    h, w = windows.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return windows
    return F.pad(windows, (0, -w % multiple, 0, -h % multiple), value=0.0)


def patch_positions(boxes: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Patch centres in image pixels, for the spatial term of the patch graph: patch
    ``(row, col)`` of window ``(y1, x1, y2, x2)`` (``boxes`` ``(n, 4)``, each a ``(gh, gw)``
    grid of P-pixel patches) sits at ``(y1 + P/2 + row * P, x1 + P/2 + col * P)``.

    Returns:
        ``(n * gh * gw, 2)`` float32 ``(y, x)`` on ``boxes``' device, window-major, then
        row-major within a window (the order of ``features.flatten(2)``).
    """
    gh, gw = grid
    dev = boxes.device
    half = patch_size / 2
    rows = torch.arange(gh, device=dev, dtype=torch.float32) * patch_size + half
    cols = torch.arange(gw, device=dev, dtype=torch.float32) * patch_size + half
    ys = boxes[:, 0, None, None].float() + rows[None, :, None]  # (n, gh, 1)
    xs = boxes[:, 1, None, None].float() + cols[None, None, :]  # (n, 1, gw)
    ys, xs = torch.broadcast_tensors(ys, xs)
    return torch.stack([ys, xs], dim=-1).reshape(-1, 2)


def stitch_windows(
    window_scores: Tensor, boxes: Tensor, height: int, width: int, *, patch_size: int
) -> Tensor:
    """Per-window patch scores back to one image, averaging where windows overlap.

    Each ``(C, gh, gw)`` grid is resized bilinearly (``align_corners=False``) straight to
    the window's own size (as the paper's code does, not to the padded size), added into
    place, and the sum divided per pixel by the number of windows covering it (as matrix
    products, without the resized windows themselves).

    Args:
        window_scores: ``(n, C, gh, gw)`` scores per window patch.
        boxes: ``(n, 4)`` window boxes ``(y1, x1, y2, x2)`` that together cover the image.
        height, width: the image's H and W; patch_size: P.

    Returns:
        ``(C, H, W)`` scores, same dtype and device as ``window_scores``.
    """
    n, channels, gh, gw = window_scores.shape
    box_list = boxes.tolist()

    # Bilinear resizing is separable: a window's map is R_rows @ grid @ R_cols^T. Windows that
    # share their rows (y1, y2) are summed at grid height first, then resized to rows once.
    acc_dtype = torch.float64 if window_scores.dtype == torch.float64 else torch.float32
    dev = window_scores.device
    scores = window_scores.to(acc_dtype)
    up_rows: dict[int, Tensor] = {}  # window height -> (height, gh) resize matrix
    up_cols: dict[int, Tensor] = {}  # window width -> (width, gw) resize matrix
    bands: dict[tuple[int, int], list[int]] = {}
    for k, (y1, _, y2, _) in enumerate(box_list):
        bands.setdefault((y1, y2), []).append(k)
    total = torch.zeros((channels, height, width), dtype=acc_dtype, device=dev)
    count = torch.zeros((height, width), dtype=acc_dtype, device=dev)
    for (y1, y2), members in bands.items():
        band = torch.zeros((channels, gh, width), dtype=acc_dtype, device=dev)
        covered = torch.zeros(width, dtype=acc_dtype, device=dev)
        for k in members:
            _, x1, _, x2 = box_list[k]
            if x2 - x1 not in up_cols:
                up_cols[x2 - x1] = _resize_matrix(gw, x2 - x1, acc_dtype, dev)
            band[:, :, x1:x2] += scores[k] @ up_cols[x2 - x1].T
            covered[x1:x2] += 1
        if y2 - y1 not in up_rows:
            up_rows[y2 - y1] = _resize_matrix(gh, y2 - y1, acc_dtype, dev)
        total[:, y1:y2].baddbmm_(up_rows[y2 - y1].expand(channels, -1, -1), band)
        count[y1:y2] += covered
    return (total / count).to(window_scores.dtype)


def _resize_matrix(cells: int, length: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``(length, cells)``: bilinear resizing of ``cells`` values to ``length`` along one
    axis as a matrix, taken from ``F.interpolate`` itself (``align_corners=False``,
    clamped at the borders)."""
    eye = torch.eye(cells, dtype=dtype, device=device)[None]
    return F.interpolate(eye, size=length, mode="linear", align_corners=False)[0].T
