"""Images in: decoding with checks, finding image files, label maps, and the working size.

Errors a user can cause (missing, unreadable or oversized images) raise
:class:`lposs.errors.ImageError` with one message naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ..config import BAND_PIXELS, DEFAULT_MAX_PIXELS
from ..errors import ImageError

__all__ = ["IMAGE_SUFFIXES", "read_image", "find_images", "load_label_map", "working_size",
           "resize_image", "working_image"]

Image.init()
#: File suffixes of images: every suffix Pillow can open (``.avif``, ``.jfif``, ...), what
#: :func:`find_images` collects from folders and a folder dataset takes as its images.
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                              if fmt in Image.OPEN))
#: Pillow modes of a label map: palette (indices, not colours), grey, 16/32-bit, bilevel.
_LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "1")
_PILLOW_CAP_LOCK = threading.Lock()


def _check_pixels(height: int, width: int, max_pixels: int | None, what: str) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"{what} is empty ({height}x{width} pixels)")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageError(f"{what} has {height * width:,} pixels, more than the limit of "
                         f"{max_pixels:,}; if you trust it, raise the limit with --max-pixels N "
                         "(or max_pixels=N / None in Python)")


@contextlib.contextmanager
def _without_pillow_cap() -> Iterator[None]:
    """Pillow's own decompression-bomb check off, under a lock (ours is ``max_pixels``)."""
    with _PILLOW_CAP_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pil_to_tensor(im: Image.Image, what: str) -> Tensor:
    """Any Pillow mode to ``(3, H, W)`` RGB: uint8 for 8-bit modes, float32 in [0, 1] for
    16-bit (scaled by 1/65535) and float ones; alpha is dropped."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{what}: 32-bit integer pixels outside 0..65535 are not supported")
        arr = arr / 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{what}: float pixels must be finite and in [0, 1]")
    else:
        if mode in ("P", "PA"):
            im = im.convert("RGBA")  # applies palette transparency without Pillow's warning
        if im.mode != "RGB":  # convert("RGB") of an RGB image would be a full copy
            try:
                im = im.convert("RGB")  # L, 1, LA, RGBA (alpha dropped), CMYK, YCbCr, ...
            except (ValueError, OSError) as exc:
                raise ImageError(f"{what}: unsupported image mode {mode!r} ({exc})") from exc
        return _rgb_rows_to_tensor(im)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).expand(3, -1, -1).clone()


def _rgb_rows_to_tensor(im: Image.Image) -> Tensor:
    """An RGB Pillow image -> ``(3, H, W)`` uint8, copied in bands of rows, so that no
    whole-image intermediate (Pillow's bytes, an ``(H, W, 3)`` array) is made next to it."""
    width, height = im.size
    rows = max(1, BAND_PIXELS // width)
    out = np.empty((3, height, width), dtype=np.uint8)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        out[:, top:bottom] = np.asarray(im.crop((0, top, width, bottom))).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _decode(im: Image.Image, what: str, max_pixels: int | None, *,
            in_place: bool = False) -> Image.Image:
    """Check the header size, decode the pixels and apply the EXIF orientation (to ``im``
    itself with ``in_place``, for an image we opened: no copy of its pixels)."""
    _check_pixels(im.height, im.width, max_pixels, what)  # from the header: nothing decoded
    try:
        im.load()
        if not in_place:
            return ImageOps.exif_transpose(im)
        ImageOps.exif_transpose(im, in_place=True)
        return im
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode {what}: the file is truncated or corrupt ({exc})") from exc


def _from_tensor(t: Tensor, max_pixels: int | None, what: str) -> Tensor:
    """A ``(C, H, W)`` uint8 or float tensor (C = 1, 3, or 4: alpha dropped) -> a checked
    RGB copy."""
    if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
        raise TypeError(f"{what} must be uint8 or float in [0, 1], got dtype {t.dtype}")
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ImageError(f"{what} must have shape (3, H, W) (channels first), got "
                         f"{tuple(t.shape)}")
    _check_pixels(t.shape[1], t.shape[2], max_pixels, what)
    t = t[:3].to(torch.uint8 if t.dtype == torch.uint8 else torch.float32, copy=True)
    if t.dtype != torch.uint8 and t.numel():
        if not bool(torch.isfinite(t).all()):
            raise ImageError(f"{what} contains NaN or infinite values")
        if float(t.min()) < 0.0 or float(t.max()) > 1.0:
            raise ImageError(f"{what} values must be in [0, 1], got "
                             f"[{float(t.min()):.4g}, {float(t.max()):.4g}]")
    return t.expand(3, -1, -1).contiguous()


def read_image(source: str | os.PathLike | Image.Image | np.ndarray | Tensor, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """The one image reader: a file (any format Pillow reads), PIL image, numpy array
    ``(H, W)``/``(H, W, 3)``/``(H, W, 4)`` or tensor ``(3, H, W)``/``(1, H, W)``/``(H, W)``
    (the result stays on its device) -> ``(3, H, W)`` RGB, uint8 for 8-bit sources (for the
    paper's OpenCV resize, :func:`resize_image`), float32 in [0, 1] for 16-bit files
    (scaled by 1/65535) and float input. Alpha is dropped, EXIF orientation applied, a
    multi-frame file gives its first frame; a file's ``H * W`` is checked against
    ``max_pixels`` (None: no cap) from its header, before decoding.

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
        if not path.exists() and not path.is_symlink():
            raise ImageError(f"image file not found: {str(path)!r}")
        if path.is_dir():
            raise ImageError(f"{what} is a folder, not an image file")
        with _without_pillow_cap():
            try:
                with Image.open(path) as im:
                    decoded = _decode(im, what, max_pixels, in_place=True)
            except UnidentifiedImageError as exc:
                raise ImageError(f"{what} is not an image file Pillow can read") from exc
            except OSError as exc:  # permission denied, I/O errors
                raise ImageError(f"cannot read {what}: {exc.strerror or exc}") from exc
            return _pil_to_tensor(decoded, what)  # its band crops under the lifted cap too
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or ""
        what = f"image {name!r}" if name else "PIL image"
        with _without_pillow_cap():
            return _pil_to_tensor(_decode(source, what, max_pixels), what)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 and source.dtype.kind != "f":
            raise TypeError(f"image array must be uint8 or float in [0, 1], got dtype "
                            f"{source.dtype}")
        arr = source[..., None] if source.ndim == 2 else source
        if arr.ndim != 3:
            raise ImageError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), "
                             f"got {source.shape}")
        return _from_tensor(torch.from_numpy(arr).permute(2, 0, 1), max_pixels, "image array")
    if isinstance(source, Tensor):
        return _from_tensor(source[None] if source.ndim == 2 else source, max_pixels,
                            "image tensor")
    raise TypeError(f"image must be a path, PIL image, numpy array or torch tensor, "
                    f"got {type(source).__name__}")


def _image_files_under(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, sorted; hidden ones and lposs's own
    outputs skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in files
                  if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _is_lposs_output(path: Path) -> bool:
    """Whether ``path`` is a label PNG or overlay that lposs wrote: ``X.png`` or
    ``X_overlay.png`` with lposs's ``X.json`` (which names its source) beside it."""
    name = path.name
    stem = name[:-len("_overlay.png")] if name.endswith("_overlay.png") else path.stem
    try:
        with open(path.parent / f"{stem}.json", encoding="utf-8") as f:
            record = json.load(f) if path.suffix == ".png" else None
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"source", "classes", "provenance"} <= record.keys()


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Expand files (taken as given), folders (searched recursively for
    :data:`IMAGE_SUFFIXES`, hidden ones skipped, sorted) and glob patterns (``**``
    recurses; folders matched are expanded) into image files, skipping lposs's own outputs
    (a label PNG or overlay with its JSON beside it) and repeated real paths.

    Returns:
        ``(found, missing)``: the image paths in order, and the inputs that matched no
        image (a missing path, a folder without images, a pattern matching nothing).
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise TypeError("inputs must be a sequence of paths, not a single path")
    found: list[Path] = []
    missing: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file() or (path.is_symlink() and not path.is_dir()):
            matches = [path]
        else:
            hits = [path] if path.is_dir() else [Path(hit) for hit in sorted(
                glob.glob(text, recursive=True)) if any(c in text for c in "*?[")]
            matches = [m for hit in hits for m in (
                _image_files_under(hit) if hit.is_dir()
                else [hit] if hit.name.lower().endswith(IMAGE_SUFFIXES) else [])
                if not _is_lposs_output(m)]
        if not matches:
            missing.append(text)
        for match in matches:
            key = os.path.realpath(match)  # never raises, even on a link loop
            if key not in seen:
                seen.add(key)
                found.append(match)
    return found, missing


def load_label_map(path: str | os.PathLike, *,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Read a label map (saved predictions, every benchmark's ground truth) as ``(H, W)``
    int64: palette images give their pixel indices (not colours), grey, 16-bit and bilevel
    images their values; 255 keeps its meaning (:data:`lposs.config.UNKNOWN`).
    ``max_pixels`` is checked from the header, as for images.

    Raises:
        ImageError: Missing or unreadable file, a colour (RGB) image, whose colours
            cannot be mapped to labels without a palette, or more than ``max_pixels``.
    """
    path = Path(path)
    what = f"label map {str(path)!r}"
    if not path.is_file():
        raise ImageError(f"{what} not found" if not path.exists() else f"{what} is not a file")
    try:
        with _without_pillow_cap(), Image.open(path) as im:
            _check_pixels(im.height, im.width, max_pixels, what)
            if im.mode not in _LABEL_MODES:
                raise ImageError(f"{what} has mode {im.mode!r}; expected a single-channel "
                                 "(palette or grey) label map of class indices")
            arr = np.array(im, dtype=np.int64)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot read {what}: not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read {what}: {exc}") from exc
    return torch.from_numpy(arr)


def working_size(height: int, width: int, short_side: int = 448,
                 long_side: int = 2048) -> tuple[int, int]:
    """``(h, w)``, the size at which LPOSS runs: mmseg's ``Resize(keep_ratio=True)`` with
    ``img_scale=(long_side, short_side)`` (mmcv's ``rescale_size``): ``scale = min(long_side
    / long, short_side / short)``, each side ``int(side * scale + 0.5)``, at least 1."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialiasing) of a ``(C, H, W)`` image
    to ``size = (h, w)``: uint8 as the paper's pipeline does it (OpenCV's ``cv2.resize``,
    ``INTER_LINEAR``, on the CPU) and divided by 255, giving float32; a floating-point image
    with ``F.interpolate`` in float32 (float64 for float64), returned in its dtype. The
    result is on the input's device."""
    h, w = size
    if image.dtype == torch.uint8:
        pixels = image.permute(1, 2, 0).cpu().numpy()  # (H, W, C), OpenCV's layout
        resized = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)
        resized = resized.reshape(h, w, image.shape[0])  # OpenCV drops a single channel axis
        return (torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0).to(image.device)
    work = image if image.dtype == torch.float64 else image.float()
    out = F.interpolate(work[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return out.to(image.dtype)


def working_image(image: Tensor, short_side: int = 448, long_side: int = 2048) -> Tensor:
    """``(3, H, W)`` uint8 or float image -> ``(3, h, w)`` float32 in [0, 1] at the
    working size (:func:`working_size`, resized by :func:`resize_image`)."""
    return resize_image(image, working_size(*image.shape[-2:], short_side, long_side)).float()
