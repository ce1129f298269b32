"""Speed and memory of lposs.propagation, side by side with the paper's per-class sparse CG.

The baseline is the original approach written plainly: exact kNN by a dense inner-product
matrix (numpy) and ``argpartition``, a ``scipy.sparse`` CSR matrix, ``W + W^T``, the
normalised Laplacian as a sparse matrix, and ``scipy.sparse.linalg.cg`` (``maxiter=10``)
one class column at a time. Both run on the same synthetic inputs, each case in a fresh
subprocess so that its peak memory can be read from the kernel (VmHWM).

    python benchmarks/bench_propagation.py [--device cpu|cuda] [--quick] [--repeats 3]

Prints a table and writes ``benchmarks/results/propagation.json``.
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

RESULTS = Path(__file__).resolve().parent / "results" / "propagation.json"
# name: (stage, size settings, which implementations run)
FULL_CASES = {
    "patch-voc": ("patch", {"height": 448, "width": 597, "dim": 768, "classes": 21, "k": 400},
                  ("ours", "baseline")),
    "pixel-voc": ("pixel", {"height": 448, "width": 597, "classes": 21, "r": 13},
                  ("ours", "baseline")),
    "patch-20k": ("patch", {"nodes": 20000, "dim": 768, "classes": 21, "k": 800}, ("ours",)),
    "pixel-1024x1536": ("pixel", {"height": 1024, "width": 1536, "classes": 21, "r": 13},
                        ("ours",)),
}
QUICK_CASES = {
    "patch-small": ("patch", {"height": 224, "width": 336, "dim": 768, "classes": 21,
                              "k": 400}, ("ours", "baseline")),
    "pixel-small": ("pixel", {"height": 224, "width": 298, "classes": 21, "r": 13},
                    ("ours", "baseline")),
}
SMOKE_CASES = {  # the smallest inputs on every code path (device_check.py --quick)
    "patch-smoke": ("patch", {"height": 112, "width": 112, "dim": 64, "classes": 5, "k": 50},
                    ("ours",)),
    "pixel-smoke": ("pixel", {"height": 48, "width": 64, "classes": 5, "r": 13}, ("ours",)),
}
TARGETS = {  # seconds, speed-up over the baseline, extra memory in MB (METHOD sizes only)
    "patch-voc": {"seconds": 0.3, "speedup": 4.0},
    "pixel-voc": {"seconds": 2.5, "speedup": 8.0, "memory_mb": 250},
    "patch-20k": {"memory_mb": 2048},
    "pixel-1024x1536": {"memory_mb": 2560},
}


# --------------------------------------------------------------------------- inputs


def window_starts(length: int, size: int = 224, stride: int = 112) -> list[int]:
    """METHOD.md's window grid along one side."""
    count = max(length - size + stride - 1, 0) // stride + 1
    return [max(min(i * stride + size, length) - size, 0) for i in range(count)]


def patch_inputs(settings: dict, seed: int = 0):
    """Clustered features (objects of a Voronoi partition), positions of the window grid."""
    g = torch.Generator().manual_seed(seed)
    if "nodes" in settings:
        n = settings["nodes"]
        positions = torch.rand(n, 2, generator=g) * torch.tensor([1024.0, 1536.0])
    else:
        centres = []
        for y1 in window_starts(settings["height"]):
            for x1 in window_starts(settings["width"]):
                rows, cols = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
                centres.append(torch.stack([y1 + 8 + 16 * rows, x1 + 8 + 16 * cols], -1))
        positions = torch.cat([c.reshape(-1, 2) for c in centres]).float()
    seeds = torch.rand(12, 2, generator=g) * positions.max(0).values
    objects = torch.cdist(positions, seeds).argmin(1)
    prototypes = torch.randn(12, settings["dim"], generator=g)
    features = prototypes[objects] + 1.5 * torch.randn(len(positions), settings["dim"],
                                                       generator=g)
    features = torch.nn.functional.normalize(features, dim=1)
    scores = torch.randn(len(positions), settings["classes"], generator=g) * 0.05 + 0.2
    return features, positions, scores


def pixel_inputs(settings: dict, seed: int = 0):
    """A piecewise-constant colour image with noise and blocky upsampled class scores."""
    g = torch.Generator().manual_seed(seed)
    h, w, c = settings["height"], settings["width"], settings["classes"]
    seeds = torch.rand(40, 2, generator=g) * torch.tensor([float(h), float(w)])
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    regions = torch.cdist(torch.stack([yy, xx], -1).reshape(-1, 2), seeds).argmin(1)
    colours = torch.rand(40, 3, generator=g)
    image = colours[regions].T.reshape(3, h, w)
    image = (image + 0.03 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    coarse = torch.rand(1, c, max(h // 16, 1), max(w // 16, 1), generator=g)
    scores = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                             align_corners=False)[0]
    return image, scores


# --------------------------------------------------------------------------- baseline


def baseline_patch(features, positions, scores, k, gamma=3.0, sigma=0.01, alpha=0.95):
    """The paper's approach: dense kNN, scipy CSR, per-class CG."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    z = features.numpy()
    p = positions.numpy()
    n = len(z)
    k = min(k, n)
    sims = z @ z.T
    np.fill_diagonal(sims, np.inf)  # the node itself in its own list
    neighbours = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.ravel()
    values = np.maximum(np.take_along_axis(sims, neighbours, 1).ravel(), 0) ** gamma
    values *= np.exp(-sigma * np.linalg.norm(p[rows] - p[cols], axis=1))
    values[rows == cols] = 0
    w = sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=(n, n))
    return _baseline_solve(w + w.T, scores.numpy(), alpha, sp, cg)


def baseline_pixel(image, scores, r, tau=0.01, alpha=0.95):
    """The pixel graph as one scipy CSR matrix over all r x r offsets, per-class CG."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    from lposs.propagation.color import rgb_to_lab

    lab = (rgb_to_lab(image) / torch.tensor([100.0, 128.0, 128.0])[:, None, None]).numpy()
    _, h, w = lab.shape
    index = np.arange(h * w).reshape(h, w)
    rows, cols, values = [], [], []
    half = r // 2
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            if (dy, dx) == (0, 0):
                continue
            ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
            yt, xt = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
            distance = np.linalg.norm(lab[:, ys, xs] - lab[:, yt, xt], axis=0)
            rows.append(index[ys, xs].ravel())
            cols.append(index[yt, xt].ravel())
            values.append(np.exp(-distance / tau).ravel().astype(np.float32))
    matrix = sp.csr_matrix((np.concatenate(values), (np.concatenate(rows),
                                                     np.concatenate(cols))), shape=(h * w,) * 2)
    del rows, cols, values
    y = scores.numpy().reshape(scores.shape[0], -1).T
    return _baseline_solve(matrix, y, alpha, sp, cg).T.reshape(scores.shape)


def _baseline_solve(w, y, alpha, sp, cg):
    w = w.tolil()
    w.setdiag(0)
    w = w.tocsr()
    degree = np.asarray(w.sum(1)).ravel()
    degree[degree == 0] = 1
    scale = sp.diags((1 / np.sqrt(degree)).astype(np.float32))
    laplacian = sp.identity(w.shape[0], dtype=np.float32, format="csr") - alpha * (
        scale @ w @ scale)
    out = np.zeros_like(y)
    for c in range(y.shape[1]):
        out[:, c], _ = cg(laplacian, y[:, c], rtol=1e-6, atol=0.0, maxiter=10)
    return out


# --------------------------------------------------------------------------- one case


def _memory_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(name: str, impl: str, device: str, repeats: int, output: Path,
            dtype: torch.dtype = torch.float32) -> dict:
    """Time one implementation on one case (in this process) and save its output.

    ``dtype`` is the dtype our implementation is given its features, image and scores in
    (patch positions stay float32); the baseline always runs in float32.
    """
    from lposs.propagation.patch_graph import patch_propagation
    from lposs.propagation.pixel_graph import pixel_propagation
    from lposs.propagation.stencil import stencil_backend, stencil_product

    stage, settings, _ = {**FULL_CASES, **QUICK_CASES, **SMOKE_CASES}[name]
    if stage == "patch":
        inputs = patch_inputs(settings)
        if impl == "ours":
            features, positions, scores = inputs
            args = [features.to(device, dtype), positions.to(device), scores.to(device, dtype)]
            def call():
                return patch_propagation(*args, k=settings["k"])
        else:
            def call():
                return baseline_patch(*inputs, k=settings["k"])
    else:
        inputs = pixel_inputs(settings)
        if impl == "ours":
            args = [t.to(device, dtype) for t in inputs]
            def call():
                return pixel_propagation(*args, r=settings["r"])
        else:
            def call():
                return baseline_pixel(*inputs, r=settings["r"])
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backend = stencil_backend(torch.device(device))
    tiny = torch.zeros(1, 8, device=device)  # load the compiled kernel: once per process
    stencil_product(tiny, tiny, [1], 1, 7)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    peak_ok = _memory_reset()
    rss_before = _memory_mb("VmRSS")
    sync()
    wall, cpu, peak_mb = [], [], None
    result = None
    for _ in range(repeats):
        result = None  # the previous output does not count against this run
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            result = call()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if peak_mb is None and peak_ok:  # memory: the first run in this fresh process
            peak_mb = _memory_mb("VmHWM") - rss_before
    result = result.cpu().numpy() if isinstance(result, torch.Tensor) else result
    np.save(output, result)
    report = {
        "case": name, "impl": impl, "device": device, "stencil_backend": backend,
        "seconds": min(wall), "seconds_median": float(np.median(wall)),
        "cpu_seconds": min(cpu), "peak_extra_mb": peak_mb,
    }
    if cuda:
        report["gpu_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return report


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device for our code (cpu)")
    parser.add_argument("--quick", action="store_true", help="small inputs, no scale cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (min)")
    parser.add_argument("--cases", nargs="*", help="run only these cases")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both implementations (torch's default)")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "IMPL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    if args.one:
        name, impl, out = args.one
        device = args.device if impl == "ours" else "cpu"
        print(json.dumps(run_one(name, impl, device, args.repeats, Path(out))))
        return

    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = {name: cases[name] for name in args.cases}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, impls) in cases.items():
            outputs = {}
            for impl in impls:
                out = Path(tmp) / f"{name}-{impl}.npy"
                repeats = args.repeats if impl == "ours" else 1
                command = [sys.executable, __file__, "--device", args.device, "--repeats",
                           str(repeats), "--one", name, impl, str(out)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    raise SystemExit(f"{name}/{impl} failed")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                outputs[impl] = np.load(out)
                print(f"  done {name} {impl}: {rows[-1]['seconds']:.3f} s", flush=True)
            if "baseline" in outputs:
                scale = max(float(np.abs(outputs["baseline"]).max()), 1e-12)
                difference = float(np.abs(outputs["ours"] - outputs["baseline"]).max()) / scale
                for row in rows[-2:]:
                    row["max_rel_difference"] = difference
    _print_and_save(rows, args)


def _print_and_save(rows: list[dict], args) -> None:
    by_case: dict[str, dict] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row
    header = (f"{'case':<18}{'ours s':>9}{'ours cpu':>10}{'baseline s':>12}{'speed-up':>10}"
              f"{'ours MB':>10}{'base MB':>10}{'max diff':>10}  target")
    print(header)
    print("-" * len(header))
    summary = []
    for name, impls in by_case.items():
        ours, base = impls["ours"], impls.get("baseline")
        speedup = base["seconds"] / ours["seconds"] if base else None
        entry = {"case": name, "ours": ours, "baseline": base, "speedup": speedup,
                 "target": TARGETS.get(name)}
        summary.append(entry)

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        memory = ours.get("gpu_peak_extra_mb", ours["peak_extra_mb"])
        print(f"{name:<18}{ours['seconds']:>9.3f}{ours['cpu_seconds']:>10.3f}"
              f"{fmt(base and base['seconds'], '>12.3f'):>12}{fmt(speedup, '>10.1f'):>10}"
              f"{fmt(memory, '>10.0f'):>10}{fmt(base and base['peak_extra_mb'], '>10.0f'):>10}"
              f"{fmt(ours.get('max_rel_difference'), '>10.1e'):>10}  "
              f"{json.dumps(TARGETS.get(name, {}))}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    RESULTS.write_text(json.dumps({
        "device": args.device, "quick": args.quick, "torch": torch.__version__,
        "note": "cpu_seconds is process CPU time; wall seconds are inflated on a shared machine",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "load_average": load,
        "cases": summary,
    }, indent=2))
    print(f"\nwrote {RESULTS} (load average {load})")


if __name__ == "__main__":
    main()
