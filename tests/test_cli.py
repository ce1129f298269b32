"""The command line as a user runs it: outputs, exit codes, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lposs.cli import main


@pytest.fixture(scope="module")
def model_args(tiny_model_files):
    clip_dir, dino_file = tiny_model_files
    return ["--clip-model", f"local-dir:{clip_dir}", "--dino-model", "vit_tiny_patch16_224",
            "--dino-weights", str(dino_file), "--k", "30", "--r", "5"]


def _photo(path, size=(60, 40), mode="RGB"):
    """A two-colour picture saved at ``path``; size is (width, height)."""
    rgb = np.zeros((size[1], size[0], 3), np.uint8)
    rgb[:, : size[0] // 2] = (220, 30, 30)
    rgb[:, size[0] // 2 :] = (20, 200, 40)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lposs: error:")]


def test_segment_batch_writes_outputs_and_reports_bad_files(tmp_path, model_args, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo(folder / "a.png")
    _photo(folder / "b.jpg", size=(50, 70), mode="L")  # grayscale JPEG
    _photo(folder / "c.png", mode="RGBA")
    (folder / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = main(["segment", str(folder), str(tmp_path / "missing.jpg"), "--classes",
                 "red thing, green thing;grass, sky", "--out", str(out), "--save-scores",
                 *model_args])
    captured = capsys.readouterr()
    assert code == 1
    errors = _error_lines(captured.err)
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert any("broken.png" in e for e in errors) and any("missing.jpg" in e for e in errors)
    assert "segmented 3 of 5" in captured.out

    for stem, (width, height) in {"a": (60, 40), "b": (50, 70), "c": (60, 40)}.items():
        labels = Image.open(out / f"{stem}.png")
        assert labels.mode == "P" and labels.size == (width, height)
        assert np.array(labels).max() <= 2
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.width >= width and overlay.height >= height  # plus the legend
        scores = np.load(out / f"{stem}_scores.npy")
        assert scores.shape == (3, height, width) and scores.dtype == np.float32
        assert np.array_equal(scores.argmax(0), np.array(labels))
        summary = json.loads((out / f"{stem}.json").read_text())
        names = [c["name"] for c in summary["classes"]]
        assert names == ["red thing", "green thing;grass", "sky"]
        counts = np.bincount(np.array(labels).ravel(), minlength=3)
        shares = [c["share"] for c in summary["classes"]]
        np.testing.assert_allclose(shares, counts / counts.sum(), atol=1e-6)
        assert summary["settings"]["k"] == 30 and summary["settings"]["r"] == 5
    leftovers = {p.name for p in out.iterdir()} - {
        f"{s}{suffix}" for s in "abc"
        for suffix in (".png", "_overlay.png", "_scores.npy", ".json")}
    assert not leftovers  # no temporary or half-written files


def test_segment_as_a_process_exits_zero_and_prints_a_summary(tmp_path, model_args):
    image = _photo(tmp_path / "one.png")
    proc = subprocess.run(
        [sys.executable, "-m", "lposs", "segment", str(image), "--classes", "a,b",
         "--out", str(tmp_path / "out"), "--no-refine", *model_args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "segmented 1 of 1 image(s) into 2 classes" in proc.stdout
    assert json.loads((tmp_path / "out" / "one.json").read_text())["settings"]["pixel_stage"] \
        is False


@pytest.mark.parametrize(
    ("classes", "message"),
    [("", "empty"), ("cat,,dog", "empty"), ("cat,dog,Cat", "duplicate"), ("a;", "empty")],
)
def test_bad_class_lists_are_one_line_errors(tmp_path, classes, message, capsys):
    image = _photo(tmp_path / "x.png")
    code = main(["segment", str(image), "--classes", classes, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and len(_error_lines(err)) == 1 and message in err
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


def test_classes_file(tmp_path, model_args, capsys):
    image = _photo(tmp_path / "x.png")
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\nred\n\ngreen;lawn\n")
    code = main(["segment", str(image), "--classes-file", str(names), "--out",
                 str(tmp_path / "o"), *model_args])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "o" / "x.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["red", "green;lawn"]


def test_unwritable_output_folder(tmp_path, capsys):
    image = _photo(tmp_path / "x.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 1 and len(_error_lines(err)) == 1 and "cannot write" in err


def test_pixel_cap_is_an_error_unless_raised(tmp_path, model_args, capsys):
    image = _photo(tmp_path / "big.png", size=(60, 40))
    args = ["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
            "--no-refine", *model_args]
    assert main([*args, "--max-pixels", "1000"]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "max-pixels" in err
    assert main([*args, "--max-pixels", "0"]) == 0  # 0 lifts the cap


def test_missing_weights_explain_how_to_provide_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LPOSS_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    image = _photo(tmp_path / "x.png")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "--clip-weights" in err and "LPOSS_WEIGHTS" in err


def test_refine_a_blocky_label_map(tmp_path, capsys):
    # A sharp vertical edge at x = 300; the label map puts it at x = 320, with an
    # unlabelled (255) band in between that propagation fills from its neighbours.
    rgb = np.zeros((448, 600, 3), np.uint8)
    rgb[:, 300:] = 255
    Image.fromarray(rgb).save(tmp_path / "img.png")
    labels = np.zeros((448, 600), np.uint8)
    labels[:, 320:] = 1
    labels[:, 290:320] = 255
    Image.fromarray(labels).save(tmp_path / "labels.png")
    code = main(["refine", str(tmp_path / "img.png"), "--labels", str(tmp_path / "labels.png"),
                 "--classes", "dark,bright", "--out", str(tmp_path / "out"), "--save-scores"])
    assert code == 0, capsys.readouterr().err
    refined = np.array(Image.open(tmp_path / "out" / "img.png"))
    truth = np.zeros((448, 600), np.int64)
    truth[:, 300:] = 1
    before = (labels == truth).mean()
    assert (refined == truth).mean() > max(before, 0.99)
    assert np.load(tmp_path / "out" / "img_scores.npy").shape == (2, 448, 600)


def test_refine_scores_file_must_be_chw(tmp_path, capsys):
    _photo(tmp_path / "img.png")
    np.save(tmp_path / "s.npy", np.zeros((4, 5), np.float32))
    code = main(["refine", str(tmp_path / "img.png"), "--scores", str(tmp_path / "s.npy"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and len(_error_lines(err)) == 1 and "(C, H, W)" in err


@pytest.mark.parametrize("command", ["segment", "refine", "eval", "convert", "demo"])
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "default" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["not-a-device", "meta:7x"])
def test_bad_device_is_a_one_line_error(tmp_path, model_args, device, capsys):
    image = _photo(tmp_path / "x.png")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
                 *model_args, "--device", device])
    err = capsys.readouterr().err
    assert code == 1 and len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "device" in err


_MODULES_AFTER = """\
import sys
from lposs.cli import main
try:
    main({argv!r})
except SystemExit as exit_info:
    assert exit_info.code == 0, exit_info.code
print("MODULES", *sorted(sys.modules))
"""


def _modules_after(argv: list[str]) -> set[str]:
    """The modules a fresh interpreter holds after ``lposs.cli.main(argv)``."""
    proc = subprocess.run([sys.executable, "-c", _MODULES_AFTER.format(argv=argv)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.splitlines()[-1].split()[1:])


def test_segment_help_imports_neither_datasets_nor_demo():
    loaded = _modules_after(["segment", "--help"])
    assert "lposs.cli.segment" in loaded
    assert not {"gradio", "lposs.evaluation.datasets", "lposs.demo", "lposs.evaluation"} & loaded
    # The check sees imports: the eval command's options name the benchmarks.
    assert "lposs.evaluation.datasets" in _modules_after(["eval", "--help"])


def test_segment_help_shows_only_meaningful_defaults(capsys):
    from lposs.pipeline.image import DEFAULT_MAX_PIXELS

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    options = text[text.index("options:"):]  # past the usage line
    assert "(default: None)" not in options and "(default: False)" not in options
    assert "DEFAULT_MAX_PIXELS" not in options
    assert f"0 disables the cap (default: {DEFAULT_MAX_PIXELS})" in options
    device = options[options.index("--device DEVICE"):options.index("--precision {")]
    assert device.count("default") == 1 and "(default: cpu)" in device
    assert "(default: lposs+)" in options and "(default: fp32)" in options
    assert "--k K neighbours per patch (paper: 400) --gamma" in options


def test_segment_json_says_which_image_and_which_weights(tmp_path, model_args, capsys):
    import hashlib

    import open_clip
    import timm
    import torch

    import lposs

    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    _photo(first / "img.png", size=(30, 20))
    _photo(second / "img.png", size=(20, 30))  # same stem, another size
    out = tmp_path / "out"
    code = main(["segment", str(first / "img.png"), str(second / "img.png"), "--classes",
                 "a,b", "--out", str(out), *model_args])
    assert code == 0, capsys.readouterr().err
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(summaries) == 2
    by_source = {s["source"]: s for s in summaries}
    assert set(by_source) == {str((first / "img.png").resolve()),
                              str((second / "img.png").resolve())}
    assert (by_source[str((first / "img.png").resolve())]["height"],
            by_source[str((first / "img.png").resolve())]["width"]) == (20, 30)
    assert (by_source[str((second / "img.png").resolve())]["height"],
            by_source[str((second / "img.png").resolve())]["width"]) == (30, 20)
    record = summaries[0]["provenance"]
    assert record["versions"] == {
        "lposs": lposs.__version__, "torch": torch.__version__,
        "open_clip": open_clip.__version__, "timm": timm.__version__,
        "numpy": np.__version__, "pillow": Image.__version__}
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    dino_file = model_args[model_args.index("--dino-weights") + 1]
    dino = record["weights"]["dino"]
    assert dino["source"] == "file" and dino["path"] == str(dino_file)
    assert dino["sha256"] == hashlib.sha256(open(dino_file, "rb").read()).hexdigest()
    assert dino["model"] == "vit_tiny_patch16_224"
    clip = record["weights"]["clip"]
    assert "pretrained" not in clip  # the weights are the local folder's, not a Hub tag's
    assert clip["model"].startswith("local-dir:")


@pytest.mark.parametrize("spec,windows", [("none", None), ("32/16,48/24", [[32, 16], [48, 24]])])
def test_windows_flag_sets_the_window_setups(tmp_path, model_args, spec, windows, capsys):
    image = _photo(tmp_path / "x.png")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "out"),
                 "--windows", spec, *model_args])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "x.json").read_text())
    assert record["settings"]["windows"] == windows


def test_a_bad_windows_flag_is_a_one_line_error(tmp_path, model_args, capsys):
    code = main(["segment", str(_photo(tmp_path / "x.png")), "--classes", "a,b", "--out",
                 str(tmp_path / "out"), "--windows", "32", *model_args])
    assert code != 0
    assert len(_error_lines(capsys.readouterr().err)) == 1
