"""Images per minute of ``lposs segment`` over a folder: one image at a time vs pipelined.

"one at a time" is the plain library loop (``segmenter(path, classes)`` then
``Segmentation.save``), what the command ran before; "pipelined" is
``lposs.pipeline.batch.segment_files``, what the command runs now (the next image decoded and
resized, the last one's files written, while the encoders run). Both write the same files
(label PNG, overlay, JSON) for the same images with the same loaded segmenter.

The models are the real ViT-B/16 architectures (OpenCLIP ViT-B-16, DINO ViT-B/16) with
random weights, saved as local weight files and loaded the way ``--clip-weights`` /
``--dino-weights`` load them; the timings do not depend on the weights. The images are
the first 20 VOC 2012 photos of ``../shared/data/photos/voc2012/images`` when present,
else synthetic 500 x 375 photos; the vocabulary is VOC's 21 classes (46 text rows with the
background synonyms) or, with ``--vocabulary user``, 3 classes (5 rows). The warm-up
encodes the vocabulary's text (80 templates a row: minutes for VOC's on a small CPU).

    python benchmarks/bench_folder.py [--images 20] [--rounds 1] [--vocabulary user]
                                      [--device cuda]

Prints a table and writes benchmarks/results/folder.json.
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
from PIL import Image
from safetensors.torch import save_file

from lposs.encoders import load_clip, load_dino
from lposs.evaluation.datasets import benchmark_classes
from lposs.pipeline.batch import segment_files
from lposs.pipeline.segmenter import Segmenter

USER_CLASSES = ["cat", "sofa", "background;wall;floor;ceiling"]  # as bench_segment.py
VOC_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "voc2012" \
    / "images"


def make_photos(folder: Path, count: int) -> tuple[list[Path], str]:
    """``count`` VOC-size photos: real VOC ones when available, else smooth synthetic ones.

    Returns:
        ``(paths, description)``.
    """
    real = sorted(VOC_PHOTOS.glob("*.jpg"))[:count] if VOC_PHOTOS.is_dir() else []
    if len(real) == count:
        return real, f"{count} VOC 2012 photos from {VOC_PHOTOS}"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):  # blurred noise: compresses like a photo, unlike white noise
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        paths.append(folder / f"photo_{i:02d}.jpg")
        image.save(paths[-1], quality=90)
    return paths, f"{count} synthetic 500x375 JPEG photos"


def save_random_vitb16(folder: Path) -> tuple[Path, Path]:
    """Random-weight OpenCLIP ViT-B-16 and DINO ViT-B/16 as local safetensors files."""
    torch.manual_seed(0)
    clip = load_clip("ViT-B-16", pretrained=None).model
    dino = load_dino("dino_vitb16", pretrained=False).model
    clip_file, dino_file = folder / "clip_vitb16.safetensors", folder / "dino_vitb16.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(dino_file))
    return clip_file, dino_file


def one_at_a_time(segmenter: Segmenter, paths, classes, out: Path) -> list[float]:
    """The plain loop; returns the seconds each image took (segment + save)."""
    seconds = []
    for path in paths:
        start = time.perf_counter()
        segmenter(path, classes).save(out, path.stem, segmenter.image)
        seconds.append(time.perf_counter() - start)
    return seconds


def pipelined(segmenter: Segmenter, paths, classes, out: Path) -> list[float]:
    """``segment_files``; returns the seconds between consecutive finished images."""
    seconds, last = [], time.perf_counter()
    for outcome in segment_files(segmenter, paths, classes, out):
        if outcome.error is not None:
            raise outcome.error
        now = time.perf_counter()
        seconds.append(now - last)
        last = now
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating rounds of the two loops (spread across rounds)")
    parser.add_argument("--vocabulary", default="voc", choices=["voc", "user"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "folder.json")
    args = parser.parse_args()

    classes = benchmark_classes("voc") if args.vocabulary == "voc" else USER_CLASSES
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, images = make_photos(tmp, args.images)
        clip_file, dino_file = save_random_vitb16(tmp)
        segmenter = Segmenter.from_pretrained("lposs+", clip_weights=clip_file,
                                              dino_weights=dino_file, device=args.device,
                                              precision=args.precision)
        segmenter(paths[0], classes)  # warm-up: kernels, the vocabulary's text embeddings
        runs = {"one_at_a_time": [], "pipelined": []}
        for round_ in range(args.rounds):
            for name, loop in (("one_at_a_time", one_at_a_time), ("pipelined", pipelined)):
                start = time.perf_counter()
                per_image = loop(segmenter, paths, classes, tmp / f"{name}-{round_}")
                total = time.perf_counter() - start
                runs[name].append({"seconds": total, "images_per_minute": 60 * len(paths) / total,
                                   "per_image_s": per_image, "load_average": os.getloadavg()})
                print(f"round {round_ + 1} {name}: {60 * len(paths) / total:.2f} images/min",
                      flush=True)

    summary = {}
    for name, rounds in runs.items():
        rates = [r["images_per_minute"] for r in rounds]
        per_image = [s for r in rounds for s in r["per_image_s"]]
        summary[name] = {"images_per_minute": statistics.median(rates),
                         "images_per_minute_min": min(rates),
                         "images_per_minute_max": max(rates),
                         "per_image_s_min": min(per_image),
                         "per_image_s_median": statistics.median(per_image),
                         "per_image_s_max": max(per_image)}
    speedup = summary["pipelined"]["images_per_minute"] / \
        summary["one_at_a_time"]["images_per_minute"]
    report = {"images": images, "classes": classes, "device": args.device,
              "precision": args.precision, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "summary": summary, "speedup": speedup, "runs": runs}
    print(f"\n{'loop':<16}{'img/min':>9}{'min':>8}{'max':>8}"
          f"{'s/img min':>11}{'median':>8}{'max':>8}")
    for name, s in summary.items():
        print(f"{name:<16}{s['images_per_minute']:>9.2f}{s['images_per_minute_min']:>8.2f}"
              f"{s['images_per_minute_max']:>8.2f}{s['per_image_s_min']:>11.2f}"
              f"{s['per_image_s_median']:>8.2f}{s['per_image_s_max']:>8.2f}")
    print(f"pipelined / one at a time: {speedup:.3f}")
    print(json.dumps({"summary": summary, "speedup": speedup}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
