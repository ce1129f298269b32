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

    def __init__(self, ctrl_c_after: str | None = None, sig=signal.SIGINT):
        self.sig = sig
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
                os.kill(os.getpid(), self.sig)

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


# ----------------------------------------------------------------------------- issue 21
def test_sigterm_mid_batch_is_handled_like_ctrl_c(tmp_path, model_args, monkeypatch, capsys):
    folder = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    terminal = _Terminal(ctrl_c_after="[2/3] b.png", sig=signal.SIGTERM)
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    code = main(["segment", str(folder), "--classes", "red,green", "--out", str(out),
                 "--r", "5", *model_args])
    shown = terminal.close()
    assert terminal.pressed and code == 130, shown
    assert len(re.findall(r"lposs: error: interrupted: \d of 3", shown)) == 1, shown
    assert shown.rstrip("\r\n").endswith("-> " + str(out)), shown  # status line cleared
    assert not (out / ".lposs.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_symlink_loop_is_reported_and_the_batch_goes_on(tmp_path, model_args, capsys):
    folder = _photos(tmp_path / "odd", 2)
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    code = main(["segment", str(folder), "--classes", "a,b", "--out", str(tmp_path / "out"),
                 *model_args])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lposs: error:")]
    assert code == 1 and "Traceback" not in captured.err
    assert len(errors) == 2 and all("loop_" in e and "symbolic links" in e for e in errors)
    assert "segmented 2 of 4" in captured.out


def test_outputs_beside_the_photos_are_skipped_not_the_photos(tmp_path, model_args, capsys):
    folder = _photos(tmp_path / "four3", 2)
    args = ["--classes", "a,b", "--out", str(folder), *model_args]
    assert main(["segment", str(folder), *args]) == 0
    # a.png is a photo in the output folder: its outputs are a_png.*, never a.png itself
    assert {"a.png", "a_png.png", "a_png.json", "a_png_overlay.png"} <= {
        p.name for p in folder.iterdir()}
    assert main(["segment", str(folder), *args]) == 0
    assert main(["segment", str(folder / "*"), *args]) == 0
    out = capsys.readouterr().out
    assert out.count("segmented 2 of 2") == 3
    assert len(list(folder.glob("*.json"))) == 2


def test_output_names_do_not_depend_on_the_batch_and_never_take_anothers(tmp_path, model_args,
                                                                         capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _photos(a, 1)
    _photos(b, 1)  # b/a.png: the same stem in another folder
    (a / "a.png").rename(a / "x.png")
    (b / "a.png").rename(b / "x.png")
    Image.open(a / "x.png").save(a / "photo.bmp")
    Image.open(a / "x.png").save(a / "photo.webp")
    assert main(["segment", str(a / "photo.bmp"), "--classes", "p,q", "--out", str(out),
                 *model_args]) == 0
    assert (out / "photo_bmp.json").is_file()  # alone, still named apart from photo.webp
    assert main(["segment", str(a / "x.png"), "--classes", "p,q", "--out", str(out),
                 *model_args]) == 0
    assert main(["segment", str(b / "x.png"), "--classes", "p,q", "--out", str(out),
                 *model_args]) == 0
    sources = {p.name: json.loads(p.read_text())["source"] for p in out.glob("*.json")}
    assert sources["x.json"] == str((a / "x.png").resolve())  # not replaced by b/x.png
    assert sources["b_x.json"] == str((b / "x.png").resolve())
    capsys.readouterr()
    code = main(["segment", str(a), str(b), "--classes", "p,q", "--out", str(out),
                 "--skip-existing", *model_args])
    printed = capsys.readouterr().out
    assert code == 0 and "segmented 1 of 1" in printed and "3 skipped" in printed
    assert (out / "photo_webp.json").is_file() and len(list(out.glob("*.json"))) == 4


def test_a_very_long_file_name_is_shortened_before_any_work(tmp_path, model_args, capsys):
    folder = _photos(tmp_path / "in", 1)
    long_name = folder / ("n" * 244 + ".png")
    (folder / "a.png").rename(long_name)
    out = tmp_path / "out"
    assert main(["segment", str(long_name), "--classes", "a,b", "--out", str(out),
                 *model_args]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and all(len(n.encode()) <= 255 for n in names)
    stem = names[0].split(".")[0]
    assert stem.startswith("n" * 150) and len(stem.encode()) <= 200


def test_out_that_is_a_file_says_so(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(["segment", str(tmp_path), "--classes", "a,b", "--out", str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert code == 1 and "is a file, not a folder" in err and "Traceback" not in err
