"""``lposs segment``: segment image files into free-text classes and write the results."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import LpossError, is_out_of_memory
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
    from ..config import DEFAULT_MAX_PIXELS

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
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs in OUT that another image file made (refused "
                        "otherwise)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs in OUT are complete (resumes a run)")
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


def _plan(args: argparse.Namespace, images: list[Path],
          report) -> tuple[list[tuple[Path, str]], int]:
    """The ``(image, output stem)`` pairs to segment, and how many were skipped as done.

    An image's stem is the first of ``stem``, ``<folder>_<stem>``, ``<folder>_<stem>_<hash
    of its path>`` (``lposs.output.files.output_stem``) that no other image of this run
    has and whose JSON in ``--out`` is absent or records this same file: a file finds its
    own earlier outputs again, and never takes another's. When every name holds another
    file's outputs, the image is reported and left out (``--overwrite`` takes the first
    name). With ``--skip-existing``, an image whose complete outputs exist is skipped.
    """
    from ..output.files import output_stem, recorded_source

    todo: list[tuple[Path, str]] = []
    taken: set[str] = set()
    skipped = 0
    for path in images:
        stem = output_stem(path, args.out)
        real = os.path.realpath(path)
        digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:8]
        names = [n for n in (stem, f"{path.parent.name}_{stem}",
                             f"{path.parent.name}_{stem}_{digest}") if n not in taken]
        mine = [n for n in names if recorded_source(args.out, n) in (None, real)]
        if not mine and not args.overwrite:
            report(f"{path}: its output names in {args.out} hold the results of other image "
                   "files; pass --overwrite to replace them, or choose another --out")
            continue
        stem = (mine or names)[0]
        taken.add(stem)
        outputs = [f"{stem}.png", f"{stem}_overlay.png", f"{stem}.json"]
        outputs += [f"{stem}_scores.npy"] * args.save_scores
        if (args.skip_existing and recorded_source(args.out, stem) == real
                and all((args.out / name).is_file() for name in outputs)):
            skipped += 1
            continue
        todo.append((path, stem))
    return todo, skipped


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler, ``kill``) stops the run as Ctrl-C does: one message, the
    status line cleared, the output folder's lock released."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _missing_message(pattern: str) -> str:
    """Why an input gave no image, with the files of a folder that Pillow cannot open."""
    from ..pipeline.image import IMAGE_SUFFIXES

    path = Path(pattern)
    if not path.is_dir():
        return f"{pattern}: no such image file, folder or pattern"
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if any(p.name.lower().endswith(IMAGE_SUFFIXES) for p in files):
        return f"{pattern}: holds only lposs's outputs, which are not segmented again"
    others = sorted(p.name for p in files if p.suffix not in (".json", ".npy"))
    if not others:
        return f"{pattern}: no image files in this folder"
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"{pattern}: no image files in this folder; skipped {shown}, whose suffixes "
            "Pillow cannot open (a plugin such as pillow-heif adds formats)")


def run(args: argparse.Namespace) -> int:
    """Run ``lposs segment`` from parsed arguments; returns the exit status."""
    from ..errors import ConfigError
    from ..pipeline.checks import check_unknown_threshold

    if args.out.exists() and not args.out.is_dir():
        raise LpossError(f"--out {args.out} is a file, not a folder")
    try:
        check_unknown_threshold(args.unknown_threshold)
    except ConfigError as err:  # once, not once per image
        raise ConfigError(str(err).replace("unknown_threshold", "--unknown-threshold")) from None
    from ..distributed import distributed_context

    if distributed_context()[1] > 1:  # torchrun: the processes share the folder by design
        ensure_writable(args.out)
        return _segment(args)
    with _sigterm_as_interrupt(), writing_to(args.out):  # locked; removed if nothing written
        return _segment(args)


def _segment(args: argparse.Namespace) -> int:
    """The command once the output folder is held.

    Under ``torchrun`` each process segments every WORLD_SIZE-th file (the output names
    are those of one process) and rank 0 prints the totals.
    """
    from ..distributed import distributed_context, process_group
    from ..methods import get_preset
    from ..pipeline.image import find_images
    from ..pipeline.segmenter import Segmenter

    rank, world, local_rank = distributed_context()
    classes = _class_names(args)
    config = config_from(args, get_preset(args.preset))
    images, missing = find_images(args.images)  # lposs's own outputs are not taken
    if rank == 0:
        for pattern in missing:
            fail(_missing_message(pattern))
    todo, skipped = _plan(args, images, fail if rank == 0 else lambda message: None)
    refused = len(images) - len(todo) - skipped
    if not todo:
        if rank == 0 and skipped and not refused and not missing:
            print(f"nothing to do: the outputs of all {skipped} image(s) exist in {args.out}")
            return 0
        if rank == 0:
            fail("no images to segment")
        return EXIT_FAILED
    images, stems = [path for path, _ in todo], [stem for _, stem in todo]
    share = list(range(rank, len(images), world))  # this process's files
    status = StatusLine(sys.stderr, [images[i].name for i in share],
                        enabled=False if args.quiet or rank > 0 else None,
                        prefix=f"rank {rank}: " if world > 1 else "")
    status.stage("loading models")
    try:
        segmenter = Segmenter.from_pretrained(config, clip_weights=args.clip_weights,
                                              dino_weights=args.dino_weights,
                                              depth_weights=args.depth_weights,
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
    failed += len(missing) + refused
    elapsed = time.perf_counter() - start
    if rank == 0 and not args.quiet:
        print(f"segmented {done} of {done + failed} image(s) into {len(classes)} classes in "
              f"{elapsed:.1f} s -> {args.out}" + (f" ({failed} failed)" if failed else "")
              + (f" ({skipped} skipped: outputs exist)" if skipped else ""))
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
