"""Speed of the two encoders on the windows of one VOC-size image.

Both real ViT-B/16 architectures (OpenCLIP ViT-B-16 as MaskCLIP, timm DINO ViT-B/16 values)
with random weights, on the 15 windows (224 x 224, stride 112) of a 448 x 597 working
image (the shorter side of a 375 x 500 VOC image scaled to 448). Prints a table and writes
JSON (default ``benchmarks/results/encoders.json``).

    python benchmarks/bench_encoders.py [--device cpu] [--precision auto] [--threads 2]

fp16 runs on a GPU only (the library refuses it on the CPU); ``auto`` is the library's
choice for the device (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), and the
JSON records the precision it resolved to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lposs.encoders import load_clip, load_dino, resolve_precision
from lposs.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKING_SIZE = (448, 597)  # (H, W) of a VOC image at the working size
N_WINDOWS = 15  # 3 rows x 5 columns of 224 x 224 windows with stride 112 on 448 x 597
WINDOW = 224


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, kernels, lazy init)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _flops(encoder, window: torch.Tensor) -> int:
    """Floating-point operations of one window through an encoder (matmuls, convs, attention)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel escapes the counter
    try:
        with FlopCounterMode(display=False) as counter:
            encoder.dense_features(window)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def gemm_gflops(device: torch.device, dtype: torch.dtype, tokens: int = 16 * 197) -> float:
    """Throughput of a ViT-B-sized matrix product now: what the machine gives at this moment
    (``tokens`` rows: a batch of 16 windows by default)."""
    a = torch.randn(tokens, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    times = _time(lambda: a @ b, device, repeats=5)
    return 2 * a.shape[0] * 768 * 3072 / statistics.median(times) / 1e9


def time_encoders(encoders: dict, windows: torch.Tensor, device: torch.device, *,
                  batch_size: int, repeats: int) -> dict:
    """Median time (after a warm-up) and FLOPs of each encoder's ``dense_features``.

    Args:
        encoders: label -> encoder (a ``ClipEncoder`` or ``DinoEncoder``) on ``device``.
        windows: `(B, 3, h, w)` windows on ``device``.
        device: where the encoders run (synchronised around each timed run).
        batch_size: windows per forward pass.
        repeats: timed runs.

    Returns:
        label -> ``{"median_s", "runs_s", "gflop", "gflops_per_s"}`` for all B windows.
    """
    rows = {}
    for label, encoder in encoders.items():
        times = _time(
            lambda enc=encoder: enc.dense_features(windows, batch_size=batch_size),
            device,
            repeats,
        )
        flops = len(windows) * _flops(encoder, windows[:1])
        median = statistics.median(times)
        rows[label] = {
            "median_s": median,
            "runs_s": times,
            "gflop": flops / 1e9,
            "gflops_per_s": flops / median / 1e9,
        }
    return rows


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def random_vitb16(device: torch.device, precision: str, parser: argparse.ArgumentParser):
    """``(clip, dino, precision)``: the real OpenCLIP ViT-B-16 and DINO ViT-B/16
    architectures with random weights (seed 0) on ``device``, in ``precision`` resolved
    (``auto``); a precision the device refuses (fp16 on the CPU) is a usage error."""
    torch.manual_seed(0)
    try:
        resolved = resolve_precision(precision, device)
    except ConfigError as err:
        parser.error(str(err))
    clip = load_clip("ViT-B-16", pretrained=None, device=device, precision=resolved)
    dino = load_dino("dino_vitb16", pretrained=False, device=device, precision=resolved)
    return clip, dino, resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                        help="fp16: GPU only; auto: the library's choice for the device")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/encoders.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip, dino, precision = random_vitb16(device, args.precision, parser)
    windows = torch.rand(N_WINDOWS, 3, WINDOW, WINDOW, device=device)

    load_before = _load()
    gemm = gemm_gflops(device, clip.model.visual.conv1.weight.dtype)
    rows = time_encoders({"clip_maskclip": clip, "dino_values": dino}, windows, device,
                         batch_size=args.batch_size, repeats=args.repeats)
    total = rows["clip_maskclip"]["median_s"] + rows["dino_values"]["median_s"]

    print(f"encoders on {N_WINDOWS} windows {WINDOW}x{WINDOW} of a {WORKING_SIZE} image")
    print(f"device={device} precision={precision} (asked: {args.precision}) "
          f"threads={torch.get_num_threads()}")
    print(f"load average before: {load_before}, reference GEMM now: {gemm:.0f} GFLOP/s")
    print(f"{'encoder':<16}{'median s':>10}{'windows/s':>12}{'GFLOP':>10}{'GFLOP/s':>10}")
    for label, row in rows.items():
        print(
            f"{label:<16}{row['median_s']:>10.3f}{N_WINDOWS / row['median_s']:>12.1f}"
            f"{row['gflop']:>10.0f}{row['gflops_per_s']:>10.0f}"
        )
    print(f"{'total':<16}{total:>10.3f}   (target <= 6 s on 2 CPU cores)")

    result = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
        ),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "reference_gemm_gflops_per_s": gemm,
        "precision": precision,
        "precision_asked": args.precision,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "windows": N_WINDOWS,
        "window_size": WINDOW,
        "working_size": list(WORKING_SIZE),
        "torch": torch.__version__,
        "encoders": rows,
        "total_s": total,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
