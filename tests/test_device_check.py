"""benchmarks/device_check.py as CI runs it (``--device cpu --quick``), and its failures.

The quick run compares the CPU with itself: fp32 against fp32 must agree exactly, while
fp16 against fp32 must differ a little (the fp16 path really ran in half precision).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
STEPS = ["cuda_tests", "propagation", "encoders", "segment", "folder"]
QUICK_PROPAGATION_CASES = ["patch-smoke", "pixel-smoke"]  # bench_propagation's SMOKE_CASES


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    done = _run("--device", "cpu", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "device_check.json").read_text()), out, done


def test_every_step_ran_or_says_why_not(quick_run):
    report, _, done = quick_run
    assert list(report["steps"]) == STEPS
    steps = report["steps"]
    if not torch.cuda.is_available():
        assert steps["cuda_tests"]["status"] == "skipped"
        assert steps["cuda_tests"]["reason"] == "no CUDA"
        counts = steps["cuda_tests"]["counts"]
        assert counts["skipped"] > 0 and not counts.get("failed")  # collected, then skipped
    for name in STEPS[1:]:
        assert steps[name]["status"] == "ok", steps[name]
        assert all(part["status"] == "ok" for part in steps[name]["parts"].values())
        assert 0 < steps[name]["seconds"] <= steps[name]["budget_s"]
    assert report["complete"] is True and report["exit_status"] == 0
    assert "Traceback" not in done.stderr


def test_cpu_against_itself_agrees_and_fp16_differs(quick_run):
    report, _, _ = quick_run
    checks = {(c["check"], c["precision"]): c for c in report["checks"]}
    for case in QUICK_PROPAGATION_CASES:
        for precision, tolerance in (("fp32", 1e-4), ("fp16", 2e-3)):
            check = checks[(f"propagation {case}", precision)]
            assert check["tolerance"] == tolerance
            assert check["max_rel_error"] == 0.0 and check["pass"] is True  # same inputs, CPU
    for encoder in ("clip_maskclip", "dino_values"):
        assert checks[(f"encoder features {encoder}", "fp32")]["max_rel_error"] == 0.0
        fp16 = checks[(f"encoder features {encoder}", "fp16")]["max_rel_error"]
        assert 0.0 < fp16 < 0.05, fp16  # half-precision weights: close, not equal
    own = checks[("segment labels, own encoding", "fp32")]
    assert own["max_rel_error"] == 0.0 and own["share_equal_labels"] == 1.0
    own16 = checks[("segment labels, own encoding", "fp16")]
    assert own16["max_rel_error"] > 0.0 and 0.0 <= own16["share_equal_labels"] <= 1.0
    for stage in ("patch", "patch+pixel"):
        check = checks[(f"segment {stage} propagation, the CPU's encoded image", "fp32")]
        assert check["pass"] is True and check["share_equal_labels"] == 1.0
    together = checks[("folder labels, images encoded together vs alone", "fp32")]
    assert together["share_equal_labels"] >= 0.99  # batched matmuls may round near-ties apart
    assert report["checks_failed"] == 0 and len(report["checks"]) == 13


def test_timings_per_stage_and_case(quick_run):
    report, _, _ = quick_run
    segment = report["steps"]["segment"]["parts"]
    for part in ("cpu/fp32", "device/fp32", "device/fp16"):
        medians = segment[part]["median_s"]
        assert medians["set_image"] > 0 and medians["predict"] > 0
        assert len(segment[part]["runs"]) == report["repeats"] == 1
    assert segment["cpu/fp32"]["working_size"] == [112, 149]  # 84 x 112 at short side 112
    assert "predict_new_vocabulary.user_3_classes" in segment["device/fp16"]["median_s"]
    propagation = report["steps"]["propagation"]["parts"]
    assert set(propagation) == {f"{case}/{p}" for case in QUICK_PROPAGATION_CASES
                                for p in ("fp32", "fp16")}
    for part in propagation.values():
        assert part["cpu"]["device"] == "cpu" and part["device"]["seconds"] > 0
    encoders = report["steps"]["encoders"]["parts"]
    for precision in ("fp32", "fp16"):
        rows = encoders[f"device/{precision}"]["encoders"]
        assert set(rows) == {"clip_maskclip", "dino_values"}
        assert all(row["median_s"] > 0 and row["gflop"] > 0 for row in rows.values())
    folder = report["steps"]["folder"]["parts"]
    assert [(p["encode_together"], p["images"]) for k, p in folder.items()
            if k.startswith("device")] == [(1, 4), (4, 4)]
    assert all(p["images_per_min"] > 0 for k, p in folder.items() if k.startswith("device"))


def test_hardware_record(quick_run):
    report, _, _ = quick_run
    hardware = report["hardware"]
    date = datetime.datetime.fromisoformat(hardware["date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 3600
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert hardware["git_commit"] == head
    assert hardware["versions"]["torch"] == torch.__version__
    assert hardware["torch_cuda"] == torch.version.cuda
    assert hardware["cpu_count"] == os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "model name" in fields:
            assert hardware["cpu_model"] == fields["model name"]
        if "flags" in fields:
            assert hardware["cpu_flags"]["avx2"] == ("avx2" in fields["flags"].split())
    assert hardware["gpu"] is None and hardware["device"] == "cpu"


def test_markdown_lists_steps_and_checks(quick_run):
    report, out, done = quick_run
    markdown = (out / "device_check.md").read_text()
    for name in STEPS:
        assert f"| {name} | {report['steps'][name]['status']} |" in markdown
    assert markdown.count("| propagation p") == 4  # one row per case and input precision
    assert "| set_image |" in markdown and "| predict |" in markdown
    assert str(out / "device_check.json") in done.stdout


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="a GPU is here"), id="gpu"),
    pytest.param("bogus", id="unknown"),
])
def test_absent_device_is_one_line_error(tmp_path, device):
    done = _run("--device", device, "--quick", "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check: error: device "), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_budget_spent_skips_every_step(tmp_path):
    done = _run("--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path),
                timeout=120)
    assert done.returncode == 1
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert [s["status"] for s in report["steps"].values()] == ["skipped"] * 5
    assert all("--budget-s" in s["reason"] for s in report["steps"].values())
    assert report["complete"] is False and report["checks"] == []
    assert (tmp_path / "device_check.md").is_file()


def test_failing_step_is_recorded_and_the_next_still_runs(tmp_path):
    # The meta device holds no data: every device computation fails for real (the CPU
    # references before it succeed), so each step must record its errors and go on.
    done = _run("--device", "meta", "--quick", "--steps", "propagation", "encoders",
                "--out", str(tmp_path))
    assert done.returncode == 1
    steps = json.loads((tmp_path / "device_check.json").read_text())["steps"]
    assert steps["cuda_tests"] == {"status": "skipped", "reason": "not in --steps"}
    assert steps["segment"] == {"status": "skipped", "reason": "not in --steps"}
    assert steps["folder"] == {"status": "skipped", "reason": "not in --steps"}
    for name in ("propagation", "encoders"):
        assert steps[name]["status"] == "error"
        assert steps[name]["error"] and "\n" not in steps[name]["error"]
    assert all(p["status"] == "error" and p["traceback"]
               for p in steps["propagation"]["parts"].values())
    encoders = steps["encoders"]["parts"]  # ran after the failed step: its CPU part worked
    assert encoders["cpu/fp32"]["status"] == "ok"
    assert encoders["device/fp32"]["status"] == encoders["device/fp16"]["status"] == "error"
    assert "Traceback" not in done.stdout + done.stderr
