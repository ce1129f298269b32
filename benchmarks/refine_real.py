"""LPOSS+ on real photos: refine the patch-resolution oracle and measure what it gains.

The oracle (ground truth downsampled to the 16-pixel patch grid and upsampled back) has
exactly the blocky boundaries that LPOSS+ is meant to fix, and needs no model weights.
Each mask's oracle label map is one-hot encoded, refined by the pixel stage on its photo
(`lposs.pipeline.refine.refine_scores`, the paper's r = 13, tau = 0.01, alpha = 0.95 at the
448 working size), and both are scored against the ground truth.

    python benchmarks/refine_real.py [--data ../shared/data/photos]

Reads `<data>/voc2012/{images,masks}` (21 classes) and `<data>/ade20k/{images,masks}`
(150 classes, label 0 ignored); prints mIoU / Boundary IoU before and after, and writes
benchmarks/results/refine_real.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lposs.evaluation.datasets import FolderDataset, benchmark_classes
from lposs.evaluation.metrics import SegmentationMetrics, oracle_labels
from lposs.pipeline.refine import refine_scores

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def _refined_oracle(image_path: Path, oracle: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot oracle labels (misses start empty) -> LPOSS+ -> argmax, `(H, W)` int64."""
    present = [int(v) for v in oracle.unique() if v < num_classes]
    if not present:
        return oracle
    scores = torch.stack([(oracle == v).float() for v in present])
    refined = refine_scores(image_path, scores, max_pixels=None)
    return torch.tensor(present)[refined.argmax(dim=0)]


def evaluate(dataset: FolderDataset) -> dict:
    n = len(dataset.classes)
    before = SegmentationMetrics(n, ignore_index=dataset.ignore_index)
    after = SegmentationMetrics(n, ignore_index=dataset.ignore_index)
    start = time.perf_counter()
    for sample in dataset:
        gt = torch.from_numpy(sample.load_label())
        oracle = oracle_labels(gt)
        before.update(oracle, gt)
        after.update(_refined_oracle(sample.image_path, oracle, n), gt)
    seconds = time.perf_counter() - start
    b, a = before.compute(), after.compute()
    return {"images": len(dataset), "seconds": seconds,
            "oracle": {"miou": b["miou"], "boundary_iou": b["boundary_miou"]},
            "oracle+lposs+": {"miou": a["miou"], "boundary_iou": a["boundary_miou"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "refine_real.json")
    args = parser.parse_args()
    sets = {
        "voc2012": FolderDataset(args.data / "voc2012" / "images", args.data / "voc2012" / "masks",
                                 benchmark_classes("voc")),
        "ade20k": FolderDataset(args.data / "ade20k" / "images", args.data / "ade20k" / "masks",
                                benchmark_classes("ade20k"), reduce_zero_label=True),
    }
    report = {name: evaluate(ds) for name, ds in sets.items()}
    print(f"{'photos':<10}{'n':>4}  {'mIoU before':>12}{'after':>8}  {'BIoU before':>12}"
          f"{'after':>8}  {'s/img':>6}")
    for name, r in report.items():
        b, a = r["oracle"], r["oracle+lposs+"]
        print(f"{name:<10}{r['images']:>4}  {100 * b['miou']:>12.1f}{100 * a['miou']:>8.1f}  "
              f"{100 * b['boundary_iou']:>12.1f}{100 * a['boundary_iou']:>8.1f}  "
              f"{r['seconds'] / r['images']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
