"""Labels of lposs against the paper's pipeline rebuilt independently, on real photos.

The reference follows METHOD.md step by step with other code than lposs's wherever the
step is ours: the mmcv working size written out, Pillow decoding and ``cv2.resize`` of
the uint8 image, the window grid and crops written as loops, the paper's per-class
scipy CG for both propagations (``bench_propagation.baseline_patch`` / ``baseline_pixel``),
each window's grid resized with ``F.interpolate`` straight to its pixel size and the
overlaps averaged in a loop, the max over synonyms at working size, one bilinear resize
of the raw scores to the original size, argmax. Only the encoders are shared (the same
random-weight ViT-B/16 objects; their MaskCLIP/DINO outputs are checked step by step in
tests/test_encoders.py).

    python benchmarks/fidelity_real.py [--limit N] [--classes "a,b;c,..."]

Needs ../shared/data/photos (real photos; never committed). Prints the share of equal
labels per photo and preset and writes ``benchmarks/results/fidelity_real.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_propagation import baseline_patch, baseline_pixel  # noqa: E402

import lposs  # noqa: E402
from lposs.segmenter import parse_class_names  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
RESULTS = Path(__file__).resolve().parent / "results" / "fidelity_real.json"
CLASSES = "person;man;woman,animal;dog;cat;horse,vehicle;car;bus,building;house,sky,tree;grass"


def reference_labels(image: np.ndarray, classes: list[str], clip, dino, pixel_stage: bool,
                     cfg: lposs.LPOSSConfig) -> np.ndarray:
    """The paper's pipeline for one ``(H, W, 3)`` uint8 image -> ``(H, W)`` labels."""
    height, width = image.shape[:2]
    scale = min(2048 / max(height, width), 448 / min(height, width))  # mmcv rescale_size
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    working = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    working = torch.from_numpy(working).permute(2, 0, 1).float() / 255.0

    def spans(length):
        count = max(length - 224 + 112 - 1, 0) // 112 + 1
        return [(max(min(i * 112 + 224, length) - 224, 0), min(i * 112 + 224, length))
                for i in range(count)]

    boxes = [(y1, x1, y2, x2) for y1, y2 in spans(h) for x1, x2 in spans(w)]
    crops = []
    for y1, x1, y2, x2 in boxes:
        crop = torch.zeros(3, -(-(y2 - y1) // 16) * 16, -(-(x2 - x1) // 16) * 16)
        crop[:, : y2 - y1, : x2 - x1] = working[:, y1:y2, x1:x2]
        crops.append(crop)
    crops = torch.stack(crops)
    with torch.inference_mode():
        vlm = clip.dense_features(crops).float()  # (n, E, gh, gw)
        vm = dino.dense_features(crops).float()  # (n, D, gh, gw)
        text, class_index = clip.encode_classes(classes)
    n, _, gh, gw = vlm.shape
    initial = torch.einsum("nehw,ce->nhwc", vlm, text.float()).reshape(n * gh * gw, -1)
    features = vm.permute(0, 2, 3, 1).reshape(n * gh * gw, -1)
    positions = torch.tensor([(y1 + 8 + 16 * r, x1 + 8 + 16 * c) for y1, x1, _, _ in boxes
                              for r in range(gh) for c in range(gw)], dtype=torch.float32)
    propagated = torch.from_numpy(baseline_patch(features, positions, initial, cfg.k))
    grids = propagated.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
    total = torch.zeros(grids.shape[1], h, w)
    count = torch.zeros(h, w)
    for grid, (y1, x1, y2, x2) in zip(grids, boxes):
        total[:, y1:y2, x1:x2] += F.interpolate(grid[None], size=(y2 - y1, x2 - x1),
                                                mode="bilinear", align_corners=False)[0]
        count[y1:y2, x1:x2] += 1
    scores = total / count
    if pixel_stage:
        scores = torch.from_numpy(baseline_pixel(working, scores, cfg.r))
    reduced = torch.stack([scores[class_index == c].amax(0) for c in range(len(classes))])
    full = F.interpolate(reduced[None], size=(height, width), mode="bilinear",
                         align_corners=False)[0]
    return full.argmax(0).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="photos at most")
    parser.add_argument("--classes", default=CLASSES)
    args = parser.parse_args()
    photos = sorted(PHOTOS.glob("voc2012/images/2011_00000*.jpg")) + sorted(
        PHOTOS.glob("voc2012/images/2011_000025.jpg")) + sorted(
        PHOTOS.glob("voc2012/images/2011_003066.jpg")) + sorted(PHOTOS.glob("ade20k/images/*"))
    if not photos:
        print(f"no photos under {PHOTOS}", file=sys.stderr)
        return 1
    photos = photos[: args.limit]
    classes = parse_class_names(args.classes)
    torch.manual_seed(0)
    clip = lposs.load_clip("ViT-B-16", pretrained=None)
    dino = lposs.load_dino("dino_vitb16", weights=None, pretrained=False)
    rows = []
    for path in photos:
        image = np.asarray(Image.open(path).convert("RGB"))
        for preset in ("lposs", "lposs+"):
            cfg = lposs.PRESETS[preset]
            start = time.perf_counter()
            ours = lposs.Segmenter(clip, dino, cfg)(str(path), classes).labels.numpy()
            ref = reference_labels(image, classes, clip, dino, cfg.pixel_stage, cfg)
            agree = float((ours == ref).mean())
            rows.append({"photo": path.name, "size": list(image.shape[:2]), "preset": preset,
                         "agreement": agree, "seconds": time.perf_counter() - start})
            print(f"{path.name:24s} {preset:7s} {image.shape[0]}x{image.shape[1]}  "
                  f"labels equal: {100 * agree:.3f} %", flush=True)
    worst = min(r["agreement"] for r in rows)
    print(f"worst agreement: {100 * worst:.3f} % over {len(rows)} photo/preset pairs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"classes": classes, "rows": rows, "worst": worst}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
