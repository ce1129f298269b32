"""``lposs convert``: make the label files some benchmarks need (train ids)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LpossError
from .options import EXIT_FAILED, HelpFormatter, fail

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "make the label files some benchmarks need (train ids)"

_CONVERTERS = ("coco_stuff", "coco_object", "cityscapes")  # lposs.evaluation.convert.convert_<name>


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``convert`` command to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "convert", formatter_class=HelpFormatter, help=SUMMARY,
        description="Convert raw annotations into the label files `lposs eval` reads:\n"
                    "  coco_stuff   annotations/<split>/<id>.png -> <id>_labelTrainIds.png "
                    "(171 classes)\n"
                    "  coco_object  COCO-Stuff PNGs (or --instances-json) -> "
                    "<id>_instanceTrainIds.png (81)\n"
                    "  cityscapes   gtFine/*_labelIds.png -> *_labelTrainIds.png (19)\n"
                    "Existing outputs are kept unless --overwrite; files are written atomically.",
    )
    p.add_argument("dataset", choices=_CONVERTERS, help="which annotations to convert")
    p.add_argument("--data-root", type=Path, required=True, metavar="DIR",
                   help="folder holding coco_stuff164k / cityscapes (or that folder itself)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="splits to convert (default: every split present)")
    p.add_argument("--instances-json", type=Path, default=None, metavar="FILE",
                   help="coco_object: rasterise COCO instance annotations from this file "
                        "instead of deriving them from the COCO-Stuff PNGs")
    p.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lposs convert`` from parsed arguments; returns the exit status."""
    from ..evaluation import convert
    from .progress import StatusLine

    kwargs = {"splits": args.splits, "overwrite": args.overwrite}
    if args.dataset == "coco_object":
        kwargs["instances_json"] = args.instances_json
    elif args.instances_json is not None:
        raise LpossError("--instances-json only applies to coco_object")
    status = StatusLine(sys.stderr)  # drawn on a terminal only
    try:
        result = getattr(convert, f"convert_{args.dataset}")(args.data_root, progress=status,
                                                             **kwargs)
    finally:
        status.clear()
    for message in result.failed:
        fail(message)
    print(f"{args.dataset}: wrote {result.written} file(s), kept {result.skipped} existing"
          + (f", {len(result.failed)} failed" if result.failed else ""))
    return EXIT_FAILED if result.failed else 0
