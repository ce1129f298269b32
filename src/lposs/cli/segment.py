"""``lposs segment``: segment image files into free-text classes and write the results."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import is_out_of_memory
from .options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    HelpFormatter,
    add_model_options,
    add_propagation_options,
    config_from,
    ensure_writable,
    fail,
    memory_message,
    rank_device,
    writing_to,
)
from .progress import StatusLine

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "segment images into free-text classes"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``segment`` command to ``subparsers`` (from ``add_subparsers``)."""
    from ..pipeline.images import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser(
        "segment", formatter_class=HelpFormatter, help=SUMMARY,
        description="Segment images into free-text classes with LPOSS+ (or LPOSS).\n\n"
                    "Per image, OUT gets <name>.png (palette label map, pixel = class index, "
                    "255 = unknown),\n<name>_overlay.png (image, class colours, legend) and "
                    "<name>.json (classes, colours,\nshares, timings, settings); "
                    "--save-scores adds <name>_scores.npy (C, H, W) float32.\n\n"
                    "Several processes share the files under torchrun, e.g.\n"
                    "  torchrun --nproc-per-node 2 -m lposs segment FOLDER --out OUT ...\n"
                    "(with --device cuda each process uses cuda:LOCAL_RANK).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively) or glob patterns")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help='comma-separated names, ";" joins synonyms: '
                                         '"cat,dog,grass;lawn"')
    vocab.add_argument("--classes-file", type=Path, metavar="FILE",
                       help="one class name per line (';' synonyms, '#' comments)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-refine", action="store_true",
                   help="skip the pixel stage (LPOSS instead of LPOSS+)")
    p.add_argument("--save-scores", action="store_true", help="also write the float scores")
    p.add_argument("--unknown-threshold", type=float, default=None, metavar="T",
                   help="label pixels whose best score (cosine scale) is below T as unknown "
                        "(default: off)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more pixels (height x width); 0 disables the cap")
    p.add_argument("--quiet", action="store_true",
                   help="print errors only: no progress line (shown only when stderr is a "
                        "terminal) and no summary")
    add_model_options(p)
    add_propagation_options(p, patch=True)
    p.set_defaults(run=run)
    return p


def _class_names(args: argparse.Namespace) -> list[str]:
    from ..vocab import load_class_names, parse_class_names

    if args.classes_file is not None:
        return parse_class_names(load_class_names(args.classes_file))
    return parse_class_names(args.classes)


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, made unique with the parent folder when stems repeat."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    stems, used = [], set()
    for path in paths:
        stem = path.stem if counts[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
        base, i = stem, 1
        while stem in used:
            i += 1
            stem = f"{base}_{i}"
        used.add(stem)
        stems.append(stem)
    return stems


def run(args: argparse.Namespace) -> int:
    """Run ``lposs segment`` from parsed arguments; returns the exit status."""
    from ..errors import ConfigError
    from ..pipeline.checks import check_unknown_threshold

    try:
        check_unknown_threshold(args.unknown_threshold)
    except ConfigError as err:  # once, not once per image
        raise ConfigError(str(err).replace("unknown_threshold", "--unknown-threshold")) from None
    from ..distributed import distributed_context

    if distributed_context()[1] > 1:  # torchrun: the processes share the folder by design
        ensure_writable(args.out)
        return _segment(args)
    with writing_to(args.out):  # locked; removed again if nothing is written there
        return _segment(args)


def _segment(args: argparse.Namespace) -> int:
    """The command once the output folder is held.

    Under ``torchrun`` each process segments every WORLD_SIZE-th file (the output names
    are those of one process) and rank 0 prints the totals.
    """
    from ..distributed import distributed_context, process_group
    from ..methods import get_preset
    from ..pipeline.images import find_images
    from ..pipeline.segmenter import Segmenter

    rank, world, local_rank = distributed_context()
    classes = _class_names(args)
    config = config_from(args, get_preset(args.preset))
    images, missing = find_images(args.images, exclude=[args.out])  # not our own outputs
    if rank == 0:
        out = args.out.resolve()
        for pattern in missing:
            if Path(pattern).is_dir() and Path(pattern).resolve().is_relative_to(out):
                fail(f"{pattern}: holds only lposs's outputs (it is in --out {args.out}), "
                     "which are not segmented again")
            elif Path(pattern).is_dir():
                fail(f"{pattern}: no image files in this folder")
            else:
                fail(f"{pattern}: no such image file, folder or pattern")
    if not images:
        if rank == 0:
            fail("no images to segment")
        return EXIT_FAILED
    stems = _unique_stems(images)
    share = list(range(rank, len(images), world))  # this process's files
    status = StatusLine(sys.stderr, [images[i].name for i in share],
                        enabled=False if args.quiet or rank > 0 else None,
                        prefix=f"rank {rank}: " if world > 1 else "")
    status.stage("loading models")
    try:
        segmenter = Segmenter.from_pretrained(config, clip_weights=args.clip_weights,
                                              dino_weights=args.dino_weights,
                                              device=rank_device(args.device, world, local_rank),
                                              precision=args.precision)
    finally:  # an error message starts on a clean line
        status.clear()
    start = time.perf_counter()
    with process_group(world) as group:
        try:
            done, failed = _segment_share(args, segmenter, classes, [images[i] for i in share],
                                          [stems[i] for i in share], status)
        except _Interrupted as stopped:
            status.clear()
            where = f"rank {rank}: " if world > 1 else ""
            fail(f"interrupted: {where}{stopped.done} of {len(share)} image(s) done "
                 f"-> {args.out}")
            return EXIT_INTERRUPTED
        done, failed = group.sum([done, failed])
    failed += len(missing)
    elapsed = time.perf_counter() - start
    if rank == 0 and not args.quiet:
        print(f"segmented {done} of {done + failed} image(s) into {len(classes)} classes in "
              f"{elapsed:.1f} s -> {args.out}" + (f" ({failed} failed)" if failed else ""))
    return EXIT_FAILED if failed else 0


class _Interrupted(Exception):
    """Ctrl-C during the loop, after ``done`` images were written."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def _segment_share(args: argparse.Namespace, segmenter, classes: list[str], paths: list[Path],
                   stems: list[str], status: StatusLine) -> tuple[int, int]:
    """Segments ``paths`` and writes their outputs, reporting each failure on one line.

    Returns:
        ``(done, failed)``.

    Raises:
        _Interrupted: Ctrl-C (the files of the images finished by then are written).
    """
    from ..pipeline.batch import segment_files

    done = failed = 0
    outcomes = segment_files(
        segmenter, paths, classes, args.out, stems=stems,
        unknown_threshold=args.unknown_threshold,
        max_pixels=None if args.max_pixels <= 0 else args.max_pixels,
        save_scores=args.save_scores, progress=status)
    try:
        for outcome in outcomes:
            if outcome.error is None:
                done += 1
                continue
            failed += 1
            status.clear()
            error = outcome.error
            fail(f"{outcome.path}: {memory_message(error) if is_out_of_memory(error) else error}")
    except KeyboardInterrupt:
        raise _Interrupted(done) from None
    finally:
        status.clear()
    return done, failed
