"""The working-size resize and the sliding-window arithmetic, written once.

Pure torch: every function runs on the device of its tensor inputs. The window
grid, crop padding, patch centres and the overlap-averaging stitch follow
``METHOD.md`` (Pre-processing; LPOSS, last step).
"""

from __future__ import annotations

import cv2
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "working_size",
    "resize_image",
    "window_grid",
    "crop_windows",
    "patch_positions",
    "stitch_windows",
]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_boxes(boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise ValueError(f"boxes must have shape (n, 4) with n >= 1, got {tuple(boxes.shape)}")
    if boxes.dtype.is_floating_point or boxes.dtype.is_complex or boxes.dtype == torch.bool:
        raise TypeError(f"boxes must hold integers, got {boxes.dtype}")
    y1, x1, y2, x2 = boxes.unbind(1)
    if bool((y1 < 0).any() or (x1 < 0).any() or (y2 <= y1).any() or (x2 <= x1).any()):
        raise ValueError("boxes must be (y1, x1, y2, x2) with 0 <= y1 < y2 and 0 <= x1 < x2")


def working_size(
    height: int, width: int, short_side: int = 448, long_side: int = 2048
) -> tuple[int, int]:
    """The size at which LPOSS runs, as the paper's test pipeline computes it.

    mmseg's ``Resize(keep_ratio=True)`` with ``img_scale=(long_side, short_side)``
    (mmcv's ``rescale_size``): ``scale = min(long_side / long, short_side / short)`` and
    each side becomes ``int(side * scale + 0.5)``. So the shorter side becomes
    ``short_side`` unless the aspect ratio exceeds ``long_side / short_side``, where the
    longer side is capped at ``long_side``. A side is never below 1 pixel.

    Args:
        height: Original image height in pixels.
        width: Original image width in pixels.
        short_side: Target length of the shorter side.
        long_side: Cap on the length of the longer side.

    Returns:
        ``(h, w)``, the working height and width.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    short_side = _positive_int(short_side, "short_side")
    long_side = _positive_int(long_side, "long_side")
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialiasing) of a ``(C, H, W)`` image.

    An 8-bit image (``uint8``) is resized as the paper's pipeline does it: OpenCV's
    ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` on the uint8 pixels (fixed-point
    weights, a uint8 result), then divided by 255; this runs on the CPU and the result
    goes back to the input's device. A floating-point image is interpolated in float32
    (float64 for float64 input) with ``F.interpolate`` and cast back to its dtype.

    Args:
        image: ``(C, H, W)`` uint8 image, or floating-point image (e.g. RGB in [0, 1]).
        size: ``(h, w)`` output size.

    Returns:
        ``(C, h, w)`` resized image on the input's device: float32 in [0, 1] for uint8
        input, the input's dtype otherwise.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.numel() == 0:
        raise ValueError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    if len(size) != 2:
        raise ValueError(f"size must be (h, w), got {size!r}")
    h = _positive_int(size[0], "size[0]")
    w = _positive_int(size[1], "size[1]")
    if image.dtype == torch.uint8:
        pixels = image.permute(1, 2, 0).cpu().numpy()  # (H, W, C), OpenCV's layout
        resized = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)
        resized = resized.reshape(h, w, image.shape[0])  # OpenCV drops a single channel axis
        out = torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0
        return out.to(image.device)
    work = image if image.dtype == torch.float64 else image.float()
    out = F.interpolate(work[None], size=(h, w), mode="bilinear", align_corners=False,
                        antialias=False)[0]
    return out.to(image.dtype)


def _starts(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    count = max(length - size + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + size, length)
        spans.append((max(end - size, 0), end))
    return spans


def window_grid(height: int, width: int, *, size: int = 224, stride: int = 112) -> Tensor:
    """Sliding-window boxes covering an image, row-major.

    ``n_rows = max(H - size + stride - 1, 0) // stride + 1``; window row ``i`` spans
    ``y2 = min(i * stride + size, H)``, ``y1 = max(y2 - size, 0)`` (columns alike). The
    last window hugs the border; every window is ``min(size, H) x min(size, W)``.

    Args:
        height: Image height H.
        width: Image width W.
        size: Window side in pixels.
        stride: Step between windows in pixels.

    Returns:
        ``(n_win, 4)`` int64 boxes ``(y1, x1, y2, x2)``, end-exclusive, on the CPU.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    size = _positive_int(size, "size")
    stride = _positive_int(stride, "stride")
    rows = _starts(height, size, stride)
    cols = _starts(width, size, stride)
    boxes = [(y1, x1, y2, x2) for (y1, y2) in rows for (x1, x2) in cols]
    return torch.tensor(boxes, dtype=torch.long)


def crop_windows(image: Tensor, boxes: Tensor, *, multiple: int) -> Tensor:
    """Crop windows and zero-pad each at the bottom/right to a multiple of ``multiple``.

    Args:
        image: ``(C, H, W)`` image (RGB in [0, 1] for the encoders).
        boxes: ``(n, 4)`` boxes ``(y1, x1, y2, x2)``, all of the same size, inside the image.
        multiple: The padded height and width are multiples of this (the patch size).

    Returns:
        ``(n, C, h_pad, w_pad)`` crops, same dtype and device as ``image``.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    _check_boxes(boxes)
    multiple = _positive_int(multiple, "multiple")
    box_list = boxes.tolist()
    h, w = box_list[0][2] - box_list[0][0], box_list[0][3] - box_list[0][1]
    if any((y2 - y1, x2 - x1) != (h, w) for y1, x1, y2, x2 in box_list):
        raise ValueError("boxes must all have the same size (as window_grid gives)")
    _, height, width = image.shape
    if any(y2 > height or x2 > width for _, _, y2, x2 in box_list):
        raise ValueError(f"boxes reach outside the {height}x{width} image")
    h_pad = -(-h // multiple) * multiple
    w_pad = -(-w // multiple) * multiple
    out = image.new_zeros((len(box_list), image.shape[0], h_pad, w_pad))
    for k, (y1, x1, y2, x2) in enumerate(box_list):
        out[k, :, :h, :w] = image[:, y1:y2, x1:x2]
    return out


def patch_positions(boxes: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Patch centres in image pixels, for the spatial term of the patch graph.

    Patch ``(row, col)`` of window ``(y1, x1, y2, x2)`` sits at
    ``(y1 + P/2 + row * P, x1 + P/2 + col * P)``.

    Args:
        boxes: ``(n, 4)`` window boxes ``(y1, x1, y2, x2)``.
        grid: ``(gh, gw)`` patch grid of every window.
        patch_size: Patch side P in pixels.

    Returns:
        ``(n * gh * gw, 2)`` float32 ``(y, x)`` on ``boxes``' device, window-major, then
        row-major within a window (the order of ``features.flatten(2)``).
    """
    _check_boxes(boxes)
    if len(grid) != 2:
        raise ValueError(f"grid must be (gh, gw), got {grid!r}")
    gh = _positive_int(grid[0], "grid[0]")
    gw = _positive_int(grid[1], "grid[1]")
    patch_size = _positive_int(patch_size, "patch_size")
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
    the window's own size ``(y2 - y1, x2 - x1)`` (as the paper's code does; for a window
    that is not a multiple of the patch size this differs from resizing to the padded
    size and cropping), added into place, and the sum divided per pixel by the number of
    windows covering it (computed as matrix products, without the resized windows
    themselves).

    Args:
        window_scores: ``(n, C, gh, gw)`` scores per window patch.
        boxes: ``(n, 4)`` window boxes ``(y1, x1, y2, x2)`` that together cover the image.
        height: Image height H.
        width: Image width W.
        patch_size: Patch side P in pixels.

    Returns:
        ``(C, H, W)`` scores, same dtype and device as ``window_scores``.
    """
    if not isinstance(window_scores, Tensor):
        raise TypeError(f"window_scores must be a torch.Tensor, got {type(window_scores).__name__}")
    if window_scores.ndim != 4:
        raise ValueError(
            f"window_scores must have shape (n, C, gh, gw), got {tuple(window_scores.shape)}"
        )
    if not window_scores.dtype.is_floating_point:
        raise TypeError(f"window_scores must be floating point, got {window_scores.dtype}")
    _check_boxes(boxes)
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    patch_size = _positive_int(patch_size, "patch_size")
    n, channels, gh, gw = window_scores.shape
    if boxes.shape[0] != n:
        raise ValueError(f"boxes has {boxes.shape[0]} windows but window_scores has {n}")
    box_list = boxes.tolist()
    if any(y2 > height or x2 > width for _, _, y2, x2 in box_list):
        raise ValueError(f"boxes reach outside the {height}x{width} image")
    if any(y2 - y1 > gh * patch_size or x2 - x1 > gw * patch_size
           for y1, x1, y2, x2 in box_list):
        raise ValueError(
            f"a window is larger than its {gh}x{gw} patch grid of {patch_size}-pixel patches"
        )

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
    if bool((count == 0).any()):
        raise ValueError(f"boxes leave part of the {height}x{width} image uncovered")
    return (total / count).to(window_scores.dtype)


def _resize_matrix(cells: int, length: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``(length, cells)``: bilinear resizing of ``cells`` values to ``length`` along one
    axis as a matrix, taken from ``F.interpolate`` itself (``align_corners=False``,
    clamped at the borders)."""
    eye = torch.eye(cells, dtype=dtype, device=device)[None]
    return F.interpolate(eye, size=length, mode="linear", align_corners=False)[0].T
