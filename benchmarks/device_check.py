"""One run that checks lposs on a GPU: the CUDA tests, the benchmarks, CUDA against CPU.

The device run (one GPU, at most 8 minutes; writes ``device_check.json`` and
``device_check.md`` into ``--out``):

    PYTHONPATH=src python benchmarks/device_check.py --device cuda --out $OUT

On CPU, as CI runs it (small images, small model configs, one repeat; cpu against cpu):

    PYTHONPATH=src python benchmarks/device_check.py --device cpu --quick

Steps, each in its own subprocess with its own time budget, so that a hung kernel or a
broken CUDA context stops that step only and what it finished before is kept:

1. ``cuda_tests``: ``pytest -k cuda`` (the tests parametrised over CUDA).
2. ``propagation``: bench_propagation's cases on the CPU and on the device, with float32
   and then float16 inputs (the same inputs on both); outputs compared relative to their
   largest value (float32: 1e-4; float16: 2e-3, two float16 steps).
3. ``encoders``: bench_encoders' timings on the device in fp32 and fp16, and the dense
   features compared with the CPU fp32 features of the same windows.
4. ``segment``: bench_segment's per-stage timings (a warm-up, then the median of
   ``--repeats``) on the CPU in fp32 and on the device in fp32 and fp16, with the same
   random-weight ViT-B/16 models (seed 0) and image: the share of labels equal to the
   CPU's; then the CPU's encoded image predicted on the device, patch stage alone and
   LPOSS+, its scores to 1e-4.
5. ``folder``: images per minute of ``batch.segment_files`` over 16 VOC-size images on
   the device, one image's windows per encoder pass and then 4 images' together (the
   CUDA default), with the share of equal labels between the two runs.

After ``--budget-s`` seconds the steps left are recorded as skipped; ``--steps`` runs
only some of them (e.g. again, with the device time left). Exit status: 0 when
every step ran and every check with a tolerance passed, 1 otherwise (the report is
written either way), 2 for a device that is not there (one line on stderr).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from device_check_report import hardware, write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "device_check"
STEP_BUDGETS_S = {"cuda_tests": 150, "propagation": 90, "encoders": 60, "segment": 150,
                  "folder": 60}
NOT_SELECTED = "not in --steps"
MIN_STEP_S = 10  # a step is not started with less time than this left before the deadline
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-3}  # propagation outputs, relative to the largest
SEED = 0
# --quick: the real architectures narrowed (as in tests/conftest.py), a small image.
QUICK_CLIP_KWARGS = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
QUICK_DINO_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
QUICK_TEMPLATES = 4  # prompt templates per class name (80 in the library)
QUICK_WINDOW, QUICK_WINDOWS = 112, 2  # encoder windows (bench_encoders: 15 of 224 x 224)
QUICK_R = 5  # pixel neighbourhood (13 in the paper)
QUICK_IMAGE_HW = (84, 112)  # -> 112 x 149 working size: 2 windows of 112, stride 56
FULL_IMAGE_HW = (375, 500)  # a VOC-size image, as in bench_segment
FOLDER_IMAGES = 16  # the folder step's images (4 with --quick)


# --------------------------------------------------------------------------- helpers


def relative_error(result, reference) -> float:
    """``max |result - reference| / max |reference|``, computed in float64 on the CPU."""
    result = torch.as_tensor(result).detach().cpu().double()
    reference = torch.as_tensor(reference).detach().cpu().double()
    scale = max(float(reference.abs().max()), 1e-12)
    return float((result - reference).abs().max()) / scale


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {_one_line(err)}"


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _to_device(encoder, device: torch.device, precision: str):
    """A copy of a CPU fp32 encoder on ``device``, its model cast as ``load_*`` casts it,
    with an empty text cache (the device encodes its own text)."""
    memo = {}  # deepcopy's memo: originals here are replaced by the value, not copied
    if hasattr(encoder, "tokenizer"):
        memo = {id(encoder.tokenizer): encoder.tokenizer, id(encoder.text_cache): {}}
    moved = copy.deepcopy(encoder, memo).to(device)
    moved.model.to(PRECISIONS[precision])
    return moved


def build_models(quick: bool):
    """The random-weight OpenCLIP ViT-B-16 and DINO ViT-B/16 (narrowed with ``quick``),
    on the CPU in fp32, from seed 0: the same weights in every step."""
    from lposs.encoders import load_clip, load_dino

    torch.manual_seed(SEED)
    clip = load_clip("ViT-B-16", pretrained=None,
                     **(copy.deepcopy(QUICK_CLIP_KWARGS) if quick else {}))
    dino = load_dino("dino_vitb16", pretrained=False, **(QUICK_DINO_KWARGS if quick else {}))
    if quick:
        clip.templates = clip.templates[:QUICK_TEMPLATES]
    return clip, dino


class StepContext:
    """What a step runs with, and its record: parts (each guarded) and checks, written
    to ``out`` after every part so that a step killed at its budget keeps what it did."""

    def __init__(self, device: torch.device, quick: bool, repeats: int, deadline: float,
                 out: Path):
        self.device, self.quick, self.repeats = device, quick, repeats
        self.deadline, self.out = deadline, out
        self.record: dict = {"parts": {}, "checks": []}

    def part(self, name: str, run) -> None:
        """Run ``run()`` (returning a JSON-able dict) unless the step's time is spent; an
        exception is recorded as this part's error and the step goes on."""
        if time.time() > self.deadline:
            entry = {"status": "skipped", "reason": "the step's budget is spent"}
        else:
            start = time.perf_counter()
            try:
                entry = {"status": "ok", **run()}
            except Exception as err:  # recorded: one failing part must not stop the others
                lines = traceback.format_exception(err, limit=-6)
                entry = {"status": "error", "error": _error_line(err), "traceback": [
                    line for line in "".join(lines).splitlines() if line.strip(" ^~")]}
            entry["seconds"] = time.perf_counter() - start
        self.record["parts"][name] = entry
        self.save()

    def check(self, name: str, precision: str, *, max_rel_error: float | None = None,
              share_equal_labels: float | None = None, tolerance: float | None = None) -> None:
        """Record a device-against-CPU comparison; ``pass`` is None without a tolerance."""
        passed = None if tolerance is None else bool(max_rel_error <= tolerance)
        self.record["checks"].append({
            "check": name, "precision": precision, "max_rel_error": max_rel_error,
            "share_equal_labels": share_equal_labels, "tolerance": tolerance, "pass": passed})

    def save(self) -> None:
        self.out.write_text(json.dumps(self.record, indent=1))


# --------------------------------------------------------------------------- steps


def step_propagation(ctx: StepContext) -> None:
    """bench_propagation's cases, ours only, on the CPU and on the device, fp32 and fp16."""
    import bench_propagation as bench

    cases = bench.SMOKE_CASES if ctx.quick else bench.FULL_CASES
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            for precision, dtype in PRECISIONS.items():
                def run(name=name, precision=precision, dtype=dtype):
                    rows, outputs = {}, {}
                    for where, device, repeats in (("cpu", "cpu", 1),
                                                   ("device", str(ctx.device), ctx.repeats)):
                        path = Path(tmp) / f"{name}-{precision}-{where}.npy"
                        rows[where] = bench.run_one(name, "ours", device, repeats, path,
                                                    dtype=dtype)
                        outputs[where] = np.load(path)
                    error = relative_error(outputs["device"], outputs["cpu"])
                    ctx.check(f"propagation {name}", precision, max_rel_error=error,
                              tolerance=TOLERANCES[precision])
                    return {"cpu": rows["cpu"], "device": rows["device"],
                            "max_rel_error": error}
                ctx.part(f"{name}/{precision}", run)


def step_encoders(ctx: StepContext) -> None:
    """Encoder timings on the device; features against the CPU fp32 ones, same windows."""
    import bench_encoders as bench

    clip, dino = build_models(ctx.quick)
    encoders = {"clip_maskclip": clip, "dino_values": dino}
    count, size = (QUICK_WINDOWS, QUICK_WINDOW) if ctx.quick else (bench.N_WINDOWS, bench.WINDOW)
    generator = torch.Generator().manual_seed(SEED)
    windows = torch.rand(count, 3, size, size, generator=generator)
    reference = {}

    def cpu_reference():
        for label, encoder in encoders.items():
            reference[label] = encoder.dense_features(windows)
        return {"windows": count, "window_size": size}

    ctx.part("cpu/fp32", cpu_reference)
    for precision in PRECISIONS:
        def run(precision=precision):
            moved = {label: _to_device(e, ctx.device, precision) for label, e in encoders.items()}
            on_device = windows.to(ctx.device)
            rows = bench.time_encoders(moved, on_device, ctx.device, batch_size=16,
                                       repeats=ctx.repeats)
            for label, encoder in moved.items():
                error = relative_error(encoder.dense_features(on_device), reference[label])
                rows[label]["windows_per_s"] = count / rows[label]["median_s"]
                rows[label]["max_rel_error"] = error
                ctx.check(f"encoder features {label}", precision, max_rel_error=error)
            gemm = bench.gemm_gflops(ctx.device, PRECISIONS[precision],
                                     **({"tokens": 8} if ctx.quick else {}))
            return {"encoders": rows, "reference_gemm_gflops_per_s": gemm}
        ctx.part(f"device/{precision}", run)


def step_segment(ctx: StepContext) -> None:
    """Per-stage timings and labels of the CPU (fp32) and the device (fp32, fp16)."""
    import bench_segment as bench
    from PIL import Image

    from lposs.config import LPOSSConfig
    from lposs.evaluation.datasets import benchmark_classes
    from lposs.pipeline.segmenter import Segmenter

    clip, dino = build_models(ctx.quick)
    config = LPOSSConfig()
    if ctx.quick:
        config = config.replace(short_side=QUICK_WINDOW, r=QUICK_R,
                                windows=((QUICK_WINDOW, QUICK_WINDOW // 2),))
    classes = bench.USER_CLASSES if ctx.quick else benchmark_classes("voc")
    vocabularies = {"user_3_classes": bench.USER_CLASSES}
    if not ctx.quick:
        vocabularies["voc_21_classes"] = classes
    reference = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.jpg"
        rng = np.random.default_rng(SEED)
        Image.fromarray(rng.integers(0, 255, (*(QUICK_IMAGE_HW if ctx.quick else FULL_IMAGE_HW),
                                              3), dtype=np.uint8)).save(path)

        def cpu_run():
            segmenter = Segmenter(clip, dino, config)
            runs, result, encoded = bench.time_stages(segmenter, path, classes, ctx.repeats, tmp)
            reference.update(result=result, encoded=encoded)
            return {"median_s": _medians(runs), "runs": runs,
                    "working_size": list(encoded.working.shape[-2:])}

        ctx.part("cpu/fp32", cpu_run)
        for precision in PRECISIONS:
            def device_run(precision=precision):
                segmenter = Segmenter(_to_device(clip, ctx.device, precision),
                                      _to_device(dino, ctx.device, precision), config)
                runs, result, _ = bench.time_stages(segmenter, path, classes, ctx.repeats, tmp)
                new_vocabularies = bench.time_new_vocabularies(segmenter, vocabularies)
                share = float((result.labels == reference["result"].labels).double().mean())
                error = relative_error(result.scores.full(), reference["result"].scores.full())
                ctx.check("segment labels, own encoding", precision, max_rel_error=error,
                          share_equal_labels=share)
                return {"median_s": {**_medians(runs), **new_vocabularies}, "runs": runs,
                        "share_equal_labels": share, "scores_max_rel_error": error}
            ctx.part(f"device/{precision}", device_run)

        def same_encoded_image():
            clip_device = _to_device(clip, ctx.device, "fp32")
            dino_device = _to_device(dino, ctx.device, "fp32")
            stages = {}
            for stage, cfg in (("patch", config.replace(pixel_stage=False)),
                               ("patch+pixel", config)):
                results = []
                for encoders in ((clip, dino), (clip_device, dino_device)):
                    segmenter = Segmenter(*encoders, cfg)
                    segmenter.set_encoded(reference["encoded"])
                    results.append(segmenter.predict(classes))
                error = relative_error(results[1].scores.full(), results[0].scores.full())
                share = float((results[1].labels == results[0].labels).double().mean())
                ctx.check(f"segment {stage} propagation, the CPU's encoded image", "fp32",
                          max_rel_error=error, share_equal_labels=share,
                          tolerance=TOLERANCES["fp32"])
                stages[stage] = {"scores_max_rel_error": error, "share_equal_labels": share}
            return {"stages": stages}

        ctx.part("device/fp32/same_encoded_image", same_encoded_image)


def step_folder(ctx: StepContext) -> None:
    """Images per minute of ``batch.segment_files`` on the device in fp32: each image's
    windows in their own encoder passes, then ``IMAGES_PER_PASS_CUDA`` images' windows
    together (the CUDA default); the label maps of the two runs compared."""
    import bench_segment as bench
    from PIL import Image

    from lposs.config import LPOSSConfig
    from lposs.pipeline.batch import IMAGES_PER_PASS_CUDA, segment_files
    from lposs.pipeline.segmenter import Segmenter

    clip, dino = build_models(ctx.quick)
    config = LPOSSConfig()
    if ctx.quick:
        config = config.replace(short_side=QUICK_WINDOW, r=QUICK_R,
                                windows=((QUICK_WINDOW, QUICK_WINDOW // 2),))
    count, size = (4, QUICK_IMAGE_HW) if ctx.quick else (FOLDER_IMAGES, FULL_IMAGE_HW)
    segmenter = Segmenter(_to_device(clip, ctx.device, "fp32"),
                          _to_device(dino, ctx.device, "fp32"), config)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(SEED)
        paths = []
        for i in range(count):
            paths.append(Path(tmp) / f"photo{i:02d}.jpg")
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
        list(segment_files(segmenter, paths[:1], bench.USER_CLASSES, Path(tmp) / "warm-up"))
        for together in sorted({1, IMAGES_PER_PASS_CUDA}):
            def run(together=together):
                start = time.perf_counter()
                outcomes = list(segment_files(segmenter, paths, bench.USER_CLASSES,
                                              Path(tmp) / f"together{together}",
                                              encode_together=together, read_ahead=together))
                seconds = time.perf_counter() - start
                failed = [f"{o.path.name}: {o.error}" for o in outcomes if o.error is not None]
                if failed:
                    raise RuntimeError(f"{len(failed)} image(s) failed, first {failed[0]}")
                return {"images": count, "encode_together": together, "seconds": seconds,
                        "images_per_min": 60 * count / seconds}
            ctx.part(f"device/fp32/together_{together}", run)

        def compare():
            shares = [float((np.array(Image.open(Path(tmp) / "together1" / f"{p.stem}.png"))
                             == np.array(Image.open(Path(tmp) / f"together{IMAGES_PER_PASS_CUDA}"
                                                    / f"{p.stem}.png"))).mean())
                      for p in paths]
            share = float(np.mean(shares))
            ctx.check("folder labels, images encoded together vs alone", "fp32",
                      share_equal_labels=share)
            return {"share_equal_labels": share}
        ctx.part("compare", compare)


STEP_FUNCTIONS = {"propagation": step_propagation, "encoders": step_encoders,
                  "segment": step_segment, "folder": step_folder}


# --------------------------------------------------------------------------- the driver


def _spawn(command: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run a command in its own process group; kill the group at ``timeout`` (rc None)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def cuda_tests(timeout: float) -> dict:
    """``pytest -k cuda`` in a subprocess: counts, failing tests, and the output's tail."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
               "cuda and not device_check", "tests"]
    rc, stdout, stderr = _spawn(command, timeout)
    lines = (stdout + stderr).strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r" in [\d.]+s", line)), "")
    counts = {word.rstrip("s") if word == "errors" else word: int(number) for number, word in
              re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                         summary)}
    record = {"command": " ".join(command[1:]), "returncode": rc, "counts": counts,
              "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
              "output_tail": lines[-15:]}
    if rc is None:
        return {"status": "timeout", "error": f"ran past its {timeout:.0f} s budget", **record}
    if counts.get("failed") or counts.get("error") or rc not in (0, 5):
        return {"status": "failed", "error": summary or _one_line(stderr), **record}
    if not torch.cuda.is_available():  # tests that need no GPU may have passed
        return {"status": "skipped", "reason": "no CUDA", **record}
    if rc == 5 or not counts.get("passed"):
        return {"status": "error", "error": "no CUDA test ran: " + summary, **record}
    return {"status": "ok", **record}


def run_step(name: str, args, deadline: float) -> dict:
    """One step in a subprocess under min(its budget, the time left); its record."""
    left = deadline - time.time()
    if left < MIN_STEP_S:
        return {"status": "skipped", "reason": f"--budget-s spent ({max(left, 0):.0f} s left)"}
    timeout = min(STEP_BUDGETS_S[name], left)
    start, start_cpu = time.perf_counter(), _children_cpu_s()
    if name == "cuda_tests":
        record = cuda_tests(timeout)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.json"
            margin = min(15.0, timeout / 10)  # parts are not started this close to the kill
            command = [sys.executable, __file__, "--device", args.device, "--repeats",
                       str(args.repeats), "--step", name, "--step-out", str(out),
                       "--step-deadline", str(time.time() + timeout - margin)]
            rc, _, stderr = _spawn(command + (["--quick"] if args.quick else []), timeout)
            record = json.loads(out.read_text()) if out.is_file() else {}
        parts = record.get("parts", {})
        errors = [f"{part}: {p['error']}" for part, p in parts.items() if p["status"] == "error"]
        if rc is None:
            record.update(status="timeout", error=f"ran past its {timeout:.0f} s budget")
        elif rc != 0:
            tail = stderr.strip().splitlines()
            record.update(status="error", error=tail[-1] if tail else f"exit status {rc}",
                          stderr_tail=tail[-20:])
        elif errors:
            record.update(status="error", error=errors[0])
        elif any(p["status"] == "skipped" for p in parts.values()):
            record.update(status="incomplete", reason="the step's budget ran out")
        else:
            record["status"] = "ok"
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = _children_cpu_s() - start_cpu  # CPU time of its processes
    record["budget_s"] = timeout
    return record


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_device(name: str) -> torch.device:
    """The torch device ``name``, or ``ValueError`` with one line when it is not here."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {name!r} is not available on this machine "
                         f"({_one_line(err)})") from None
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device to check (cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="small images and model configs, for CPU and CI")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (3; 1 with --quick)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="global deadline in seconds; steps left after it are skipped")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--steps", nargs="+", choices=list(STEP_BUDGETS_S),
                        default=list(STEP_BUDGETS_S), help="run only these steps (all)")
    parser.add_argument("--step", choices=sorted(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step-deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    try:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        device = check_device(args.device)
        if not args.step:
            args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as err:
        print(f"device_check: error: {err}", file=sys.stderr)
        return 2
    if args.step:  # one step, in the subprocess the driver started
        ctx = StepContext(device, args.quick, args.repeats, args.step_deadline, args.step_out)
        ctx.save()
        STEP_FUNCTIONS[args.step](ctx)
        return 0

    started = time.time()
    deadline = started + args.budget_s
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "device": str(device), "quick": args.quick, "repeats": args.repeats,
              "budget_s": args.budget_s, "hardware": hardware(device), "steps": {}}
    for name in STEP_BUDGETS_S:
        print(f"device_check: {name} ...", flush=True)
        if name in args.steps:
            record = run_step(name, args, deadline)
        else:
            record = {"status": "skipped", "reason": NOT_SELECTED}
        report["steps"][name] = record
        print(f"device_check: {name}: {record['status']} ({record.get('seconds', 0):.1f} s)"
              + (f" {record.get('error') or record.get('reason')}"
                 if record["status"] != "ok" else ""), flush=True)
        report["seconds"] = time.time() - started
        write_report(report, args.out)
    checks = [c for step in report["steps"].values() for c in step.get("checks", [])]
    complete = all(step["status"] == "ok" or step.get("reason") in ("no CUDA", NOT_SELECTED)
                   for step in report["steps"].values())
    failed = [c for c in checks if c["pass"] is False]
    report.update(checks=checks, complete=complete, checks_failed=len(failed),
                  exit_status=0 if complete and not failed else 1)
    json_path, md_path = write_report(report, args.out)
    print(f"device_check: {len(checks) - len(failed)} of {len(checks)} checks passed or "
          f"reported, {len(failed)} failed; steps complete: {complete}")
    print(f"device_check: wrote {json_path} and {md_path}")
    return report["exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
