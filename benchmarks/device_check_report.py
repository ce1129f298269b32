"""The record of a device check: the hardware it ran on, and its JSON and markdown files.

Used by ``device_check.py``; see there.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "sve", "asimd")


def hardware(device: torch.device) -> dict:
    """The GPU, the CPU (model and the vector/matrix flags that decide its speed), the
    library versions, the date and the git commit."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^(model name|Model|Hardware)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^(flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags.group(2).split()) if flags else set()
    versions = {}
    for package in ("torch", "numba", "open_clip_torch", "timm", "numpy"):
        try:
            versions[package] = torch.__version__ if package == "torch" else (
                metadata.version(package))
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_model": model.group(2).strip() if model else platform.processor() or None,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "device": str(device), "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": props.total_memory / 2**30,
                         "count": torch.cuda.device_count(), "driver": _nvidia_driver()}
    return record


def _git(*command: str) -> str | None:
    try:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True,
                              timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or a copy of the tree without .git
    return done.stdout.strip()


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """``out/device_check.json`` (everything) and ``out/device_check.md`` (tables)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "device_check.json", out / "device_check.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text("\n".join(_markdown(report)) + "\n")
    return json_path, md_path


def _markdown(report: dict) -> list[str]:
    def num(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    def table(header, rows):
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]

    hw, steps = report["hardware"], report["steps"]
    gpu = hw["gpu"] or {}
    flags = ", ".join(flag for flag, present in hw["cpu_flags"].items() if present) or "-"
    lines = ["# lposs device check", "",
             f"- device: {report['device']}" + (
                 f" {gpu['name']} (capability {gpu['capability']}, "
                 f"{gpu['memory_gib']:.0f} GiB, driver {gpu['driver']})" if gpu else "")
             + f"; torch {hw['versions']['torch']}, CUDA "
             f"{hw['torch_cuda']}, cuDNN {hw['cudnn']}, TF32 {hw['tf32']}",
             f"- CPU: {hw['cpu_model']}, {hw['cpus_usable']} usable cores; flags: {flags}",
             f"- {hw['date']}, commit {hw['git_commit']}{' (dirty)' if hw['git_dirty'] else ''}"
             f"; `{report['command']}`; {num(report.get('seconds'), '.0f')} s"
             f" of {report['budget_s']:.0f}", "", "## Steps", ""]
    lines += table(["step", "status", "seconds", "budget s", "note"], [
        [name, s["status"], num(s.get("seconds"), ".1f"), num(s.get("budget_s"), ".0f"),
         (s.get("error") or s.get("reason") or "").replace("|", "/")]
        for name, s in steps.items()])
    checks = [c for s in steps.values() for c in s.get("checks", [])]
    lines += ["## Device against CPU, same inputs", ""] + (["(none ran)", ""] if not checks
                                                           else []) + table(
        ["check", "precision", "max rel. error", "labels equal", "tolerance", "pass"],
        [[c["check"], c["precision"], num(c["max_rel_error"], ".1e"),
          num(c["share_equal_labels"], ".4f"), num(c["tolerance"], ".0e"),
          {True: "yes", False: "**no**", None: "(reported)"}[c["pass"]]] for c in checks])
    parts = steps.get("segment", {}).get("parts", {})
    columns = [key for key in ("cpu/fp32", "device/fp32", "device/fp16")
               if parts.get(key, {}).get("median_s")]
    if columns:
        stages = dict.fromkeys(k for key in columns for k in parts[key]["median_s"])
        lines += ["## Segment: median seconds per stage", ""] + table(
            ["stage", *columns], [[stage, *(num(parts[key]["median_s"].get(stage))
                                            for key in columns)] for stage in stages])
    rows = []
    for part, p in steps.get("propagation", {}).get("parts", {}).items():
        if p["status"] == "ok":
            cpu, dev = p["cpu"], p["device"]
            rows.append([part, num(cpu["seconds"]), num(dev["seconds"]),
                         num(cpu["seconds"] / dev["seconds"], ".1f"),
                         num(dev.get("gpu_peak_extra_mb"), ".0f")])
    if rows:
        lines += ["## Propagation (ours; min of the runs)", ""] + table(
            ["case/inputs", "cpu s", "device s", "speed-up", "GPU peak extra MB"], rows)
    rows = [[label, part.split("/")[-1], num(r["median_s"]), num(r["windows_per_s"], ".1f"),
             num(r["gflops_per_s"], ".0f"), num(p["reference_gemm_gflops_per_s"], ".0f")]
            for part, p in steps.get("encoders", {}).get("parts", {}).items()
            if p["status"] == "ok" and "encoders" in p for label, r in p["encoders"].items()]
    if rows:
        lines += ["## Encoders on the device", ""] + table(
            ["encoder", "precision", "median s", "windows/s", "GFLOP/s", "GEMM GFLOP/s"], rows)
    rows = [[p["encode_together"], p["images"], num(p["seconds"], ".1f"),
             num(p["images_per_min"], ".1f")]
            for part, p in steps.get("folder", {}).get("parts", {}).items()
            if p["status"] == "ok" and "images_per_min" in p]
    if rows:
        lines += ["## Folder: batch.segment_files on the device, fp32", ""] + table(
            ["images per encoder pass", "images", "seconds", "images/min"], rows)
    return lines
