"""End-to-end LPOSS+ timings per stage on a VOC-size image (500 x 375 -> 448 x 597 working).

The real ViT-B/16 architectures (OpenCLIP ViT-B-16, DINO ViT-B/16) with random weights:
the timings do not depend on the weights. The vocabulary is VOC's 21 classes with the
background synonyms (46 text rows), as in the paper's VOC evaluation. ``set_image`` is the
encoders plus the image's two graphs; ``predict`` answers a vocabulary whose text
embeddings are cached; ``predict_new_vocabulary`` adds the text encoder (80 templates per
name) for a 3-class user vocabulary and for VOC's.

    python benchmarks/bench_segment.py [--device cuda] [--precision fp16] [--repeats 3]

``--precision`` takes fp32, bf16, fp16 (GPU only: the library refuses it on the CPU) or
auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32); the JSON records the
precision it resolved to.

Prints a table and writes benchmarks/results/segment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_encoders import random_vitb16  # benchmarks/ is on the path of its scripts
from PIL import Image

from lposs.evaluation.datasets import benchmark_classes
from lposs.pipeline.segmenter import Segmenter

# A user's vocabulary (5 text rows) for the new-vocabulary timing, next to VOC's (46 rows).
USER_CLASSES = ["cat", "sofa", "background;wall;floor;ceiling"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stages(segmenter: Segmenter, path: Path, classes, repeats: int, save_dir):
    """A warm-up, then ``repeats`` timed runs of ``set_image``, ``predict`` and ``save``.

    Args:
        segmenter: the segmenter to time (its device is synchronised around each stage).
        path: the image file.
        classes: the vocabulary (its text embeddings are cached by the warm-up).
        repeats: timed runs.
        save_dir: where ``Segmentation.save`` writes.

    Returns:
        ``(runs, result, encoded)``: seconds per stage of each run, the last run's
        ``Segmentation`` and its ``EncodedImage``.
    """
    device = segmenter.device
    segmenter(path, classes)  # warm-up: caches, kernels, text embeddings
    runs, result, encoded = [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = segmenter.set_image(path)
        _sync(device)
        encode = time.perf_counter() - start
        start = time.perf_counter()
        result = segmenter.predict(classes)
        _sync(device)
        predict = time.perf_counter() - start
        start = time.perf_counter()
        result.save(save_dir, "out", path)
        save = time.perf_counter() - start
        runs.append({"set_image": encode, "set_image.encoders": result.timings["encode"],
                     "set_image.graphs": result.timings["graphs"], "predict": predict,
                     "save": save, "total": encode + predict,
                     **{f"predict.{k}": v for k, v in result.timings.items()
                        if k not in ("encode", "graphs")}})
    return runs, result, encoded


def time_new_vocabularies(segmenter: Segmenter, vocabularies: dict) -> dict:
    """Seconds of ``predict`` with an empty text cache (text encoder included), per
    vocabulary name, on the image already set."""
    times = {}
    for name, vocabulary in vocabularies.items():
        segmenter.clip.text_cache.clear()  # a new vocabulary: text encoder included
        start = time.perf_counter()
        segmenter.predict(vocabulary)
        _sync(segmenter.device)
        times[f"predict_new_vocabulary.{name}"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                        help="fp16: GPU only; auto: the library's choice for the device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "segment.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip, dino, precision = random_vitb16(device, args.precision, parser)
    segmenter = Segmenter(clip, dino)
    classes = benchmark_classes("voc")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "voc_size.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
        runs, _, _ = time_stages(segmenter, path, classes, args.repeats, tmp)
        new_vocabularies = time_new_vocabularies(
            segmenter, {"user_3_classes": USER_CLASSES, "voc_21_classes": classes})

    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    median.update(new_vocabularies)
    report = {
        "image": "500x375 -> 448x597 working, 15 windows, 21 classes (46 text rows)",
        "device": str(device), "precision": precision,
        "precision_asked": args.precision,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average": list(os.getloadavg()), "median_s": median, "runs": runs,
    }
    print(f"{'stage':<28}{'median s':>10}")
    for key, value in median.items():
        print(f"{key:<28}{value:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
