"""``lposs compare``: two eval run folders of one dataset, image by image and class by class
(the paper's Figs. 5 and 6), as CSV tables and PNG plots."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .options import HelpFormatter

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "compare two eval runs per image and per class (CSV and PNG plots)"

_DESCRIPTION = """\
Compare two `lposs eval` run folders of one dataset over the images present in both:
per-image mIoU of A against B (the paper's Figs. 5a and 6 left), per-image Boundary IoU
(Fig. 5b, when both runs were made with --boundary), mIoU against Boundary IoU of each
run (Fig. 5c) and per-class IoU (Fig. 6 right). Writes OUT/per_image.csv,
OUT/per_class.csv and a PNG per plot (needs matplotlib: pip install 'lposs[plots]').
  lposs compare runs/eval/voc-maskclip-... runs/eval/voc-lposs-... --out figures/"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` command to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser("compare", formatter_class=HelpFormatter, help=SUMMARY,
                              description=_DESCRIPTION)
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="an eval run folder (x axis)")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="an eval run folder (y axis)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the CSV tables and PNG plots")
    p.set_defaults(run=run)
    return p


def _mean(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{100 * sum(values) / len(values):.2f}" if values else "-"


def run(args: argparse.Namespace) -> int:
    """Run ``lposs compare`` from parsed arguments; returns the exit status."""
    from ..evaluation.compare import compare_runs, read_run, write_comparison

    comparison = compare_runs(read_run(args.run_a), read_run(args.run_b))
    written = write_comparison(comparison, args.out)
    label_a, label_b = comparison.labels()
    ids, a, b = comparison.ids, comparison.a, comparison.b
    better = sum(b.miou[i] > a.miou[i] for i in ids), sum(a.miou[i] > b.miou[i] for i in ids)
    print(f"## {a.dataset}: {len(ids)} images in both runs\n\n"
          f"| | A: {label_a} | B: {label_b} |\n|---|---:|---:|\n"
          f"| mean per-image mIoU (%) | {_mean(a.miou[i] for i in ids)} | "
          f"{_mean(b.miou[i] for i in ids)} |\n"
          f"| mIoU over these images (%) | {_mean(comparison.class_iou[0])} | "
          f"{_mean(comparison.class_iou[1])} |\n"
          f"| images where it is higher | {better[1]} | {better[0]} |")
    print(f"lposs: wrote {', '.join(p.name for p in written)} to {args.out}", file=sys.stderr)
    return 0
