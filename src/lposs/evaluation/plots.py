"""PNG plots of evaluation results (matplotlib's Agg canvas, imported only here): the
per-image and per-class scatter plots of ``compare`` and one line plot per swept setting."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import LpossError
from ..output.files import atomic_write

__all__ = ["scatter_plot", "line_plot", "sweep_plots"]

_INSTALL = "plots need matplotlib: pip install 'lposs[plots]'"


def _figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float]):
    try:
        from matplotlib.figure import Figure  # a Figure saves through Agg without pyplot
    except ImportError:
        raise LpossError(_INSTALL) from None
    figure = Figure(figsize=size, dpi=120, layout="constrained")
    axes = figure.subplots()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure, path: str | os.PathLike) -> Path:
    atomic_write(path, lambda f: figure.savefig(f, format="png"))
    return Path(path)


def scatter_plot(path: str | os.PathLike, x: Sequence[float], y: Sequence[float], *,
                 xlabel: str, ylabel: str, title: str) -> Path:
    """Points (x, y) in percent on [0, 100]^2 with the diagonal y = x, saved as PNG.

    Args:
        path: the PNG file to write (atomically).
        x, y: the values in percent, as many of each (NaN points are not drawn).
        xlabel, ylabel, title: the axis labels and the title.

    Returns:
        ``path``.
    """
    figure, axes = _figure(title, xlabel, ylabel, (5.2, 5.2))
    axes.plot([0, 100], [0, 100], color="0.4", linestyle="--", linewidth=1, zorder=1)
    axes.scatter(x, y, s=12, alpha=0.6 if len(x) < 1000 else 0.25, linewidths=0, zorder=2,
                 clip_on=False)  # points at 0 or 100 drawn whole
    axes.set(xlim=(0, 100), ylim=(0, 100), aspect="equal")
    return _save(figure, path)


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Sequence, Sequence]], *,
              xlabel: str, ylabel: str, title: str) -> Path:
    """One marked line per series (label -> (x values, y values)), saved as PNG; a legend
    when there is more than one series, a log x axis for positive values spanning 20x."""
    figure, axes = _figure(title, xlabel, ylabel, (5.6, 4.0))
    xs = [v for x, _ in series.values() for v in x]
    for label, (x, y) in series.items():
        axes.plot(x, y, marker="o", label=label or None)
    if min(xs) > 0 and max(xs) >= 20 * min(xs):
        axes.set_xscale("log")
    if len(series) > 1:
        axes.legend(fontsize="small")
    return _save(figure, path)


def sweep_plots(result: Any, folder: str | os.PathLike) -> list[Path]:
    """``folder/sweep_<name>.png`` for each swept setting of a ``SweepResult`` (Fig. 10):
    mIoU against that setting's values, one line per combination of the other settings."""
    rows = result.rows
    first = rows[0][1]
    written = []
    for name in result.names:
        others = [n for n in result.names if n != name]
        series: dict[str, tuple[list, list]] = {}
        for values, run in rows:
            key = ", ".join(f"{n}={values[n]}" for n in others)
            x, y = series.setdefault(key, ([], []))
            x.append(values[name])
            y.append(100 * run.miou)
        written.append(line_plot(Path(folder) / f"sweep_{name}.png", series, xlabel=name,
                                 ylabel="mIoU (%)", title=f"{first.dataset}, {first.method}: "
                                 f"{first.num_images} images"))
    return written
