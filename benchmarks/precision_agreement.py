"""Agreement of labels between fp32 and reduced-precision encoders on real photos.

The real photos of ``../shared/data/photos`` (VOC 2012 and ADE20K), the real ViT-B/16
architectures (OpenCLIP ViT-B-16, DINO ViT-B/16) with seeded random weights (no
pretrained weights here), VOC's 21 classes with the background synonyms. Per photo: the
share of pixels whose label is the same with bf16 encoders (and fp16 on CUDA) as with
fp32, and the seconds of ``set_image`` in each precision.

What the figure can and cannot tell: with random weights the class scores are nearly
equal everywhere (near-ties are common), so a tiny change in the features flips labels
that trained weights would separate clearly; the agreement here is a pessimistic bound of
the trained models' agreement, not an estimate of it. To show how much near-ties weigh,
the agreement is also given on the pixels whose fp32 margin (best minus second-best score,
cosine scale) is above the median margin.

    python benchmarks/precision_agreement.py [--voc 10] [--ade 2] [--device cpu]

Prints a table and writes benchmarks/results/precision_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_memory import cpu_description  # benchmarks/ is on the path of its scripts

from lposs.encoders import load_clip, load_dino
from lposs.evaluation.datasets import benchmark_classes
from lposs.pipeline.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"


def segmenter(precision: str, device: torch.device) -> Segmenter:
    """The same seeded random weights in every precision (built from the seed each time)."""
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", pretrained=None, device=device, precision=precision)
    torch.manual_seed(1)
    dino = load_dino("dino_vitb16", pretrained=False, device=device, precision=precision)
    return Segmenter(clip, dino)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(photos: list[Path], precisions: list[str], device: torch.device, classes) -> list[dict]:
    """Per photo and precision: labels, ``set_image`` seconds; agreement against fp32."""
    reference: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for precision in precisions:
        seg = segmenter(precision, device)
        seg.set_image(torch.rand(3, 224, 224))  # warm-up: one window through both encoders
        for path in photos:
            start = time.perf_counter()
            seg.set_image(path)
            _sync(device)
            seconds = time.perf_counter() - start
            result = seg.predict(classes)
            labels = result.labels
            row = {"photo": f"{path.parent.parent.name}/{path.name}", "precision": precision,
                   "set_image_s": round(seconds, 3)}
            if precision == "fp32":
                top2 = result.scores.full().topk(2, dim=0).values
                reference[path] = (labels, top2[0] - top2[1])
            else:
                ref_labels, margin = reference[path]
                same = labels == ref_labels
                clear = margin > margin.median()
                row["agreement"] = float(same.float().mean())
                row["agreement_above_median_margin"] = float(same[clear].float().mean())
                row["fp32_median_margin"] = float(margin.median())
            rows.append(row)
            print(f"{row['photo']:<34}{precision:>6}{seconds:>9.1f} s"
                  + (f"{row['agreement']:>10.4f}{row['agreement_above_median_margin']:>10.4f}"
                     if "agreement" in row else ""), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=int, default=10, help="first N VOC photos")
    parser.add_argument("--ade", type=int, default=2, help="first N ADE20K photos")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        "precision_agreement.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    photos = (sorted((PHOTOS / "voc2012" / "images").glob("*.jpg"))[:args.voc]
              + sorted((PHOTOS / "ade20k" / "images").glob("*.jpg"))[:args.ade])
    if not photos:
        parser.error(f"no photos under {PHOTOS}")
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    print(f"{'photo':<34}{'prec':>6}{'set_image':>11}{'agree':>10}{'agree>med':>10}")
    rows = run(photos, precisions, device, benchmark_classes("voc"))

    summary = {}
    for precision in precisions:
        mine = [r for r in rows if r["precision"] == precision]
        summary[precision] = {"median_set_image_s": statistics.median(r["set_image_s"]
                                                                      for r in mine)}
        if precision != "fp32":
            summary[precision]["mean_agreement"] = statistics.fmean(r["agreement"] for r in mine)
            summary[precision]["mean_agreement_above_median_margin"] = statistics.fmean(
                r["agreement_above_median_margin"] for r in mine)
    report = {"device": str(device), "cpu": cpu_description(), "cpu_count": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "weights": "random, seeded (torch.manual_seed 0 for CLIP, 1 for DINO)",
              "classes": "VOC 21 with background synonyms",
              "summary": summary, "rows": rows}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
