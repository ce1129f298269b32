"""Oracle (patch-level resolution) mIoU and Boundary IoU on PASCAL VOC 2012 val.

Reads the 1,449 official val masks (palette PNGs: 0..20, 255 = void), replaces each by
``lposs.evaluation.metrics.oracle_labels`` (ground truth down to the 16-px patch grid and back) and
scores it against the original, as the paper's "Oracle (patch-level res.)" row.

    python benchmarks/oracle_voc.py [MASKS_DIR] [--patch-size 16] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lposs.evaluation.metrics import SegmentationMetrics, oracle_labels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MASKS = REPO.parent / "shared" / "data" / "voc2012_val_masks"
PAPER = {"miou": 91.5, "boundary_miou": 80.1}  # Tables 1 and 2, oracle row, VOC
NUM_CLASSES = 21


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("masks", nargs="?", type=Path, default=DEFAULT_MASKS,
                        help="folder with val.txt and <id>.png (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N ids")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the per-image ops are small, and on a busy "
                        "machine one thread is several times faster (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" /
                        "oracle_voc.json")
    args = parser.parse_args(argv)

    ids_file = args.masks / "val.txt"
    if not ids_file.is_file():
        print(f"error: {ids_file} not found (expected a folder with val.txt and <id>.png)",
              file=sys.stderr)
        return 2
    ids = ids_file.read_text().split()[: args.limit]
    torch.set_num_threads(args.threads)

    metrics = SegmentationMetrics(NUM_CLASSES, ignore_index=255, boundary=True)
    start = time.perf_counter()
    for image_id in ids:
        with Image.open(args.masks / f"{image_id}.png") as png:
            if png.mode != "P":
                raise ValueError(f"{image_id}.png: expected a palette PNG, got mode {png.mode}")
            gt = np.array(png)  # palette indices: the class labels
        metrics.update(oracle_labels(gt, patch_size=args.patch_size), gt)
    seconds = time.perf_counter() - start
    result = metrics.compute()

    ours = {key: 100 * result[key] for key in PAPER}
    print(f"VOC 2012 val, {len(ids)} masks, patch {args.patch_size}, {seconds:.1f} s")
    print(f"{'metric':<14}{'ours':>8}{'paper':>8}")
    for key, label in (("miou", "mIoU"), ("boundary_miou", "Boundary IoU")):
        print(f"{label:<14}{ours[key]:>8.2f}{PAPER[key]:>8.1f}")

    record = {
        "dataset": "voc2012_val",
        "num_images": len(ids),
        "patch_size": args.patch_size,
        "miou": ours["miou"],
        "boundary_miou": ours["boundary_miou"],
        "paper": PAPER,
        "iou_per_class": [100 * v for v in result["iou"]],
        "boundary_iou_per_class": [100 * v for v in result["boundary_iou"]],
        "pixel_accuracy": 100 * result["pixel_accuracy"],
        "seconds": round(seconds, 1),
        "threads": args.threads,
        "note": "values in percent; timing on a 2-core machine shared with other jobs (noisy)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
