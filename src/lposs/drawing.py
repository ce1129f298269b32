"""Drawing segmentations: the class palette, pixel shares, and the overlay with a legend.

No model code; numpy and Pillow. The files these end up in are written by
:mod:`lposs.files`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .config import UNKNOWN
from .images import as_float, read_image

__all__ = [
    "UNKNOWN_COLOR",
    "palette",
    "class_shares",
    "overlay",
]

# Pixels per band when a large label map or image is processed piecewise (~1M: a few MB).
_BAND_PIXELS = 1 << 20

#: Colour of "unknown" pixels: the PASCAL VOC palette's entry 255 (its "void" colour).
UNKNOWN_COLOR = (224, 224, 192)


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic class colours: the PASCAL VOC palette.

    Colour ``i`` interleaves the bits of ``i`` into the high bits of R, G and B (VOC's
    ``bitget`` construction), so the first 21 match the VOC label colours, entry 0 is
    black and all colours are distinct for ``n <= 2**24``. Entry 255 equals
    :data:`UNKNOWN_COLOR`, which is why "unknown" is stored as label 255 when there are
    fewer than 255 classes (:func:`lposs.files.save_label_png`).

    Args:
        n: Number of colours.

    Returns:
        ``(n, 3)`` uint8 array.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if n > 2**24:
        raise ValueError(f"n must be at most 2**24 for distinct colours, got {n}")
    idx = np.arange(n, dtype=np.int64)
    out = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            out[:, channel] |= ((idx >> (3 * j + channel)) & 1) << (7 - j)
    return out.astype(np.uint8)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_labels(labels: Any, n_classes: int) -> np.ndarray:
    arr = _as_numpy(labels, "labels")
    if arr.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > n_classes):  # no copy when all are valid
        bad = (arr < 0) | ((arr > n_classes) & (arr != UNKNOWN))
        if bad.any():
            raise ValueError(
                f"labels must be class indices 0..{n_classes - 1}, {n_classes} (unknown) or "
                f"{UNKNOWN}, found {int(arr[bad][0])}"
            )
    return arr


def _check_colors(colors: Any) -> np.ndarray:
    arr = np.asarray(colors)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"colors must have shape (n, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"colors must be uint8, got {arr.dtype}")
    return arr


def class_shares(labels: Any, n_classes: int) -> list[float]:
    """Share of pixels per class, and of unknown pixels last.

    Args:
        labels: ``(H, W)`` integer labels; values outside ``0..n_classes - 1`` (the
            segmenter's ``n_classes``, or 255) count as unknown.
        n_classes: Number of classes C.

    Returns:
        ``C + 1`` floats summing to 1: classes ``0..C-1``, then unknown.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes <= 0:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    arr = _as_numpy(labels, "labels")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError("labels is empty")
    flat = arr.reshape(-1)
    counts = np.zeros(n_classes + 1, dtype=np.int64)
    for start in range(0, flat.size, _BAND_PIXELS):  # in bands: no int64 copy of a large map
        band = flat[start:start + _BAND_PIXELS].astype(np.int64)
        band = np.where((band >= 0) & (band < n_classes), band, n_classes)
        counts += np.bincount(band, minlength=n_classes + 1)
    return (counts / flat.size).tolist()


def _legend_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # embedded Aileron, needs FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _legend_text(font: Any, text: str) -> str:
    # the built-in fonts cover little beyond ASCII: draw "número" as "numero"
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")  # bitmap font: latin-1 only


def overlay(
    image: Any,
    labels: Any,
    class_names: Sequence[str],
    colors: Any,
    *,
    alpha: float = 0.5,
    unknown_name: str = "unknown",
    shares: Sequence[float] | None = None,
) -> Image.Image:
    """The image blended with class colours, and a legend panel to its right.

    Pixel colour is ``(1 - alpha) * image + alpha * class colour`` (unknown pixels use
    :data:`UNKNOWN_COLOR`). The legend lists only the classes present, largest share
    first, each as a square of its exact colour, its name and its share; it is drawn
    with Pillow's built-in font, in a white panel that never covers the image. The
    canvas is as tall as the image or the legend, whichever is taller.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1], or anything :func:`load_image` accepts.
        labels: ``(H, W)`` integer labels (``len(class_names)`` or 255 = unknown).
        class_names: The C class names.
        colors: ``(C, 3)`` uint8 class colours.
        alpha: Weight of the class colour, in [0, 1].
        unknown_name: Legend entry for unknown pixels.
        shares: ``C + 1`` pixel shares of ``labels`` (:func:`class_shares`) when the
            caller has them already; computed here when None.

    Returns:
        RGB PIL image of size ``(W + panel width) x max(H, legend height)``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = _check_colors(colors)
    names = list(class_names)
    if len(names) != colors.shape[0]:
        raise ValueError(f"got {len(names)} class names but {colors.shape[0]} colors")
    pixels = read_image(image, max_pixels=None).cpu()  # uint8 stays uint8: scaled per band
    arr = _check_labels(labels, len(names))
    if arr.shape != tuple(pixels.shape[1:]):
        raise ValueError(f"labels shape {arr.shape} does not match image size "
                         f"{tuple(pixels.shape[1:])}")

    n = len(names)
    table = np.concatenate([colors, np.array([UNKNOWN_COLOR], dtype=np.uint8)]).astype(np.float32)
    base = Image.new("RGB", (arr.shape[1], arr.shape[0]))
    rows = max(1, _BAND_PIXELS // max(arr.shape[1], 1))
    for top in range(0, arr.shape[0], rows):  # blended in bands of rows: no float image
        rgb = as_float(pixels[:, top:top + rows]).numpy().transpose(1, 2, 0)
        band = arr[top:top + rows]
        blended = (1.0 - alpha) * rgb * 255.0 + alpha * table[np.where(band < n, band, n)]
        base.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8),
                                   mode="RGB"), (0, top))

    if shares is None:
        shares = class_shares(arr, n)
    elif len(shares) != n + 1:
        raise ValueError(f"shares must hold {n + 1} values (classes, then unknown), "
                         f"got {len(shares)}")
    order = sorted((i for i, s in enumerate(shares) if s > 0), key=lambda i: -shares[i])
    height, width = arr.shape
    font = _legend_font(max(12, min(height, width) // 40))
    entries = [(tuple(int(c) for c in table[i]),
                _legend_text(font, f"{names[i] if i < n else unknown_name}  {shares[i]:.1%}"))
               for i in order]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for _, text in entries]
    line = max(max(b[3] for b in boxes), 12) + 6
    margin, square = line // 2, line - 6
    text_w = max(b[2] for b in boxes)
    panel_w = 2 * margin + square + margin + text_w
    canvas = Image.new("RGB", (width + panel_w, max(height, 2 * margin + line * len(entries))),
                       (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (color, text) in enumerate(entries):
        x, y = width + margin, margin + k * line
        draw.rectangle([x, y, x + square - 1, y + square - 1], fill=color)
        draw.text((x + square + margin, y), text, fill=(0, 0, 0), font=font)
    return canvas
