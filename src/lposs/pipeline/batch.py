"""Segment many image files into one vocabulary and write the results, pipelined.

While the segmenter encodes one image, a reader thread decodes and resizes the next
(``Segmenter.prepare_image``) and a writer thread saves the previous one's files
(``Segmentation.save``: label PNG, overlay, JSON, scores). Decoding, resizing and PNG
encoding spend most of their time outside the GIL, so on a CPU they overlap the encoders
and on a GPU they keep it busy. On CUDA the windows of several images go through the
encoders together (``Segmenter.encode_images``). The files and numbers are those of
calling the segmenter on each image in turn; only the order of work changes.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_MAX_PIXELS
from ..errors import LpossError, OutputError, is_out_of_memory
from ..progress import Progress
from ..vocab import Vocabulary
from .encoded import EncodedImage, PreparedImage
from .segmenter import Segmenter

__all__ = ["FileOutcome", "segment_files", "IMAGES_PER_PASS_CUDA"]

IMAGES_PER_PASS_CUDA = 4
"""Images encoded together on CUDA: a VOC-size image gives 15 windows, four give 60."""

_EXPECTED = (LpossError, OSError)  # a bad input or a failed write: reported, not raised
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
"""Write errors that every later file would meet too: the batch stops at the first."""


def _expected(err: BaseException) -> bool:
    """Whether one file's error is reported and the batch goes on: a bad input, a failed
    write, or memory running out on this image (the next may fit)."""
    if is_out_of_memory(err):
        _release_cached_memory()
        return True
    return isinstance(err, _EXPECTED)


def _release_cached_memory() -> None:
    """Return the CUDA cache's blocks after a failed image, so the next image gets them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
_POLL_S = 0.1  # how often a blocked reader checks whether it should stop


@dataclass
class FileOutcome:
    """What became of one image file.

    Attributes:
        path: the image file.
        stem: the stem its outputs were written under.
        written: the files written (empty when it failed).
        error: why it failed (``LpossError`` for a bad image, ``OSError`` for a failed
            read or write), or None.
    """

    path: Path
    stem: str
    written: list[Path] = field(default_factory=list)
    error: Exception | None = None


def _read_ahead(segmenter: Segmenter, paths: Sequence[Path], max_pixels: int | None,
                ready: queue.Queue, stop: threading.Event) -> None:
    """Puts each path's ``PreparedImage`` (or the exception that reading raised) on
    ``ready``, in order, until done or ``stop`` is set."""
    for path in paths:
        try:
            item: PreparedImage | BaseException = segmenter.prepare_image(
                path, max_pixels=max_pixels)
        except BaseException as err:  # handed to the main thread, which decides
            item = err
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if stop.is_set():
            return


def _encode(segmenter: Segmenter, group: list,
            progress: Progress | None) -> list[EncodedImage | BaseException]:
    """Each item of ``group`` (a ``PreparedImage``, or the exception reading raised) as its
    ``EncodedImage`` or its exception, the images encoded in shared batches. When the
    shared encoding fails on an expected error (memory), each image is tried alone, so one
    image too large to share a pass does not fail the others."""
    images = [i for i, item in enumerate(group) if isinstance(item, PreparedImage)]
    out: list = list(group)
    for item in group:
        if isinstance(item, BaseException) and not _expected(item):
            raise item
    try:
        for i, done in zip(images, segmenter.encode_images([group[i] for i in images],
                                                           progress=progress)):
            out[i] = done
        return out
    except Exception as err:  # noqa: BLE001 - decided by _expected
        if not _expected(err):
            raise
        if len(images) == 1:
            out[images[0]] = err
            return out
    for i in images:
        try:
            out[i] = segmenter.encode_images([group[i]], progress=progress)[0]
        except Exception as err:  # noqa: BLE001 - decided by _expected
            if not _expected(err):
                raise
            out[i] = err
    return out


class _Writer(threading.Thread):
    """Saves segmentations in the order they are queued and hands back a ``FileOutcome``
    per job; a job with an error only passes it on. Not a daemon: the interpreter waits
    for it, so a file being written when the main thread stops is still completed."""

    def __init__(self, out_dir: Path, save_scores: bool, depth: int) -> None:
        super().__init__(name="lposs-writer")
        self.out_dir, self.save_scores = out_dir, save_scores
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.outcomes: queue.Queue = queue.Queue()
        self.disk_error: OSError | None = None  # set after the outcome that met it is queued
        self.total = self.written = 0

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            outcome, result, image = job
            if self.disk_error is not None:
                outcome.error = self.disk_error  # nothing more is written
            elif outcome.error is None:
                try:
                    outcome.written = result.save(self.out_dir, outcome.stem, image,
                                                  scores=self.save_scores)
                except BaseException as err:  # handed to the main thread, which decides
                    outcome.error = err
            self.outcomes.put(outcome)
            if isinstance(outcome.error, OSError) and outcome.error.errno in _DISK_FULL:
                self.disk_error = outcome.error

    def finished(self, *, wait: bool = False) -> Iterator[FileOutcome]:
        """The outcomes ready now (with ``wait``: all, until the thread ends)."""
        while True:
            try:
                outcome = self.outcomes.get(timeout=_POLL_S) if wait else \
                    self.outcomes.get_nowait()
            except queue.Empty:
                if wait and (self.is_alive() or not self.outcomes.empty()):
                    continue
                return
            if outcome.error is not None and outcome.error is self.disk_error:
                raise OutputError(f"cannot write the outputs of {outcome.path} to "
                                  f"{self.out_dir}: {self.disk_error.strerror}; stopped with "
                                  f"{self.written} of {self.total} images written") from None
            if outcome.error is not None and not _expected(outcome.error):
                raise outcome.error
            self.written += outcome.error is None
            yield outcome


def _take(ready: queue.Queue, count: int, report: Progress) -> list:
    """The next ``count`` items of the reader, reporting "reading" while waiting."""
    group = []
    for _ in range(count):
        if ready.empty():
            report("reading", 0, 1)
        group.append(ready.get())
    return group


def _predict(segmenter: Segmenter, item, outcome: FileOutcome, classes: Vocabulary,
             unknown_threshold: float | None, progress: Progress | None):
    """``(outcome, Segmentation or None)`` of one encoded image (or the error it met)."""
    if isinstance(item, BaseException):
        outcome.error = item
        return outcome, None
    try:
        segmenter.set_encoded(item)
        return outcome, segmenter.predict(classes, unknown_threshold=unknown_threshold,
                                          progress=progress)
    except Exception as err:  # noqa: BLE001 - decided by _expected
        if not _expected(err):
            raise
        outcome.error = err
        return outcome, None
    finally:  # its graphs are not needed while its files are written
        segmenter.release_image()


def segment_files(
    segmenter: Segmenter,
    paths: Sequence[str | Path],
    classes: str | Sequence[str],
    out_dir: str | Path,
    *,
    stems: Sequence[str] | None = None,
    unknown_threshold: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    save_scores: bool = False,
    read_ahead: int = 1,
    write_behind: int = 2,
    encode_together: int | None = None,
    progress: Progress | None = None,
) -> Iterator[FileOutcome]:
    """Segment each file into ``classes`` and write its outputs into ``out_dir``.

    A generator: one ``FileOutcome`` per file, in the order of ``paths``, yielded once the
    file's outputs are written (or it failed). An unreadable image or a failed write
    does not stop the others, but a full disk (``ENOSPC``, a quota, a file size limit, a
    read-only file system) stops the batch at the first write that fails, with an
    ``OutputError``. On ``KeyboardInterrupt`` the results already computed are
    written and yielded, then the interrupt is raised again; every file written is
    complete (``files.atomic_write``).

    Args:
        segmenter: the segmenter (used from the calling thread only).
        paths: image files.
        classes: the vocabulary (``;`` separates synonyms of one class).
        out_dir: the output folder (created if missing).
        stems: the output stem of each file (default: the file stems).
        unknown_threshold: passed to ``Segmenter.predict``.
        max_pixels: refuse larger images; None disables the cap.
        save_scores: also write ``<stem>_scores.npy``, `(C, H, W)` float32.
        read_ahead: images decoded and resized ahead of the segmenter (>= 1).
        write_behind: segmentations waiting for the writer (>= 1).
        encode_together: images sharing the encoders' passes; default
            :data:`IMAGES_PER_PASS_CUDA` on CUDA, else 1.
        progress: ``(stage, done, total)`` callback, called from the calling thread: the
            stage "images" (``done`` = the files finished before this one) when an image
            starts, the segmenter's stages, "reading" while waiting for the reader and
            "writing" while waiting for the writer at the end.

    Raises:
        ClassNamesError: a bad vocabulary, e.g. a name too long for the text encoder
            (before any file is read).
        ValueError: ``stems`` of another length, or a depth below 1.
        OutputError: the disk is full (the outputs yielded before are complete).
    """
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths] if stems is None else list(stems)
    if len(stems) != len(paths):
        raise ValueError(f"got {len(stems)} stems for {len(paths)} paths")
    if min(read_ahead, write_behind, encode_together or 1) < 1:
        raise ValueError("read_ahead, write_behind and encode_together must be >= 1")
    classes = segmenter.encode_vocabulary(classes)  # once, first: a bad name stops here
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    report = progress or (lambda stage, done, total: None)
    together = encode_together or (IMAGES_PER_PASS_CUDA if segmenter.device.type == "cuda"
                                   else 1)
    ready: queue.Queue = queue.Queue(maxsize=max(read_ahead, together))
    stop = threading.Event()
    reader = threading.Thread(target=_read_ahead, name="lposs-reader", daemon=True,
                              args=(segmenter, paths, max_pixels, ready, stop))
    writer = _Writer(out_dir, save_scores, write_behind)
    writer.total = len(paths)
    reader.start()
    writer.start()
    yielded = 0
    interrupted = None
    encoded: deque = deque()  # the group encoded last, waiting for predict
    try:
        for index, (path, stem) in enumerate(zip(paths, stems)):
            if writer.disk_error is not None:  # raises once the outputs before it are out
                yield from writer.finished()
            report("images", index, len(paths))
            if not encoded:
                group = _take(ready, min(together, len(paths) - index), report)
                encoded.extend(_encode(segmenter, group, progress))
            item = encoded.popleft()
            outcome, result = _predict(segmenter, item, FileOutcome(path, stem), classes,
                                       unknown_threshold, progress)
            writer.jobs.put((outcome, result, None if result is None else item.image))
            del item, result  # the writer holds them now
            for outcome in writer.finished():
                yielded += 1
                yield outcome
    except KeyboardInterrupt as err:
        interrupted = err
    finally:
        stop.set()
        writer.jobs.put(None)
    report("writing", yielded, len(paths))
    for outcome in writer.finished(wait=True):
        yielded += 1
        report("writing", yielded, len(paths))
        yield outcome
    if interrupted is not None:
        raise interrupted
