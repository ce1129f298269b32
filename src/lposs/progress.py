"""Progress reports from long library calls: a callback that receives ``(stage, done,
total)``. The library only calls it; drawing it (a status line) is the caller's job."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "StageCounter"]

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called when a stage starts (``done`` = 0) and as it
advances, from the thread doing the work. ``Segmenter`` reports "encoding windows" (window
passes through the encoders), "building graphs", "encoding classes", "propagating over
patches" (window setups), "propagating over pixels" and "labelling"."""


class StageCounter:
    """Reports one stage's ``(done, total)`` to a progress callback (or to nobody).

    Args:
        progress: the callback, or None.
        stage: the stage's name.
        total: units of work in the stage.
    """

    def __init__(self, progress: Progress | None, stage: str, total: int) -> None:
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0
        self.advance(0)

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units done and report."""
        self.done += amount
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)
