"""The command line's answer to user mistakes and failing images: one ``lposs: error:`` line
and a non-zero exit, never a traceback; in a batch the other images still come out."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _error_lines, _photo

from lposs.cli import main
from lposs.errors import is_out_of_memory


@pytest.fixture(scope="module")
def model_args(tiny_model_files):
    clip_dir, dino_file = tiny_model_files
    return ["--clip-model", f"local-dir:{clip_dir}", "--dino-model", "vit_tiny_patch16_224",
            "--dino-weights", str(dino_file), "--k", "30", "--r", "5"]


def _one_error(capsys, code: int) -> str:
    """The one error line of a failed run (checked: exit 1, one line, no traceback)."""
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("flag", "value"), [("--tau", "nan"), ("--sigma", "inf"),
                                             ("--alpha", "-inf"), ("--unknown-threshold", "nan")])
def test_non_finite_settings_are_one_line_before_any_work(tmp_path, capsys, flag, value):
    image = _photo(tmp_path / "x.png")
    out = tmp_path / "out"
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(out), f"{flag}={value}"])
    line = _one_error(capsys, code)
    assert flag.lstrip("-").replace("-", "_") in line.replace("-", "_") and "finite" in line
    assert not out.exists()  # no model loaded, no folder left behind


def test_a_vocabulary_too_large_to_propagate_is_one_line_before_any_work(tmp_path, capsys):
    image = _photo(tmp_path / "x.png")
    classes = ",".join(";".join(f"c{i}s{j}" for j in range(3)) for i in range(200))  # 600 rows
    code = main(["segment", str(image), "--classes", classes, "--out", str(tmp_path / "out")])
    line = _one_error(capsys, code)
    assert "at most 512 names and synonyms" in line and "600" in line
    assert not (tmp_path / "out").exists()


def _refine(tmp_path, *args):
    return main(["refine", str(tmp_path / "img.png"), "--out", str(tmp_path / "out"), *args])


@pytest.mark.parametrize(("array", "message"), [
    (np.full((2, 40, 60), np.nan, np.float32), "NaN"),
    (np.array([[[0.0, np.inf]]], np.float32).repeat(40, 1).repeat(30, 2), "NaN or infinite"),
    (np.zeros((0, 40, 60), np.float32), "empty"),
    (np.zeros((40, 60), np.float32), "scores[None]"),
    (np.zeros((40, 60, 3), np.float32), "looks like (H, W, C); transpose to (C, H, W)"),
    (np.zeros((20, 30, 21), np.float32), "looks like (H, W, C); transpose to (C, H, W)"),
    (np.zeros((3, 60, 40), np.float32), "another aspect ratio"),
    (np.zeros((3, 40, 40), np.float32), "another aspect ratio"),
    (np.zeros((513, 4, 6), np.float32), "at most 512 are refined"),  # 50 KB, 0.5 GB of work
    (np.zeros((2, 40, 60), np.complex64), "complex"),
])
def test_refine_rejects_scores_that_are_not_this_images(tmp_path, capsys, array, message):
    _photo(tmp_path / "img.png")  # 40 x 60
    np.save(tmp_path / "s.npy", array)
    line = _one_error(capsys, _refine(tmp_path, "--scores", str(tmp_path / "s.npy")))
    assert message in line and "s.npy" in line
    assert not (tmp_path / "out").exists()


def _label_map(path, values, size=(40, 60)):
    labels = np.full(size, values[0], np.uint8)
    labels[:, size[1] // 2:] = values[1]
    Image.fromarray(labels).save(path)
    return path


@pytest.mark.parametrize(("labels", "extra", "message"), [
    ((255, 255), [], "nothing to refine"),
    ((3, 255), ["--num-classes", "2"], "nothing to refine"),
    ((0, 1), ["--num-classes", "-3"], "--num-classes must be 1..512"),
    ((0, 1), ["--num-classes", "0"], "--num-classes must be 1..512"),
])
def test_refine_rejects_label_maps_with_nothing_to_refine(tmp_path, capsys, labels, extra,
                                                          message):
    _photo(tmp_path / "img.png")
    _label_map(tmp_path / "l.png", labels)
    line = _one_error(capsys, _refine(tmp_path, "--labels", str(tmp_path / "l.png"), *extra))
    assert message in line


@pytest.mark.parametrize("size", [(30, 60), (60, 40), (40, 80)])
def test_refine_rejects_a_label_map_of_another_aspect_ratio(tmp_path, capsys, size):
    _photo(tmp_path / "img.png")  # 40 x 60
    _label_map(tmp_path / "l.png", (0, 1), size)
    line = _one_error(capsys, _refine(tmp_path, "--labels", str(tmp_path / "l.png")))
    assert f"{size[0]}x{size[1]}" in line and "40x60" in line and "aspect ratio" in line


def test_refine_resizes_a_label_map_of_the_same_aspect_ratio(tmp_path, capsys):
    _photo(tmp_path / "img.png", size=(60, 40))  # red left half, green right half
    _label_map(tmp_path / "l.png", (0, 1), size=(21, 31))  # 40x60 scaled, sides rounded
    code = _refine(tmp_path, "--labels", str(tmp_path / "l.png"), "--r", "3")
    assert code == 0, capsys.readouterr().err
    refined = np.array(Image.open(tmp_path / "out" / "img.png"))
    assert refined.shape == (40, 60)
    assert (refined[:, :28] == 0).all() and (refined[:, 32:] == 1).all()


def test_num_classes_only_with_labels(tmp_path, capsys):
    _photo(tmp_path / "img.png")
    np.save(tmp_path / "s.npy", np.zeros((2, 40, 60), np.float32))
    line = _one_error(capsys, _refine(tmp_path, "--scores", str(tmp_path / "s.npy"),
                                      "--num-classes", "2"))
    assert "--num-classes only applies to --labels" in line


def test_clip_weights_that_are_a_text_file(tmp_path, capsys, tiny_model_files):
    text = tmp_path / "weights.txt"
    text.write_text("not weights\n")
    image = _photo(tmp_path / "x.png")
    out = tmp_path / "new" / "out"
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(out),
                 "--clip-weights", str(text), "--dino-model", "vit_tiny_patch16_224",
                 "--dino-weights", str(tiny_model_files[1])])
    line = _one_error(capsys, code)
    assert "weights.txt" in line and "not a weights file" in line
    assert not (tmp_path / "new").exists()  # the folders made for the run are gone again


def _fail_once(monkeypatch, error: BaseException) -> None:
    """Make torch's first ``interpolate`` call (the first image's) raise ``error``."""
    real = torch.nn.functional.interpolate
    calls = []

    def interpolate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", interpolate)


def test_out_of_memory_on_one_image_reports_it_and_runs_the_next(tmp_path, model_args, capsys,
                                                                   monkeypatch):
    # (what else counts as running out of memory: test_what_counts_as_out_of_memory)
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 "
                                        "has a total capacity of 8 GiB")
    first, second = _photo(tmp_path / "first.png"), _photo(tmp_path / "second.png")
    _fail_once(monkeypatch, error)
    out = tmp_path / "out"
    code = main(["segment", str(first), str(second), "--classes", "a,b", "--out", str(out),
                 "--no-refine", *model_args])
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in captured.err
    assert "first.png" in lines[0] and "out of memory" in lines[0]
    assert "segmented 1 of 2" in captured.out
    assert not (out / "first.png").exists()
    assert Image.open(out / "second.png").size == (60, 40)


def test_out_of_memory_in_refine_is_one_line(tmp_path, capsys, monkeypatch):
    _photo(tmp_path / "img.png")
    np.save(tmp_path / "s.npy", np.zeros((2, 40, 60), np.float32))
    _fail_once(monkeypatch, MemoryError())
    line = _one_error(capsys, _refine(tmp_path, "--scores", str(tmp_path / "s.npy")))
    assert "out of memory" in line
    assert not (tmp_path / "out").exists()


def test_a_bug_is_not_taken_for_a_user_mistake(tmp_path, monkeypatch):
    _photo(tmp_path / "img.png")
    np.save(tmp_path / "s.npy", np.zeros((2, 40, 60), np.float32))
    _fail_once(monkeypatch, RuntimeError("shape mismatch in a matmul"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # its traceback is the report
        _refine(tmp_path, "--scores", str(tmp_path / "s.npy"))


@pytest.mark.parametrize(("error", "expected"), [
    (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 80000000000 bytes."), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("Expected all tensors to be on the same device"), False),
    (ValueError("out of memory"), False),
])
def test_what_counts_as_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected


def test_a_very_long_image_then_a_photo_both_come_out(tmp_path, model_args, capsys):
    long = tmp_path / "long.png"
    strip = np.zeros((2, 5000, 3), np.uint8)
    strip[:, 2500:] = 200
    Image.fromarray(strip).save(long)
    photo = _photo(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = main(["segment", str(long), str(photo), "--classes", "a,b", "--out", str(out),
                 *model_args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmented 2 of 2" in captured.out
    assert Image.open(out / "long.png").size == (5000, 2)
    assert Image.open(out / "photo.png").size == (60, 40)
    summary = json.loads((out / "long.json").read_text())
    assert (summary["height"], summary["width"]) == (2, 5000)


def test_nothing_written_leaves_no_output_folder(tmp_path, model_args, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "a" / "b"
    code = main(["segment", str(broken), "--classes", "a,b", "--out", str(out), *model_args])
    assert "broken.png" in _one_error(capsys, code)
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    code = main(["segment", str(broken), "--classes", "a,b", "--out", str(kept), *model_args])
    _one_error(capsys, code)
    assert kept.is_dir() and not list(kept.iterdir())  # not ours to remove, and left clean


def test_a_second_lposs_writing_to_the_same_folder_stops(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    image = _photo(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lposs.lock", "w") as held:  # what a running lposs holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code = main(["segment", str(image), "--classes", "a,b", "--out", str(out)])
        line = _one_error(capsys, code)
    assert f"another lposs is writing to {out}" in line
    assert not (out / "x.png").exists()


def test_a_name_cut_by_the_text_context_is_one_line_before_any_image(tmp_path, model_args,
                                                                      capsys):
    # Cut to CLIP's 77 tokens, these two names would get the same embedding: label 1 could
    # never win.
    first, second = "a " * 80 + "cat", "a " * 80 + "dog"
    images = [_photo(tmp_path / "one.png"), _photo(tmp_path / "two.png")]
    code = main(["segment", *map(str, images), "--classes", f"{first},{second}", "--out",
                 str(tmp_path / "out"), *model_args])
    line = _one_error(capsys, code)
    assert "too long for the text encoder" in line and "77-token" in line
    assert not (tmp_path / "out").exists()


def test_a_library_warning_is_one_line_on_stderr(capsys):
    import warnings

    from lposs.cli import _one_line_warning

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        warnings.warn("conjugate gradient diverged", RuntimeWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "lposs: warning: conjugate gradient diverged\n"


def test_refine_labels_take_the_class_count_from_classes(tmp_path, capsys):
    _photo(tmp_path / "img.png")
    _label_map(tmp_path / "l.png", (0, 255))  # only class 0 and unknown
    code = _refine(tmp_path, "--labels", str(tmp_path / "l.png"), "--classes", "a,b,c")
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "img.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["a", "b", "c"]


def test_refine_library_refines_a_label_map(tmp_path):
    from lposs.config import LPOSSConfig
    from lposs.pipeline.refine import refine_labels

    _photo(tmp_path / "img.png")  # 40 x 60
    labels = torch.zeros(40, 60, dtype=torch.long)
    labels[:, 30:] = 255
    maps = refine_labels(tmp_path / "img.png", labels, 3, LPOSSConfig(short_side=40, r=5))
    assert maps.shape == (3, 40, 60)
    assert bool((maps.labels()[:, :25] == 0).all())  # class 0 kept, unknown filled


@pytest.mark.parametrize(("content", "message"), [
    (b"just some text\n", "is not a .npy array file"),
    (None, "header claims"),
])
def test_refine_npy_messages_name_the_real_problem(tmp_path, capsys, content, message):
    _photo(tmp_path / "img.png")
    path = tmp_path / "s.npy"
    if content is None:  # a 200-byte file whose header claims (1000, 4000, 6000) float32
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (1000, 4000, 6000)})
        content = header.getvalue() + bytes(200 - len(header.getvalue()))
    path.write_bytes(content)
    line = _one_error(capsys, _refine(tmp_path, "--scores", str(path)))
    assert message in line and "allow_pickle" not in line and "memory" not in line
