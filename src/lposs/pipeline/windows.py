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
    "working_image",
    "BandResize",
    "window_grid",
    "crop_windows",
    "pad_to_multiple",
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


def working_image(image: Tensor, short_side: int = 448, long_side: int = 2048) -> Tensor:
    """``(3, H, W)`` uint8 or float image -> ``(3, h, w)`` float32 in [0, 1] at the
    working size (:func:`working_size`, resized by :func:`resize_image`)."""
    size = working_size(*image.shape[-2:], short_side, long_side)
    return resize_image(image, size).float()


class BandResize:
    """Bilinear resize of ``(..., h, w)`` planes to ``(..., H, W)``, one band of output rows
    at a time, so that a large output never has to exist whole.

    The same rule as ``F.interpolate(mode="bilinear", align_corners=False)``: output
    index ``i`` reads the source at ``s = max(scale * (i + 0.5) - 0.5, 0)`` with ``scale =
    in / out`` in float32, between ``floor(s)`` and the next index (clamped at the last),
    with weights ``1 - l`` and ``l``, ``l = s - floor(s)``. Each axis is one pass (columns,
    then rows), each tap pair evaluated as ``a * wa + (b * wb)`` with one rounding of the
    sum, as torch's vectorised CPU kernel computes it: the bands agree with
    ``F.interpolate`` of the whole plane to within a float32 rounding, and on the CPU
    bit for bit at the sizes of real images (tiny planes take another kernel in torch).
    A band of every output row is ``F.interpolate`` itself.

    Args:
        source: ``(h, w)`` the planes' size.
        target: ``(H, W)`` the output size.
        device: where the index and weight tables live (the planes' device).
    """

    def __init__(self, source: tuple[int, int], target: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        self.source = (_positive_int(source[0], "source[0]"), _positive_int(source[1], "source[1]"))
        self.target = (_positive_int(target[0], "target[0]"), _positive_int(target[1], "target[1]"))
        self._rows = _linear_taps(self.source[0], self.target[0], device)
        self._cols = _linear_taps(self.source[1], self.target[1], device)

    def bands(self, rows: int) -> list[tuple[int, int]]:
        """``(top, bottom)`` of consecutive bands of at most ``rows`` output rows."""
        rows = _positive_int(rows, "rows")
        return [(top, min(top + rows, self.target[0])) for top in range(0, self.target[0], rows)]

    def band(self, planes: Tensor, top: int, bottom: int) -> Tensor:
        """Output rows ``top:bottom`` of the resized ``planes``.

        Args:
            planes: ``(..., h, w)`` float32 planes (other float dtypes are cast).
            top, bottom: ``0 <= top < bottom <= H``.

        Returns:
            ``(..., bottom - top, W)`` float32, a new tensor on the planes' device.
        """
        if tuple(planes.shape[-2:]) != self.source:
            raise ValueError(f"planes must be (..., {self.source[0]}, {self.source[1]}), got "
                             f"{tuple(planes.shape)}")
        if not 0 <= top < bottom <= self.target[0]:
            raise ValueError(f"band {top}:{bottom} is outside 0:{self.target[0]}")
        if bottom - top == self.target[0]:  # the whole output: torch's kernel itself
            flat = planes.float().reshape(-1, 1, *self.source)
            out = F.interpolate(flat, size=self.target, mode="bilinear", align_corners=False)
            return out.reshape(*planes.shape[:-2], *self.target)
        r0, r1, rw0, rw1 = (t[top:bottom] for t in self._rows)
        first, last = int(r0[0]), int(r1[-1]) + 1  # the source rows this band reads
        planes = planes[..., first:last, :].float()
        c0, c1, cw0, cw1 = self._cols
        across = _lerp(planes.index_select(-1, c0), cw0, planes.index_select(-1, c1), cw1)
        return _lerp(across.index_select(-2, r0 - first), rw0[:, None],  # (..., rows, W)
                     across.index_select(-2, r1 - first), rw1[:, None])


def _linear_taps(n_in: int, n_out: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(i0, i1, w0, w1)``, each ``(n_out,)``: the two source indices and weights of
    bilinear resizing ``n_in`` values to ``n_out`` (``align_corners=False``), computed as
    ATen does in float32 (its ``area_pixel_compute_source_index``: ``scale * (i + 0.5) -
    0.5`` with one rounding, then ``guard_index_and_lambda``)."""
    scale = torch.tensor(float(n_in), dtype=torch.float32) / float(n_out)
    centres = torch.arange(n_out, dtype=torch.float64) + 0.5
    src = (scale.double() * centres - 0.5).float().clamp_min(0)  # one rounding, as a fused op
    i0 = src.floor().long().clamp_max(n_in - 1)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device)


def _lerp(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor) -> Tensor:
    """``a * wa + (b * wb)`` in float32; ``addcmul`` fuses the outer multiply-add (one
    rounding) where the CPU or GPU has fused multiply-add, as torch's resize kernel does."""
    return torch.addcmul(b * wb, a, wa)


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
    crops = torch.stack([image[:, y1:y2, x1:x2] for y1, x1, y2, x2 in box_list])
    return pad_to_multiple(crops, multiple)


def pad_to_multiple(windows: Tensor, multiple: int) -> Tensor:
    """Zero-pad at the bottom/right so that height and width are multiples of ``multiple``:
    the one window padding (crops for the encoders, the encoders' patch grid).

    Args:
        windows: ``(..., h, w)`` tensor.
        multiple: The padded height and width are multiples of this (the patch size).

    Returns:
        ``(..., ceil(h / m) * m, ceil(w / m) * m)``, same dtype and device (``windows``
        itself when no padding is needed).
    """
    h, w = windows.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return windows
    return F.pad(windows, (0, -w % multiple, 0, -h % multiple), value=0.0)


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
