"""Sweeps: ``evaluate`` over every combination of propagation settings, with the encoder
outputs of each image computed once and cached."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import LPOSSConfig
from ..distributed import distributed_context, process_group
from ..errors import ConfigError, LpossError
from ..output.files import atomic_write, write_json
from ..pipeline.segmenter import Segmenter
from ..progress import Progress
from .datasets import SegmentationDataset
from .loop import evaluate
from .plots import sweep_plots
from .results import SweepResult
from .settings import resolve_method

__all__ = ["SWEEPABLE", "sweep"]

SWEEPABLE = LPOSSConfig.sweepable_fields()
"""Config fields ``sweep`` may vary: they change the propagation, not the encoder outputs."""


def _sweep_grid(grid: Any) -> list[tuple[str, list]]:
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("sweep grid must be a non-empty mapping of setting -> values")
    items = []
    for name, values in grid.items():
        if name not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {name!r}: choose from {', '.join(SWEEPABLE)} "
                              "(the encoder outputs must stay the same)")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"sweep values of {name!r} must be a non-empty list")
        items.append((name, list(values)))
    return items


def _combo_name(values: Mapping[str, Any]) -> str:
    return "_".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def sweep(
    dataset: SegmentationDataset,
    segmenter: Segmenter,
    grid: Mapping[str, Sequence[Any]],
    *,
    method: str | None = None,
    boundary: bool = False,
    limit: int | None = None,
    run_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Evaluate every combination of propagation settings, encoding each image once.

    Each combination is an ``evaluate`` run with ``segmenter.config.replace(**values)``, in
    ``run_dir/<name=value_...>`` (resumable like any run), with ``run_dir/sweep_<name>.png``
    plotting the mIoU against each setting (Fig. 10); the encoder outputs are cached in
    ``cache_dir`` (default ``run_dir/cache``, or a temporary folder without ``run_dir``).

    Args:
        dataset: as for ``evaluate``.
        segmenter: the segmenter whose config is the base of every combination.
        grid: config field -> values, e.g. ``{"k": [200, 400], "tau": [0.01, 0.05]}``;
            fields from ``SWEEPABLE``.
        method, boundary, limit, progress, extra_settings: as for ``evaluate``.
        run_dir: the parent folder of the combinations' run folders (and of
            ``sweep.json`` / ``sweep.md``).
        cache_dir: the encoder-output cache.

    Returns:
        The results, one per combination, in grid order (the last field varies fastest).
    """
    items = _sweep_grid(grid)
    method, segmenter = resolve_method(segmenter, method)
    if segmenter is None:
        raise ValueError("sweep needs a segmenter: the oracle has no propagation settings")
    run_dir = Path(run_dir) if run_dir is not None else None
    rank, world, _ = distributed_context()
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(process_group(world))  # one group for all the runs
        if cache_dir is None:
            cache_dir = run_dir / "cache" if run_dir is not None else \
                stack.enter_context(tempfile.TemporaryDirectory(prefix="lposs-cache-"))
        for combo in itertools.product(*(values for _, values in items)):
            values = dict(zip((name for name, _ in items), combo))
            config = segmenter.config.replace(**values)
            result = evaluate(
                dataset, Segmenter(segmenter.clip, segmenter.dino, config, segmenter.depth),
                method=method, boundary=boundary, limit=limit, progress=progress,
                cache_dir=cache_dir,
                run_dir=run_dir / _combo_name(values) if run_dir is not None else None,
                extra_settings=extra_settings,
            )
            rows.append((values, result))
    out = SweepResult([name for name, _ in items], rows)
    if run_dir is not None and rank == 0:
        write_json(run_dir / "sweep.json", out.to_dict())
        atomic_write(run_dir / "sweep.md", lambda f: f.write(out.to_markdown().encode()))
        try:
            sweep_plots(out, run_dir)
        except LpossError as err:  # no matplotlib: the tables are written all the same
            warnings.warn(f"no sweep plots: {err}", stacklevel=2)
    return out
