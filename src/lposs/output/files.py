"""Writing results: atomic writes, label PNGs, overlays, JSON, score arrays; file hashes.

Every file is written through :func:`atomic_write`, so it is either complete or absent
(a crash or a full disk never leaves a half-written output behind). No model code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from torch import Tensor

from ..config import UNKNOWN
from ..errors import OutputError
from .drawing import UNKNOWN_COLOR, _as_numpy, _check_colors, _check_labels

try:  # POSIX only; elsewhere folder_lock locks nothing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "atomic_write",
    "file_sha256",
    "folder_lock",
    "LOCK_NAME",
    "save_label_png",
    "save_overlay",
    "write_json",
    "save_scores",
]


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


_LABEL_BAND_PIXELS = 1 << 22  # pixels per band when building a label PNG


def save_label_png(path: str | os.PathLike, labels: Any, colors: Any) -> None:
    """Save a label map losslessly, pixel value = class index.

    With fewer than 255 classes the PNG is a palette image (mode ``"P"``) whose palette
    holds ``colors`` and :data:`UNKNOWN_COLOR` at entry 255; "unknown" pixels (label
    ``n`` = number of classes, as the segmenter returns them, or 255) are stored as 255.
    With 255 classes or more, a 16-bit grey PNG holds the raw labels (unknown = ``n``).

    Args:
        path: Output ``.png`` file (written atomically).
        labels: ``(H, W)`` integer labels in ``0..n`` (``n`` = unknown) or 255.
        colors: ``(n, 3)`` uint8 class colours, e.g. :func:`lposs.output.drawing.palette`.
    """
    colors = _check_colors(colors)
    n = colors.shape[0]
    arr = _check_labels(labels, n)
    if n < UNKNOWN:
        height, width = arr.shape
        im = Image.new("P", (width, height))
        rows = max(1, _LABEL_BAND_PIXELS // max(width, 1))
        for top in range(0, height, rows):  # in bands: no full-size copy of a large map
            band = arr[top:top + rows]
            band = np.ascontiguousarray(np.where(band == n, UNKNOWN, band), np.uint8)
            im.paste(Image.frombytes("P", (width, band.shape[0]), band.tobytes()), (0, top))
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:n] = colors
        table[UNKNOWN] = UNKNOWN_COLOR
        im.putpalette(table.reshape(-1).tolist())
    else:
        if n >= 65535:
            raise ValueError(f"at most 65534 classes fit a 16-bit label PNG, got {n}")
        im = Image.fromarray(arr.astype(np.uint16))
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def save_overlay(path: str | os.PathLike, image: Image.Image) -> None:
    """Save an image made by :func:`lposs.output.drawing.overlay` atomically, in the format of
    ``path``'s suffix.

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
        return {_jsonable(k.item() if isinstance(k, np.generic) else k): _jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, str):
        return _printable(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (Tensor, np.ndarray)):
        return _jsonable(_as_numpy(obj, "value").tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return _printable(os.fspath(obj))
    return obj


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name's undecodable bytes (which Python holds as lone
    surrogates) are written as ``\\xNN`` escapes, e.g. ``bad\\xff.png``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: not from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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
            ``(C, H, W)`` and ``class_bands(c)`` giving class ``c``'s map as consecutive
            bands of rows (``lposs.output.segmentation.ScoreMaps``), written band by band so
            that no full-size map sits in memory.
    """
    if hasattr(scores, "class_bands"):
        shape = tuple(scores.shape)

        def write(f: BinaryIO) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(f, header)
            for c in range(shape[0]):  # C-order: each class's rows in turn, band by band
                for band in scores.class_bands(c):
                    rows = np.ascontiguousarray(_as_numpy(band, "scores"), dtype=np.float32)
                    f.write(memoryview(rows).cast("B"))

        atomic_write(path, write)
        return
    arr = _as_numpy(scores, "scores")
    if arr.ndim != 3:
        raise ValueError(f"scores must have shape (C, H, W), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (the cache key of an image's content).

    Args:
        path: The file.

    Returns:
        64 lowercase hexadecimal digits.

    Raises:
        OSError: The file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


LOCK_NAME = ".lposs.lock"
"""The file in an output folder that :func:`folder_lock` holds while lposs writes there."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``<folder>/.lposs.lock`` exclusively (``fcntl.flock``) while writing there.

    A second process (or a second lock in this one) fails at once instead of waiting, so
    two runs never write the same file names into one folder. The lock file is removed
    on release; a process that locked a lock file just removed locks again the file now
    at the path. Where ``fcntl`` does not exist (Windows) nothing is locked.

    Args:
        folder: An existing, writable folder.

    Raises:
        OutputError: Another lposs holds the lock, or the lock file cannot be created.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = Path(folder) / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputError(f"cannot create the lock file {path}: "
                              f"{err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another lposs is writing to {folder}; wait for it to finish "
                              "or choose another output folder") from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # its holder removed it as we locked it
            same_file = False
        if same_file:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiter then sees another file
        os.close(fd)
