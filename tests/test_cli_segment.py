"""``lposs segment`` over several files: the status line on a terminal (and nowhere else),
Ctrl-C, and torchrun sharding the files with the outputs of one process."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lposs
from lposs.cli import main
from lposs.cli.progress import StatusLine


@pytest.fixture(scope="module")
def model_args(tiny_model_files):
    clip_dir, dino_file = tiny_model_files
    return ["--clip-model", f"local-dir:{clip_dir}", "--dino-model", "vit_tiny_patch16_224",
            "--dino-weights", str(dino_file), "--k", "30"]


def _photos(folder, count):
    """``count`` small noisy two-colour pictures in ``folder`` (a.png, b.png, ...)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        rgb = np.zeros((40 + 10 * i, 60, 3), np.int64)
        rgb[:, :30] = (220, 30, 30)
        rgb[:, 30:] = (20, 200, 40)
        rgb = np.clip(rgb + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{'abcdefgh'[i]}.png")
    return folder


class _Terminal:
    """A pseudo-terminal standing in for stderr; collects what is drawn on it and can
    press Ctrl-C (SIGINT to this process) once ``text`` has appeared."""

    def __init__(self, ctrl_c_after: str | None = None):
        self.master, slave = os.openpty()
        self.stream = os.fdopen(slave, "w", buffering=1)
        self.output, self.ctrl_c_after, self.pressed = "", ctrl_c_after, False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the slave side closed
                return
            if not chunk:
                return
            self.output += chunk.decode(errors="replace")
            if self.ctrl_c_after and not self.pressed and self.ctrl_c_after in self.output:
                self.pressed = True
                os.kill(os.getpid(), signal.SIGINT)

    def close(self) -> str:
        self.stream.close()
        self._reader.join(timeout=10)
        os.close(self.master)
        return self.output


def test_status_line_draws_only_on_a_terminal(tmp_path, monkeypatch):
    terminal = _Terminal()
    StatusLine(terminal.stream, ["x.png"])("images", 0, 1)
    with open(tmp_path / "log", "w") as log:  # a file, as when stderr is redirected
        StatusLine(log, ["x.png"])("images", 0, 1)
        StatusLine(log, ["x.png"], enabled=True)("encoding windows", 3, 8)
    assert "[1/1] x.png" in terminal.close()
    assert (tmp_path / "log").read_bytes() == b"\r\x1b[Kencoding windows 3/8"


def test_stages_on_a_terminal_and_ctrl_c_reports_how_many_are_done(tmp_path, model_args,
                                                                   monkeypatch, capsys):
    folder = _photos(tmp_path / "in", 4)
    out = tmp_path / "out"
    terminal = _Terminal(ctrl_c_after="[2/4] b.png")
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    try:
        code = main(["segment", str(folder), "--classes", "red,green", "--out", str(out),
                     "--r", "5", *model_args])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command")
    shown = terminal.close()
    assert terminal.pressed and code == 130, shown
    for stage in ("loading models", "[1/4] a.png", "encoding windows", "building graphs",
                  "propagating over pixels"):
        assert stage in shown
    done = re.search(r"lposs: error: interrupted: (\d) of 4 image\(s\) done", shown)
    assert done and "Traceback" not in shown, shown
    written = sorted(p.name for p in out.iterdir())
    stems = "ab"[: int(done.group(1))]  # the first images, each with all its files
    assert written == sorted(f"{s}{suffix}" for s in stems
                             for suffix in (".png", "_overlay.png", ".json"))
    assert "segmented" not in capsys.readouterr().out


def test_quiet_and_redirected_stderr_show_no_progress(tmp_path, model_args, monkeypatch,
                                                      capsys):
    folder = _photos(tmp_path / "in", 2)
    code = main(["segment", str(folder), "--classes", "red,green", "--out", str(tmp_path / "o1"),
                 "--no-refine", *model_args])  # stderr captured: not a terminal
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "" and "segmented 2 of 2" in captured.out
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    code = main(["segment", str(folder), "--classes", "red,green", "--out", str(tmp_path / "o2"),
                 "--no-refine", "--quiet", *model_args])
    assert code == 0 and terminal.close() == "" and capsys.readouterr().out == ""
    assert (tmp_path / "o1" / "b.png").read_bytes() == (tmp_path / "o2" / "b.png").read_bytes()


def _without_timings(path):
    summary = json.loads(path.read_text())
    summary.pop("timings_s")
    return summary


def test_torchrun_shards_the_files_and_writes_what_one_process_writes(tmp_path, model_args):
    folder = _photos(tmp_path / "in", 3)
    args = ["segment", str(folder), "--classes", "red,green;grass,sky", *model_args]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has (OMP_NUM_THREADS=1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(Path(lposs.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "lposs", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("segmented") == 1 and "segmented 3 of 3" in proc.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for path in one.iterdir():
        if path.suffix == ".json":
            assert _without_timings(two / path.name) == _without_timings(path)
        else:  # label maps and overlays, byte for byte
            assert (two / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_second_run_into_an_output_folder_inside_the_inputs_does_not_segment_outputs(
        tmp_path, model_args, capsys):
    folder = tmp_path / "photos"
    _photos(folder, 2)
    args = ["segment", str(folder), "--classes", "a,b", "--out", str(folder / "out"),
            *model_args]
    assert main(args) == 0
    first = sorted(p.name for p in (folder / "out").iterdir())
    assert main(args) == 0  # the same two photos, not also last run's PNGs as photos
    assert sorted(p.name for p in (folder / "out").iterdir()) == first
    assert "segmented 2 of 2" in capsys.readouterr().out
    code = main(["segment", str(folder / "out"), "--classes", "a,b", "--out",
                 str(folder / "out"), *model_args])
    err = capsys.readouterr().err
    assert code == 1 and "holds only lposs's outputs" in err and "Traceback" not in err
