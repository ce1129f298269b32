"""Drawing segmentations: the class palette, pixel shares, and the overlay with a legend.

No model code; numpy and Pillow. The files these end up in are written by
:mod:`lposs.output.files`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..config import BAND_PIXELS, UNKNOWN
from ..pipeline.image import read_image

__all__ = [
    "UNKNOWN_COLOR",
    "palette",
    "class_shares",
    "drawable",
    "wrap_text",
    "legend_lines",
    "overlay",
]

#: Colour of "unknown" pixels: the PASCAL VOC palette's entry 255 (its "void" colour).
UNKNOWN_COLOR = (224, 224, 192)

# The legend's font, shipped with lposs (licence: data/fonts/LICENSE-DejaVu.txt).
_FONT_FILE = Path(__file__).parent / "data" / "fonts" / "DejaVuSans.ttf"
_NO_GLYPH = "\U0010fffd"  # a private-use character: drawn as the font's .notdef box
_ELLIPSIS = "\u2026"
_MIN_LEGEND_WIDTH = 320  # px: the legend may be this wide even beside a narrower image


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8: ``n`` distinct, deterministic class colours, none near-black.

    The PASCAL VOC palette (VOC's ``bitget`` construction) without its entries whose
    channels are all below 128 (every index divisible by 8) and without
    :data:`UNKNOWN_COLOR`: class 0 is VOC's colour 1 (dark red), class 1 VOC's 2 (green),
    ... The label PNG's palette and the overlay use the same colours.
    """
    candidates = np.arange(1, n + n // 7 + 16, dtype=np.int64)
    candidates = candidates[candidates % 8 != 0]  # indices whose channels are all < 128
    out = np.zeros((len(candidates), 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            out[:, channel] |= ((candidates >> (3 * j + channel)) & 1) << (7 - j)
    out = out[(out != UNKNOWN_COLOR).any(axis=1)]
    return out[:n].astype(np.uint8)


def _check_labels(labels: Any, n_classes: int) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
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
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    flat = arr.reshape(-1)
    counts = np.zeros(n_classes + 1, dtype=np.int64)
    for start in range(0, flat.size, BAND_PIXELS):  # in bands: no int64 copy of a large map
        band = flat[start:start + BAND_PIXELS].astype(np.int64)
        band = np.where((band >= 0) & (band < n_classes), band, n_classes)
        counts += np.bincount(band, minlength=n_classes + 1)
    return (counts / flat.size).tolist()


def _legend_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped in ``lposs/data/fonts``) at ``size`` px; Pillow's built-in
    font where Pillow lacks FreeType."""
    try:
        return ImageFont.truetype(str(_FONT_FILE), size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _missing_glyph(font: Any) -> bytes | None:
    """The font's drawing of a character it lacks (its ``.notdef`` box), to compare with."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return None
    mask = font.getmask(_NO_GLYPH)
    return bytes(mask) + bytes(str(mask.size), "ascii")


def drawable(font: Any, text: str) -> bool:
    """Whether ``font`` has a glyph for every visible character of ``text``: a character
    is missing when drawn as a private-use character no font defines (the ``.notdef``
    box); Pillow's built-in bitmap font draws Latin-1 only."""
    notdef = _missing_glyph(font)
    for char in text:
        if char.isspace() or unicodedata.category(char) in ("Cf", "Mn", "Me"):
            continue
        if notdef is None:
            if ord(char) > 0xFF:
                return False
            continue
        mask = font.getmask(char)
        if bytes(mask) + bytes(str(mask.size), "ascii") == notdef:
            return False
    return True


def _fit(font: Any, text: str, width: float) -> int:
    """The longest prefix of ``text`` (in characters) that ``font`` draws within ``width``."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid]) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def wrap_text(font: Any, text: str, width: float, *, max_lines: int = 2,
              suffix: str = "") -> list[str]:
    """``text`` broken into at most ``max_lines`` lines (at least one) of at most
    ``width`` px, at spaces where possible, the last line ending in ``suffix`` (never
    cut, e.g. a share ``"  12.5%"``) and shortened with "…" when the text does not fit."""
    lines: list[str] = []
    rest = text
    while len(lines) < max_lines:
        last = len(lines) == max_lines - 1
        if font.getlength(rest + suffix) <= width:
            lines.append(rest + suffix)
            return lines
        if last:
            room = width - font.getlength(_ELLIPSIS + suffix)
            lines.append(rest[:max(_fit(font, rest, room), 1)].rstrip() + _ELLIPSIS + suffix)
            return lines
        cut = max(_fit(font, rest, width), 1)
        space = rest.rfind(" ", 0, cut + 1)
        if space > cut // 2:
            cut = space
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return lines


def legend_lines(
    font: Any,
    class_names: Sequence[str],
    shares: Sequence[float],
    width: float,
    *,
    unknown_name: str = "unknown",
) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """What the overlay's legend says, laid out within ``width`` px of text.

    Args:
        font: the legend's font.
        class_names: the C class names.
        shares: ``C + 1`` pixel shares (unknown last).
        width: pixels available for text.
        unknown_name: the entry of unknown pixels.

    Returns:
        ``(entries, not_found)``: per class present (largest share first; unknown as
        index C), its index and its text lines (name, wrapped to two lines at most and
        ellipsised, then its share); and the lines (ten at most) of the "not found: ..."
        list naming the classes with no pixel. A name the font cannot draw (e.g. CJK in
        DejaVu Sans) appears as ``#i``, its index in the label PNG (the JSON holds
        the name).
    """
    n = len(class_names)

    def label(i: int) -> str:
        name = class_names[i] if i < n else unknown_name
        return name if drawable(font, name) else f"#{i}"

    present = sorted((i for i in range(n + 1) if shares[i] > 0), key=lambda i: -shares[i])
    entries = [(i, wrap_text(font, label(i), width, suffix=f"  {shares[i]:.1%}"))
               for i in present]
    absent = [label(i) for i in range(n) if shares[i] <= 0]
    not_found: list[str] = []
    if absent:
        short = [wrap_text(font, name, width / 2, max_lines=1)[0] for name in absent]
        not_found = wrap_text(font, "not found: " + ", ".join(short), width, max_lines=10)
    return entries, not_found


def _paste_blend(canvas: Image.Image, pixels: Tensor, labels: np.ndarray, table: np.ndarray,
                 alpha: float) -> None:
    """Paste ``(1 - alpha) * image + alpha * colour`` into ``canvas``, in bands of rows."""
    n = len(table) - 1  # the last colour is unknown's
    height, width = labels.shape
    rows = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        rgb = pixels[:, top:top + rows].float()
        rgb = (rgb / 255.0 if pixels.dtype == torch.uint8 else rgb).numpy().transpose(1, 2, 0)
        band = labels[top:top + rows]
        blended = (1.0 - alpha) * rgb * 255.0 + alpha * table[np.where(band < n, band, n)]
        canvas.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8),
                                     mode="RGB"), (0, top))


def _draw_legend(draw: ImageDraw.ImageDraw, origin: tuple[int, int], entries, not_found,
                 table: np.ndarray, font: Any, line: int) -> None:
    """Draw the legend's entries (a colour square, then the lines) and "not found" lines."""
    margin, square = line // 2, line - 4
    x, y = origin
    for i, lines in entries:
        draw.rectangle([x, y + 2, x + square - 1, y + 2 + square - 1],
                       fill=tuple(int(c) for c in table[i]))
        for text in lines:
            draw.text((x + square + margin, y), text, fill=(0, 0, 0), font=font)
            y += line
    y += margin if not_found and entries else 0
    for text in not_found:
        draw.text((x, y), text, fill=(96, 96, 96), font=font)
        y += line


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
    :data:`UNKNOWN_COLOR`). The legend (:func:`legend_lines`, in DejaVu Sans) lists the
    classes present, largest share first, then "not found: ...", in a white panel beside
    the image at most ``max(W, 320)`` px wide.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1], or anything ``read_image`` accepts.
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
    if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3 and (
            image.dtype == torch.uint8):
        pixels = image.cpu()  # an 8-bit image in memory (Segmenter.image) is not copied
    else:
        pixels = read_image(image, max_pixels=None).cpu()  # uint8 stays uint8: scaled per band
    arr = _check_labels(labels, len(names))
    if arr.shape != tuple(pixels.shape[1:]):
        raise ValueError(f"labels shape {arr.shape} does not match image size "
                         f"{tuple(pixels.shape[1:])}")

    n = len(names)
    table = np.concatenate([colors, np.array([UNKNOWN_COLOR], dtype=np.uint8)]).astype(np.float32)
    if shares is None:
        shares = class_shares(arr, n)
    elif len(shares) != n + 1:
        raise ValueError(f"shares must hold {n + 1} values (classes, then unknown)")
    height, width = arr.shape
    font = _legend_font(max(12, min(height, width) // 40))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line = ascent + descent + 4
    margin, square = line // 2, line - 4
    max_text_w = max(width, _MIN_LEGEND_WIDTH) - 3 * margin - square
    entries, not_found = legend_lines(font, names, shares, max_text_w, unknown_name=unknown_name)
    texts = [t for _, lines in entries for t in lines] + not_found
    text_w = int(np.ceil(max((font.getlength(t) for t in texts), default=0)))
    panel_w = 3 * margin + square + text_w
    n_lines = sum(len(lines) for _, lines in entries) + len(not_found)
    legend_h = 2 * margin + line * n_lines + (margin if not_found and entries else 0)
    canvas = Image.new("RGB", (width + panel_w, max(height, legend_h)), (255, 255, 255))
    _paste_blend(canvas, pixels, arr, table, alpha)
    _draw_legend(ImageDraw.Draw(canvas), (width + margin, margin), entries, not_found, table,
                 font, line)
    return canvas
