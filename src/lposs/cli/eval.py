"""``lposs eval``: evaluate on a benchmark or a labelled folder (mIoU, Boundary IoU).

The work is done by :mod:`lposs.evaluation`, imported (with the datasets) only when this
command's options are built or run.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..config import UNKNOWN, LPOSSConfig
from ..errors import ConfigError, LpossError
from .options import (
    EXIT_INTERRUPTED,
    HelpFormatter,
    add_model_options,
    add_propagation_options,
    config_from,
    fail,
    rank_device,
)

__all__ = ["SUMMARY", "add_parser", "run", "parse_sweep"]

SUMMARY = "evaluate on a benchmark or a labelled folder (mIoU, Boundary IoU)"

_DESCRIPTION = """\
Evaluate LPOSS+, LPOSS, the MaskCLIP baseline or the patch-resolution oracle on one of
the paper's benchmarks, or on your own labelled folder (--dataset folder --images DIR
--masks DIR --class-file FILE).

Prints a markdown table (mIoU, Boundary IoU with --boundary, pixel accuracy, per-class
IoU) next to the paper's number, and writes RUN_DIR/results.{json,md}. Each image's
counts go to RUN_DIR/records as they are computed: rerunning the same command resumes
an interrupted run and gives the numbers of an uninterrupted one. Default RUN_DIR:
runs/eval/<dataset>-<method>-<settings digest>.

--method sets the stages (maskclip: no propagation; lposs: patches; lposs+: patches and
pixels); --preset picks the models and windows. Several processes:
  torchrun --nproc-per-node N -m lposs eval ... --device cuda
MESS (pip install 'lposs[mess]'; data prepared by python -m mess.prepare_all_datasets
--dataset_dir DIR): --dataset mess:suim --data-root DIR, or --dataset mess for every MESS
dataset present, one run folder each, and RUN_DIR/mess.{json,md} (Tables 7-8).
Sweep propagation settings (encoders run once per image, outputs cached in --cache-dir,
default RUN_DIR/cache):
  lposs eval --dataset voc --data-root data --sweep k=200,400 --sweep tau=0.01,0.05"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``subparsers`` (from ``add_subparsers``)."""
    from ..evaluation import METHODS
    from ..evaluation.datasets import DATASETS

    p = subparsers.add_parser("eval", formatter_class=HelpFormatter, description=_DESCRIPTION,
                              help=SUMMARY)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="NAME",
                      help=f"a benchmark ({', '.join(DATASETS)}), 'folder' for --images/"
                           "--masks/--class-file, 'mess:<name>' for a MESS dataset (suim, "
                           "paxray_lungs, ...) or 'mess' for every MESS dataset present")
    data.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                      help="folder holding the benchmark (VOCdevkit, coco_stuff164k, ...)")
    data.add_argument("--split", default="val", help="benchmark split")
    data.add_argument("--images", type=Path, default=None, metavar="DIR",
                      help="folder dataset: the images")
    data.add_argument("--masks", type=Path, default=None, metavar="DIR",
                      help="folder dataset: label masks <image stem>.png (pixel = class index)")
    data.add_argument("--class-file", type=Path, default=None, metavar="FILE",
                      help="folder dataset: one class name per line (';' synonyms)")
    data.add_argument("--ignore-index", type=int, default=UNKNOWN,
                      help="folder dataset: ignored label value")
    data.add_argument("--reduce-zero-label", action="store_true",
                      help="folder dataset: label 0 is ignored, the others shift down by one")
    p.add_argument("--method", default="lposs+", choices=METHODS,
                   help="what to evaluate (oracle: ground truth at patch resolution, no model)")
    p.add_argument("--boundary", action="store_true", help="also compute Boundary IoU")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N images")
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder: records, settings.json, results.{json,md} (default: "
                        "runs/eval/<dataset>-<method>-<settings digest>)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="keep encoder outputs here (large: several MB per image; default: "
                        "RUN_DIR/cache with --sweep, else none)")
    p.add_argument("--sweep", action="append", default=None, metavar="NAME=V1,V2",
                   help="evaluate every combination of these propagation settings "
                        f"(repeatable; {', '.join(LPOSSConfig.sweepable_fields())})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    add_propagation_options(p, patch=True)
    p.set_defaults(run=run)
    return p


def parse_sweep(specs: list[str] | None) -> dict[str, list]:
    """``["k=200,400", "tau=0.01"]`` -> ``{"k": [200, 400], "tau": [0.01]}``.

    Raises:
        ConfigError: a malformed spec, an unknown or repeated name, or a bad number.
    """
    sweepable = LPOSSConfig.sweepable_fields()
    defaults = LPOSSConfig()
    grid: dict[str, list] = {}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--sweep {spec!r}: expected NAME=V1,V2,...")
        if name not in sweepable:
            raise ConfigError(f"--sweep {spec!r}: cannot sweep {name!r}; choose from "
                              f"{', '.join(sweepable)}")
        if name in grid:
            raise ConfigError(f"--sweep {name} given twice")
        kind = type(getattr(defaults, name))  # int or float, as the field
        try:
            grid[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--sweep {spec!r}: values of {name} must be "
                              f"{'integers' if kind is int else 'numbers'}") from None
    return grid


def _dataset(args: argparse.Namespace):
    from ..evaluation.datasets import FolderDataset, get_dataset

    if args.dataset == "folder":
        missing = [flag for flag, value in (("--images", args.images), ("--masks", args.masks),
                                            ("--class-file", args.class_file)) if value is None]
        if missing:
            raise LpossError(f"--dataset folder needs {', '.join(missing)}")
        return FolderDataset(args.images, args.masks, args.class_file,
                             ignore_index=args.ignore_index,
                             reduce_zero_label=args.reduce_zero_label)
    if args.data_root is None:
        raise LpossError(f"--dataset {args.dataset} needs --data-root DIR")
    if args.dataset == "mess":  # a list: every MESS dataset present
        from ..evaluation.mess import present_mess_datasets

        return present_mess_datasets(args.data_root)
    try:
        return get_dataset(args.dataset, args.data_root, split=args.split)
    except ValueError as err:
        raise LpossError(str(err)) from None


def _segmenter(args: argparse.Namespace, local_rank: int, world: int):
    from ..methods import get_preset, with_method
    from ..pipeline.segmenter import Segmenter

    config = config_from(args, with_method(get_preset(args.preset), args.method))
    return Segmenter.from_pretrained(config, clip_weights=args.clip_weights,
                                     dino_weights=args.dino_weights,
                                     depth_weights=args.depth_weights,
                                     device=rank_device(args.device, world, local_rank),
                                     precision=args.precision)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the run as Ctrl-C does."""


def _terminate(signum, frame) -> None:
    raise _Terminated


class _Bar:
    """Draws the library's ``(stage, done, total)`` progress with tqdm when ``enabled``,
    and remembers the last counts for the interrupt message."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.tqdm, self.done, self.total = enabled, None, 0, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if done == 0:  # a stage starts (each setting of a sweep is one)
            self.close()
            if self.enabled:
                from tqdm import tqdm

                self.tqdm = tqdm(total=total, desc=stage, unit="img", file=sys.stderr,
                                 dynamic_ncols=True, smoothing=0.1)
        self.done, self.total = done, total
        if self.tqdm is not None:
            self.tqdm.update(done - self.tqdm.n)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None


def run(args: argparse.Namespace) -> int:
    """Run ``lposs eval`` from parsed arguments; returns the exit status."""
    from ..evaluation import distributed_context, evaluate, run_settings, settings_digest, sweep

    if args.limit is not None and args.limit < 1:
        raise LpossError(f"--limit must be a positive number, got {args.limit}")
    grid = parse_sweep(args.sweep)
    if grid and args.method == "oracle":
        raise LpossError("--sweep needs a model method: the oracle has no propagation settings")
    rank, world, local_rank = distributed_context()
    dataset = _dataset(args)
    several = isinstance(dataset, list)  # --dataset mess
    if grid and several:
        raise LpossError("--sweep runs on one dataset, not on every MESS dataset")
    segmenter = None if args.method == "oracle" else _segmenter(args, local_rank, world)
    extra = {"precision": args.precision} if segmenter is not None else None
    out = args.out
    if out is None:
        settings = run_settings(dataset[0] if several else dataset, segmenter,
                                method=args.method, extra_settings=extra)
        if several:  # the same folder whichever MESS datasets are present
            settings.pop("dataset")
        digest = settings_digest(settings)
        name = "mess" if several else dataset.name
        suffix = "-sweep" if grid else ""
        out = Path("runs") / "eval" / f"{name}-{args.method}-{digest[:10]}{suffix}"
    bar = _Bar(enabled=rank == 0 and not args.no_progress and sys.stderr.isatty())
    options = {"method": args.method, "boundary": args.boundary, "limit": args.limit,
               "run_dir": out, "cache_dir": args.cache_dir, "progress": bar,
               "extra_settings": extra}
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if grid:
            result = sweep(dataset, segmenter, grid, **options)
            written = out / "sweep.json"
        elif several:
            from ..evaluation.mess import evaluate_mess

            result = evaluate_mess(dataset, segmenter, **options)
            written = out / "mess.json"
        else:
            result = evaluate(dataset, segmenter, **options)
            written = out / "results.json"
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as _Terminated
        bar.close()
        fail(f"interrupted: {bar.done} of {bar.total} images done; rerun the same command "
             "to resume")
        return 128 + signal.SIGTERM if isinstance(stop, _Terminated) else EXIT_INTERRUPTED
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    if rank == 0:
        print(result.to_markdown(), end="")
        print(f"lposs: results written to {written}", file=sys.stderr)
    return 0
