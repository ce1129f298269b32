"""Peak memory of ``lposs segment`` on very large images (64 MP and 100 MP).

Each measurement is one ``lposs segment IMAGE --classes a,b,c --out DIR`` subprocess with
the real ViT-B/16 architectures (OpenCLIP ViT-B-16, DINO ViT-B/16) as local random-weight
files, so the models weigh what the real ones weigh; the peak resident set size of the
child is read from ``os.wait4`` (``ru_maxrss``: the kernel's high-water mark, which sees
torch, numpy and Pillow alike). Two runs per image: the default outputs (label PNG,
overlay, JSON) and with ``--save-scores``. The images are photo-like (smooth colour fields
from a bicubic upscale of a small random image, plus grain), saved as JPEG.

    python benchmarks/bench_memory.py [--sizes 8000 10000] [--work DIR] [--threads 2]

Prints a table and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = "a,b,c"


def make_photo(path: Path, side: int, seed: int = 0) -> None:
    """A ``side`` x ``side`` photo-like JPEG: a bicubic upscale of a 64 x 64 random image
    (smooth colour regions and edges) with a little grain, built in row bands so that the
    generator itself stays small."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = small.resize((side, side), Image.BICUBIC)
    band = 1000
    for top in range(0, side, band):
        box = (0, top, side, min(top + band, side))
        rows = np.asarray(big.crop(box)).astype(np.int16)
        rows += rng.integers(-6, 7, rows.shape, dtype=np.int16)
        big.paste(Image.fromarray(np.clip(rows, 0, 255).astype(np.uint8)), box)
    big.save(path, quality=90)


def make_weights(folder: Path) -> tuple[Path, Path]:
    """Random-weight checkpoints of the real architectures: OpenCLIP ViT-B-16 (the whole
    CLIP, text tower included) and timm DINO ViT-B/16, as safetensors files."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    clip_file, dino_file = folder / "clip_vitb16.safetensors", folder / "dino_vitb16.safetensors"
    if not clip_file.exists():
        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-B-16", pretrained=None)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    if not dino_file.exists():
        torch.manual_seed(1)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(dino_file))
    return clip_file, dino_file


def peak_rss_of(command: list[str], env: dict) -> tuple[float, float, int, str]:
    """Run ``command``; return (peak RSS in GB, seconds, exit status, stderr tail)."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4: this child's own rusage (RUSAGE_CHILDREN would be the max over all runs)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    return usage.ru_maxrss * 1024 / 1e9, seconds, child.returncode, text[-600:]


def cpu_description() -> dict:
    """The CPU model and the flags that matter for the encoders' precision."""
    info = {"machine": platform.machine(), "model": platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                "amx_tile", "avx512_fp16"})
                break
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 10000],
                        help="square image sides (8000: 64 MP, 10000: 100 MP)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the images and weights (kept; default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the child")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        "memory.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        clip_file, dino_file = make_weights(work)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1",
               "LPOSS_CACHE": str(work / "cache")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        rows = []
        for side in args.sizes:
            image = work / f"photo_{side}.jpg"
            if not image.exists():
                make_photo(image, side)
            for outputs, extra in (("labels", []), ("labels+scores", ["--save-scores"])):
                out_dir = work / f"out_{side}_{outputs}"
                command = [sys.executable, "-m", "lposs", "segment", str(image), "--classes",
                           CLASSES, "--out", str(out_dir), "--clip-weights", str(clip_file),
                           "--dino-weights", str(dino_file), *extra]
                peak, seconds, status, stderr = peak_rss_of(command, env)
                row = {"size": f"{side}x{side}", "megapixels": side * side / 1e6,
                       "outputs": outputs, "peak_rss_gb": round(peak, 3),
                       "seconds": round(seconds, 1), "exit_status": status}
                if status:
                    row["stderr"] = stderr
                rows.append(row)
                print(f"{row['size']:>12} {outputs:<14} {peak:6.2f} GB {seconds:6.1f} s"
                      + (f"  exit {status}: {stderr.strip().splitlines()[-1:]}" if status else ""),
                      flush=True)
                for written in out_dir.glob("*"):
                    written.unlink()

    report = {"command": "lposs segment IMAGE --classes a,b,c --out DIR "
                         "--clip-weights CLIP.safetensors --dino-weights DINO.safetensors",
              "cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "rows": rows}
    print(f"\n{'image':>12} {'outputs':<14} {'peak RSS':>9} {'time':>8}")
    for row in rows:
        print(f"{row['size']:>12} {row['outputs']:<14} {row['peak_rss_gb']:6.2f} GB "
              f"{row['seconds']:6.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
