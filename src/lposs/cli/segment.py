"""``lposs segment``: segment image files into free-text classes and write the results."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import LpossError
from .options import (
    EXIT_FAILED,
    HelpFormatter,
    add_model_options,
    add_propagation_options,
    config_from,
    fail,
    is_out_of_memory,
    memory_message,
    writing_to,
)

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "segment images into free-text classes"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``segment`` command to ``subparsers`` (from ``add_subparsers``)."""
    from ..images import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser(
        "segment", formatter_class=HelpFormatter, help=SUMMARY,
        description="Segment images into free-text classes with LPOSS+ (or LPOSS).\n\n"
                    "Per image, OUT gets <name>.png (palette label map, pixel = class index, "
                    "255 = unknown),\n<name>_overlay.png (image, class colours, legend) and "
                    "<name>.json (classes, colours,\nshares, timings, settings); "
                    "--save-scores adds <name>_scores.npy (C, H, W) float32.",
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
    from ..checks import check_unknown_threshold
    from ..errors import ConfigError

    try:
        check_unknown_threshold(args.unknown_threshold)
    except ConfigError as err:  # once, not once per image
        raise ConfigError(str(err).replace("unknown_threshold", "--unknown-threshold")) from None
    with writing_to(args.out):  # removed again if nothing is written there
        return _segment(args)


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..config import get_preset
    from ..images import find_images
    from ..segmenter import Segmenter

    classes = _class_names(args)
    config = config_from(args, get_preset(args.preset))
    max_pixels = None if args.max_pixels <= 0 else args.max_pixels
    images, missing = find_images(args.images)
    failed = 0
    for pattern in missing:
        fail(f"{pattern}: no such image file, folder or pattern")
        failed += 1
    if not images:
        fail("no images to segment")
        return EXIT_FAILED
    segmenter = Segmenter.from_pretrained(config, clip_weights=args.clip_weights,
                                          dino_weights=args.dino_weights, device=args.device,
                                          precision=args.precision)
    start = time.perf_counter()
    done = 0
    bar = tqdm(zip(images, _unique_stems(images)), total=len(images), unit="img",
               disable=len(images) < 2, file=sys.stderr)
    for path, stem in bar:
        try:
            result = segmenter(path, classes, unknown_threshold=args.unknown_threshold,
                               max_pixels=max_pixels)
            result.save(args.out, stem, segmenter.image, scores=args.save_scores)
            done += 1
        except (LpossError, OSError, ValueError, MemoryError, RuntimeError) as err:
            if isinstance(err, (MemoryError, RuntimeError)) and not is_out_of_memory(err):
                raise  # a bug, not this image: its traceback is what a report needs
            bar.clear()
            fail(f"{path}: {memory_message(err) if is_out_of_memory(err) else err}")
            failed += 1
            _release_cached_memory()
    elapsed = time.perf_counter() - start
    print(f"segmented {done} of {done + failed} image(s) into {len(classes)} classes in "
          f"{elapsed:.1f} s -> {args.out}" + (f" ({failed} failed)" if failed else ""))
    return EXIT_FAILED if failed else 0


def _release_cached_memory() -> None:
    """Return the CUDA cache's blocks after a failed image, so the next image gets them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
