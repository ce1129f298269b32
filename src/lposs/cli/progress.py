"""A status line on stderr for long commands: redrawn in place on a terminal, silent
otherwise. It renders the library's ``(stage, done, total)`` progress reports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["StatusLine"]

_CLEAR = "\r\x1b[K"  # back to the line's start, erase to its end


class StatusLine:
    """One line of progress, e.g. ``[2/20] cat.jpg: encoding windows 12/24 (8 s)``.

    Call it as a ``lposs.progress.Progress`` callback. The stage "images" (``done`` =
    the images finished) starts the next of ``names``. Redraws at most every
    ``min_interval`` seconds within a stage.

    Args:
        stream: where to draw (stderr).
        names: the names of the images, in order (for the "images" stage).
        enabled: draw at all; default: only when ``stream`` is a terminal.
        prefix: text before each line (e.g. "rank 0: ").
        min_interval: seconds between redraws within one stage.
    """

    def __init__(self, stream: TextIO, names: Sequence[str] = (), *,
                 enabled: bool | None = None, prefix: str = "",
                 min_interval: float = 0.1) -> None:
        self.stream, self.names, self.prefix = stream, list(names), prefix
        self.enabled = _is_terminal(stream) if enabled is None else enabled
        self.min_interval = min_interval
        self._image: int | None = None
        self._image_start = time.perf_counter()
        self._stage: str | None = None
        self._drawn_at = 0.0
        self._shown = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if stage == "images":
            self._image, self._image_start = done, now
        elif stage == self._stage and done < total and now - self._drawn_at < self.min_interval:
            return
        self._stage = stage
        self._draw(self._text(stage, done, total, now))
        self._drawn_at = now

    def stage(self, text: str) -> None:
        """Show a stage of the command itself (e.g. "loading models")."""
        self(text, 0, 1)

    def clear(self) -> None:
        """Erase the line (before printing anything else on the stream)."""
        if self._shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._shown = False

    def _text(self, stage: str, done: int, total: int, now: float) -> str:
        parts = []
        if self._image is not None and self.names:
            parts.append(f"[{min(self._image + 1, len(self.names))}/{len(self.names)}] "
                         f"{self.names[min(self._image, len(self.names) - 1)]}:")
        if stage != "images":
            parts.append(stage if total <= 1 else f"{stage} {done}/{total}")
        if self._image is not None:
            parts.append(f"({now - self._image_start:.0f} s)")
        return self.prefix + " ".join(parts)

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write(_CLEAR + text[: max(width - 1, 10)])
        self.stream.flush()
        self._shown = True


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
