"""Writing results: a result's files and their names, atomic writes, label PNGs, overlays,
JSON, score arrays, file hashes and the output folder's lock.

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

from ..config import BAND_PIXELS, UNKNOWN
from ..errors import OutputError
from .drawing import UNKNOWN_COLOR, class_shares, overlay

try:  # POSIX only; elsewhere folder_lock locks nothing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "save_result",
    "output_stem",
    "recorded_source",
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


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


# Longest stem in bytes: "<stem>_overlay.png" and its temporary ".<name>.XXXXXXXX.tmp"
# stay within the 255 bytes of a file name.
_MAX_STEM_BYTES = 200


def output_stem(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The stem of an image's outputs, from its own name and folder only (never from the
    other files of a batch): the file's stem, or ``<stem>_<suffix>`` (``photo.bmp`` ->
    ``photo_bmp``) when another image of the same stem sits in the same folder or when
    ``<stem>.png`` in ``out_dir`` would be the image itself. A stem over 200 bytes is
    cut and ends in 8 hex digits of the full name's SHA-256.

    Args:
        path: the image file.
        out_dir: the output folder.
    """
    from ..pipeline.image import IMAGE_SUFFIXES

    path = Path(path)
    stem = path.stem
    try:
        twins = [p for p in path.parent.iterdir() if p.stem == stem and p.name != path.name
                 and p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError:
        twins = []
    mine = Path(out_dir) / f"{stem}.png"
    if twins or os.path.realpath(mine) == os.path.realpath(path):
        stem = f"{stem}_{path.suffix.lstrip('.')}" if path.suffix else stem
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) > _MAX_STEM_BYTES:
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
        cut = raw[:_MAX_STEM_BYTES - 9].decode("utf-8", "ignore")
        stem = f"{cut}_{digest}"
    return stem


def recorded_source(out_dir: str | os.PathLike, stem: str) -> str | None:
    """The ``source`` that ``<out_dir>/<stem>.json`` records, "" for a JSON that records
    none (an image given in memory) or cannot be read, None when there is no JSON."""
    path = Path(out_dir) / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return ""
    return str(record.get("source") or "") if isinstance(record, dict) else ""


def save_result(result, out_dir: str | os.PathLike, stem: str, image=None, *,
                scores: bool = False) -> list[Path]:
    """Write a :class:`lposs.output.segmentation.Segmentation`'s files: ``<stem>.png``
    (palette label map), ``<stem>.json`` and, given the image, ``<stem>_overlay.png``;
    ``<stem>_scores.npy`` when ``scores``. Each file is written atomically, and when one
    fails those already written are removed again: all of them or none. The palette and
    the pixel shares are computed once.

    ``image`` (for the overlay) is the `(3, H, W)` image in memory or anything
    ``read_image`` accepts. Returns the written paths; raises ``OutputError`` unless
    ``stem`` is a plain file name.
    """
    out_dir = Path(out_dir)
    _check_stem(out_dir, stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = result.colors()
    shares = class_shares(result.labels, len(result.classes))  # C + 1: unknown last
    written: list[Path] = []
    try:
        save_label_png(out_dir / f"{stem}.png", result.labels, colors)
        written.append(out_dir / f"{stem}.png")
        if image is not None:
            save_overlay(out_dir / f"{stem}_overlay.png",
                         overlay(image, result.labels, result.classes, colors, shares=shares))
            written.append(out_dir / f"{stem}_overlay.png")
        if scores:
            save_scores(out_dir / f"{stem}_scores.npy", result.scores)
            written.append(out_dir / f"{stem}_scores.npy")
        write_json(out_dir / f"{stem}.json", result.summary(colors, shares))
        written.append(out_dir / f"{stem}.json")
    except BaseException:
        for path in written:  # all of this result's files or none of them
            path.unlink(missing_ok=True)
        raise
    return written


def _check_stem(out_dir: Path, stem: str) -> None:
    """Raise ``OutputError`` unless ``stem`` names files directly inside ``out_dir``: a
    plain name (no separator, drive, NUL, ``.`` or ``..``) cannot resolve anywhere else."""
    if not isinstance(stem, str):
        raise TypeError(f"stem must be a str, got {type(stem).__name__}")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (not stem.strip() or stem in (".", "..") or "\0" in stem
            or any(sep in stem for sep in separators) or os.path.splitdrive(stem)[0]):
        raise OutputError(f"file name stem {stem!r} would not be a file directly in "
                          f"{out_dir}: give a plain name (no path separators, not '..'); "
                          "put any sub-folder in out_dir instead")



def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that it is either complete or absent: ``write(f)`` fills a
    temporary file in the same folder, which is fsynced and then replaces ``path``; if
    ``write`` raises, the temporary file is removed and ``path`` is left as it was.

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


def save_label_png(path: str | os.PathLike, labels: Any, colors: Any) -> None:
    """Save a label map losslessly, pixel value = class index: below 255 classes a palette
    PNG (``colors``, and :data:`UNKNOWN_COLOR` at 255, where label ``n`` or 255 is
    stored), else a 16-bit grey PNG of the raw labels.

    Args:
        path: Output ``.png`` file (written atomically).
        labels: ``(H, W)`` integer labels in ``0..n`` (``n`` = unknown) or 255, a tensor
            or array.
        colors: ``(n, 3)`` uint8 class colours, e.g. :func:`lposs.output.drawing.palette`.
    """
    n = colors.shape[0]
    arr = _numpy(labels)
    if n < UNKNOWN:
        height, width = arr.shape
        im = Image.new("P", (width, height))
        rows = max(1, BAND_PIXELS // max(width, 1))
        for top in range(0, height, rows):  # in bands: no full-size copy of a large map
            band = arr[top:top + rows]
            band = np.ascontiguousarray(np.where(band == n, UNKNOWN, band), np.uint8)
            im.paste(Image.frombytes("P", (width, band.shape[0]), band.tobytes()), (0, top))
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:n] = colors
        table[UNKNOWN] = UNKNOWN_COLOR
        im.putpalette(table.reshape(-1).tolist())
    else:  # at most MAX_NAMES classes: they fit 16 bits
        im = Image.fromarray(arr.astype(np.uint16))
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def save_overlay(path: str | os.PathLike, image: Image.Image) -> None:
    """Save a PIL image atomically, in the format of ``path``'s suffix (PNG if unknown)."""
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
        return _jsonable(_numpy(obj).tolist())
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
    """Write ``obj`` as strict UTF-8 JSON (indent 2), atomically: numpy/torch values become
    numbers and lists, paths strings, NaN and infinities ``null``; an unserialisable
    object leaves no file behind."""
    text = json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def save_scores(path: str | os.PathLike, scores: Any) -> None:
    """Save ``(C, H, W)`` scores (array, tensor, or ``lposs.pipeline.scores.ScoreMaps``,
    written band by band) as a float32 ``.npy`` file at exactly ``path``, atomically."""
    if hasattr(scores, "class_bands"):
        shape = tuple(scores.shape)

        def write(f: BinaryIO) -> None:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(f, header)
            for c in range(shape[0]):  # C-order: each class's rows in turn, band by band
                for band in scores.class_bands(c):
                    rows = np.ascontiguousarray(_numpy(band), dtype=np.float32)
                    f.write(memoryview(rows).cast("B"))

        atomic_write(path, write)
        return
    arr = np.ascontiguousarray(_numpy(scores), dtype=np.float32)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (64 hex digits) of a file's bytes, read in 1 MiB blocks; ``OSError`` when
    it cannot be read."""
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

    A second process (or a second lock in this one) fails at once instead of waiting. The
    lock file is removed on release; a process that locked a lock file just removed locks
    the file now at the path again. Where ``fcntl`` does not exist nothing is locked.

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
