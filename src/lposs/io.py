"""Reading images and writing results: image loading with checks, atomic writes,
palette label PNGs, overlays with a legend, JSON and score files.

No model code. Errors a user can cause (missing, unreadable or oversized images)
raise :class:`lposs.errors.ImageError` with one message naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "UNKNOWN_COLOR",
    "UNKNOWN_VALUE",
    "load_image",
    "read_image",
    "as_float",
    "find_images",
    "palette",
    "atomic_write",
    "save_label_png",
    "load_label_map",
    "overlay",
    "save_overlay",
    "write_json",
    "save_scores",
    "class_shares",
]

#: Largest image (height x width) :func:`load_image` decodes unless told otherwise:
#: 100 megapixels (about 1.2 GB as float32 RGB), a guard against decompression bombs.
#: Raise it with ``max_pixels=N`` (CLI: ``--max-pixels N``); ``None`` disables it.
DEFAULT_MAX_PIXELS = 100_000_000

#: File suffixes :func:`find_images` collects from folders and glob patterns.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")

#: Label value that marks "unknown" pixels in saved palette PNGs (also VOC's "ignore").
UNKNOWN_VALUE = 255
#: Colour of "unknown" pixels: the PASCAL VOC palette's entry 255 (its "void" colour).
UNKNOWN_COLOR = (224, 224, 192)

_PILLOW_CAP_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- loading
def _cap_message(pixels: int, max_pixels: int, what: str) -> str:
    return (
        f"{what} has {pixels:,} pixels, more than the limit of {max_pixels:,}; "
        "if you trust it, raise the limit with --max-pixels N (or max_pixels=N / None "
        "in Python)"
    )


def _check_pixels(height: int, width: int, max_pixels: int | None, what: str) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"{what} is empty ({height}x{width} pixels)")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageError(_cap_message(height * width, max_pixels, what))


@contextlib.contextmanager
def _without_pillow_cap() -> Iterator[None]:
    """Pillow's own decompression-bomb check off (we apply ``max_pixels`` from the header).

    Pillow's limit is a process-wide global: it is changed under a lock (so concurrent
    :func:`load_image` calls decode one at a time) and restored on exit. Other threads
    that call Pillow directly meanwhile see no Pillow limit.
    """
    with _PILLOW_CAP_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pil_to_tensor(im: Image.Image, what: str) -> Tensor:
    """Any Pillow mode to ``(3, H, W)`` RGB: uint8 for 8-bit modes, float32 in [0, 1] for
    16-bit and float ones; alpha is dropped."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data (PNG/TIFF) scaled by 1/65535, not clipped to 8 bits
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{what}: 32-bit integer pixels outside 0..65535 are not supported")
        rgb = np.repeat((arr / 65535.0)[..., None], 3, axis=2)
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{what}: float pixels must be finite and in [0, 1]")
        rgb = np.repeat(arr[..., None], 3, axis=2)
    else:
        if mode in ("P", "PA"):
            im = im.convert("RGBA")  # applies palette transparency without Pillow's warning
        try:
            im = im.convert("RGB")  # L, 1, LA, RGBA (alpha dropped), CMYK, YCbCr, ...
        except (ValueError, OSError) as exc:
            raise ImageError(f"{what}: unsupported image mode {mode!r} ({exc})") from exc
        return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


def _decode(im: Image.Image, what: str, max_pixels: int | None) -> Image.Image:
    """Check the header size, decode the pixels and apply the EXIF orientation."""
    width, height = im.size  # from the header: Image.open does not decode pixels
    _check_pixels(height, width, max_pixels, what)
    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode {what}: the file is truncated or corrupt ({exc})") from exc


def _from_array(arr: np.ndarray, max_pixels: int | None) -> Tensor:
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise TypeError(f"image array must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}"
        )
    _check_pixels(arr.shape[0], arr.shape[1], max_pixels, "image array")
    arr = arr[..., :3] if arr.shape[2] == 4 else arr  # RGBA: alpha dropped
    out = torch.from_numpy(np.array(arr, dtype=np.uint8 if arr.dtype == np.uint8
                                    else np.float32))  # always a copy
    if out.dtype != torch.uint8:
        _check_float_range(out, "image array")
    return out.permute(2, 0, 1).expand(3, -1, -1).contiguous()


def _check_float_range(t: Tensor, what: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ImageError(f"{what} contains NaN or infinite values")
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ImageError(
            f"{what} values must be in [0, 1], got [{float(t.min()):.4g}, {float(t.max()):.4g}]"
        )


def _from_tensor(t: Tensor, max_pixels: int | None) -> Tensor:
    if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
        raise TypeError(f"image tensor must be float in [0, 1] or uint8, got {t.dtype}")
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ImageError(
            f"image tensor must have shape (3, H, W) (channels first), got {tuple(t.shape)}"
        )
    _check_pixels(t.shape[1], t.shape[2], max_pixels, "image tensor")
    if t.dtype == torch.uint8:
        t = t.clone()
    else:
        t = t.to(torch.float32, copy=True)
        _check_float_range(t, "image tensor")
    return t.expand(3, -1, -1).contiguous()


def load_image(
    source: str | os.PathLike | Image.Image | np.ndarray | Tensor,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Load an image as RGB float32 in [0, 1] (:func:`read_image`, then scaled).

    Args:
        source: What :func:`read_image` accepts.
        max_pixels: Largest ``H * W`` accepted; ``None`` disables the check.

    Returns:
        ``(3, H, W)`` float32 tensor in [0, 1].
    """
    return as_float(read_image(source, max_pixels=max_pixels))


def as_float(image: Tensor) -> Tensor:
    """``(3, H, W)`` uint8 or float image -> float32 in [0, 1] (8-bit values / 255)."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def read_image(
    source: str | os.PathLike | Image.Image | np.ndarray | Tensor,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Read an image as RGB, keeping 8-bit images 8-bit.

    8-bit sources (most files, 8-bit PIL images, uint8 arrays and tensors) give uint8, so
    that the working-size resize can be the paper's (OpenCV on uint8 pixels, see
    ``windows.resize_image``); 16-bit files and float arrays or tensors give float32 in
    [0, 1].

    Accepted sources:

    * a file path: any format Pillow reads; the size is checked against ``max_pixels``
      from the header before any pixel is decoded; EXIF orientation is applied;
    * a PIL image (EXIF orientation applied too);
    * a numpy array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``, uint8 or float in [0, 1];
    * a tensor ``(3, H, W)`` (or ``(1, H, W)``/``(H, W)`` grey), float in [0, 1] or
      uint8; the result stays on the tensor's device.

    Conversions: grey and palette images become RGB; alpha (RGBA, LA, palette
    transparency, 4-channel arrays) is dropped, keeping the stored colours, as
    OpenCV/mmseg loaders do; CMYK uses Pillow's conversion; 16-bit images (``I;16``,
    ``I``) are scaled by 1/65535 rather than clipped. Multi-frame files give their
    first frame.

    Args:
        source: The image, see above.
        max_pixels: Largest ``H * W`` accepted; ``None`` disables the check.

    Returns:
        ``(3, H, W)`` tensor: uint8, or float32 in [0, 1].

    Raises:
        ImageError: Missing, unreadable, truncated or too large image, or an array of
            the wrong shape or value range.
        TypeError: An unsupported source type or dtype.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        what = f"image {str(path)!r}"
        if not path.exists():
            raise ImageError(f"image file not found: {str(path)!r}")
        if path.is_dir():
            raise ImageError(f"{what} is a folder, not an image file")
        with _without_pillow_cap():
            try:
                with Image.open(path) as im:
                    decoded = _decode(im, what, max_pixels)
            except UnidentifiedImageError as exc:
                raise ImageError(f"{what} is not an image file Pillow can read") from exc
            except OSError as exc:  # permission denied, I/O errors
                raise ImageError(f"cannot read {what}: {exc.strerror or exc}") from exc
        return _pil_to_tensor(decoded, what)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or ""
        what = f"image {name!r}" if name else "PIL image"
        with _without_pillow_cap():
            decoded = _decode(source, what, max_pixels)
        return _pil_to_tensor(decoded, what)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Tensor):
        return _from_tensor(source, max_pixels)
    raise TypeError(
        "image must be a path, PIL image, numpy array or torch tensor, "
        f"got {type(source).__name__}"
    )


# ----------------------------------------------------------------------------- finding
def _image_files_under(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found)


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Expand files, folders and glob patterns into a list of image files.

    A file is taken as given (whatever its suffix). A folder is searched recursively for
    files ending in :data:`IMAGE_SUFFIXES` (case-insensitive; hidden files and folders
    skipped), sorted. A glob pattern (``*``, ``?``, ``[``; ``**`` recurses) keeps its
    image files and expands the folders it matches. Duplicates (same resolved path) are
    dropped, first occurrence kept.

    Args:
        inputs: Paths or patterns, e.g. the CLI's positional arguments.

    Returns:
        ``(found, missing)``: the image paths in order, and the inputs that matched no
        image (a missing path, a folder without images, a pattern matching nothing).
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise TypeError("inputs must be a sequence of paths, not a single path")
    found: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = _image_files_under(path)
        elif any(c in text for c in "*?["):
            matches = []
            for hit in sorted(glob.glob(text, recursive=True)):
                hit_path = Path(hit)
                if hit_path.is_dir():
                    matches.extend(_image_files_under(hit_path))
                elif hit_path.is_file() and hit.lower().endswith(IMAGE_SUFFIXES):
                    matches.append(hit_path)
        else:
            matches = []
        if not matches:
            missing.append(text)
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                found.append(match)
    return found, missing


# ----------------------------------------------------------------------------- writing
def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic class colours: the PASCAL VOC palette.

    Colour ``i`` interleaves the bits of ``i`` into the high bits of R, G and B (VOC's
    ``bitget`` construction), so the first 21 match the VOC label colours, entry 0 is
    black and all colours are distinct for ``n <= 2**24``. Entry 255 equals
    :data:`UNKNOWN_COLOR`, which is why "unknown" is stored as label 255 when there are
    fewer than 255 classes (:func:`save_label_png`).

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


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import, not while other threads create files


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that it is either complete or absent.

    ``write`` gets a binary file object for a temporary file in the same folder; the
    data is flushed and fsynced, then the temporary file replaces ``path``
    (``os.replace``). If ``write`` raises, the temporary file is removed, ``path`` is
    left as it was, and the exception propagates.

    Args:
        path: Destination file; its folder must exist.
        write: Callable that writes the content to the file object it is given.

    Raises:
        FileNotFoundError: The destination folder does not exist.
        PermissionError: The destination folder is not writable.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist"
        )
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write {str(path)!r}: folder {str(folder)!r} is not writable"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.name == "posix":  # mkstemp makes 0600 files; give the usual permissions
            os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


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
    arr = arr.astype(np.int64)
    bad = (arr < 0) | ((arr > n_classes) & (arr != UNKNOWN_VALUE))
    if bad.any():
        raise ValueError(
            f"labels must be class indices 0..{n_classes - 1}, {n_classes} (unknown) or "
            f"{UNKNOWN_VALUE}, found {int(arr[bad][0])}"
        )
    return arr


def _check_colors(colors: Any) -> np.ndarray:
    arr = np.asarray(colors)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"colors must have shape (n, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"colors must be uint8, got {arr.dtype}")
    return arr


def save_label_png(path: str | os.PathLike, labels: Any, colors: Any) -> None:
    """Save a label map losslessly, pixel value = class index.

    With fewer than 255 classes the PNG is a palette image (mode ``"P"``) whose palette
    holds ``colors`` and :data:`UNKNOWN_COLOR` at entry 255; "unknown" pixels (label
    ``n`` = number of classes, as the segmenter returns them, or 255) are stored as 255.
    With 255 classes or more, a 16-bit grey PNG holds the raw labels (unknown = ``n``).

    Args:
        path: Output ``.png`` file (written atomically).
        labels: ``(H, W)`` integer labels in ``0..n`` (``n`` = unknown) or 255.
        colors: ``(n, 3)`` uint8 class colours, e.g. ``palette(n)``.
    """
    colors = _check_colors(colors)
    n = colors.shape[0]
    arr = _check_labels(labels, n)
    if n < UNKNOWN_VALUE:
        arr = np.where(arr == n, UNKNOWN_VALUE, arr)
        height, width = arr.shape
        im = Image.frombytes("P", (width, height), np.ascontiguousarray(arr, np.uint8).tobytes())
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:n] = colors
        table[UNKNOWN_VALUE] = UNKNOWN_COLOR
        im.putpalette(table.reshape(-1).tolist())
    else:
        if n >= 65535:
            raise ValueError(f"at most 65534 classes fit a 16-bit label PNG, got {n}")
        im = Image.fromarray(arr.astype(np.uint16))
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def load_label_map(path: str | os.PathLike) -> Tensor:
    """Read a label map saved by :func:`save_label_png` (or any index/grey label PNG).

    Palette images give their pixel indices (not colours), grey and 16-bit images their
    values; 255 keeps its meaning (unknown / ignore).

    Args:
        path: Label image file.

    Returns:
        ``(H, W)`` int64 labels.

    Raises:
        ImageError: Missing or unreadable file, or a colour (RGB) image, whose colours
            cannot be mapped to labels without a palette.
    """
    path = Path(path)
    what = f"label map {str(path)!r}"
    if not path.is_file():
        raise ImageError(f"{what} not found" if not path.exists() else f"{what} is not a file")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise ImageError(
                    f"{what} has mode {im.mode!r}; expected a palette (P) or grey (L, 16-bit) "
                    "PNG of class indices"
                )
            arr = np.array(im, dtype=np.int64)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{what} is not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read {what}: {exc}") from exc
    return torch.from_numpy(arr)


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
    flat = arr.reshape(-1).astype(np.int64)
    flat = np.where((flat >= 0) & (flat < n_classes), flat, n_classes)
    counts = np.bincount(flat, minlength=n_classes + 1)
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

    Returns:
        RGB PIL image of size ``(W + panel width) x max(H, legend height)``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = _check_colors(colors)
    names = list(class_names)
    if len(names) != colors.shape[0]:
        raise ValueError(f"got {len(names)} class names but {colors.shape[0]} colors")
    rgb = load_image(image, max_pixels=None).cpu().numpy().transpose(1, 2, 0)
    arr = _check_labels(labels, len(names))
    if arr.shape != rgb.shape[:2]:
        raise ValueError(f"labels shape {arr.shape} does not match image size {rgb.shape[:2]}")

    n = len(names)
    table = np.concatenate([colors, np.array([UNKNOWN_COLOR], dtype=np.uint8)]).astype(np.float32)
    index = np.where(arr < n, arr, n)
    blended = (1.0 - alpha) * rgb * 255.0 + alpha * table[index]
    base = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")

    shares = class_shares(index, n)
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


def save_overlay(path: str | os.PathLike, image: Image.Image) -> None:
    """Save an image made by :func:`overlay` atomically, in the format of ``path``'s suffix.

    Args:
        path: Output file; an unknown suffix is written as PNG.
        image: The PIL image to save.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image (see overlay()), got {type(image).__name__}")
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda f: image.save(f, format=fmt))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k.item() if isinstance(k, np.generic) else k: _jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (Tensor, np.ndarray)):
        return _jsonable(_as_numpy(obj, "value").tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 2, trailing newline), atomically.

    numpy/torch scalars and arrays become numbers and lists, paths become strings, and
    NaN or infinite floats become ``null`` so the file is strict JSON. The text is built
    before the file is touched, so an unserialisable object leaves no file behind.

    Args:
        path: Output file.
        obj: JSON-serialisable data (dicts, lists, str, numbers, bool, None).
    """
    text = json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def save_scores(path: str | os.PathLike, scores: Any) -> None:
    """Save per-class scores as a float32 ``.npy`` file, atomically, at exactly ``path``.

    Args:
        path: Output file (no suffix is added).
        scores: ``(C, H, W)`` scores, numpy array or tensor; or an object with ``shape``
            ``(C, H, W)`` and ``class_scores(c)`` giving one ``(H, W)`` map at a time
            (``segmenter.ScoreMaps``), written class by class so that the whole array
            never sits in memory.
    """
    if hasattr(scores, "class_scores"):
        shape = tuple(scores.shape)

        def write(f: BinaryIO) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(f, header)
            for c in range(shape[0]):
                f.write(_as_numpy(scores.class_scores(c), "scores").astype(np.float32).tobytes())

        atomic_write(path, write)
        return
    arr = _as_numpy(scores, "scores")
    if arr.ndim != 3:
        raise ValueError(f"scores must have shape (C, H, W), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
