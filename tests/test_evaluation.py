"""Evaluation runs: exact metrics, resume after an interruption, damaged records, refused
settings, two processes, the encoder cache and sweeps, and the ``lposs eval`` command."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from lposs.cli.eval import add_parser as add_eval_parser
from lposs.cli.eval import parse_sweep
from lposs.config import LPOSSConfig
from lposs.errors import ConfigError, DatasetError, LpossError
from lposs.evaluation import evaluate, sweep
from lposs.evaluation.datasets import FolderDataset
from lposs.evaluation.metrics import oracle_labels
from lposs.pipeline.segmenter import Segmenter

H, W = 40, 60
CLASSES = ["sky", "grass;lawn", "road"]
N_IMAGES = 5


def _blocky_label(rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """Rectangles of random classes on a random background, some ignored pixels."""
    label = np.full((H, W), rng.integers(n_classes), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, H - 5), rng.integers(0, W - 5)
        h, w = rng.integers(5, 25), rng.integers(5, 35)
        label[y:y + h, x:x + w] = rng.integers(n_classes)
    label[rng.random((H, W)) < 0.03] = 255
    return label


def _image_for(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colors = rng.integers(0, 256, (256, 3))
    noise = rng.integers(-20, 21, (H, W, 3))
    return np.clip(colors[label] + noise, 0, 255).astype(np.uint8)


def _palette_png(path: Path, label: np.ndarray) -> None:
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    im.putpalette([(37 * i + 11) % 256 for i in range(768)])
    im.save(path)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path, Path]:
    """(images dir, masks dir, class file) of N_IMAGES images of 40 x 60 px."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(N_IMAGES):
        label = _blocky_label(rng, len(CLASSES))
        Image.fromarray(_image_for(label, rng)).save(images / f"img{i}.png")
        _palette_png(masks / f"img{i}.png", label)
    class_file = tmp_path / "classes.txt"
    class_file.write_text("\n".join(CLASSES) + "\n")
    return images, masks, class_file


@pytest.fixture
def dataset(folder) -> FolderDataset:
    return FolderDataset(*folder)


@pytest.fixture(scope="module")
def segmenter(tiny_clip, tiny_dino) -> Segmenter:
    return Segmenter(tiny_clip, tiny_dino, LPOSSConfig(k=20, short_side=64))


def _labels(dataset) -> list[np.ndarray]:
    return [np.asarray(Image.open(s.label_path)).astype(np.int64) for s in dataset.samples]


def _numpy_metrics(preds, gts, n, ignore=255) -> dict:
    """mIoU, pixel accuracy and Boundary IoU from scratch (numpy, scipy erosion)."""
    conf = np.zeros((n, n), np.int64)
    inter, union = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pred, gt in zip(preds, gts):
        valid = gt != ignore
        hit = valid & (pred >= 0) & (pred < n)
        np.add.at(conf, (gt[hit], pred[hit]), 1)
        d = max(1, round(0.02 * np.hypot(*gt.shape)))
        for c in range(n):
            bands = []
            for mask in (gt == c, (pred == c) & valid):
                eroded = ndimage.binary_erosion(mask, np.ones((3, 3)), iterations=d,
                                                border_value=0)
                bands.append(mask & ~eroded)
            inter[c] += (bands[0] & bands[1]).sum()
            union[c] += (bands[0] | bands[1]).sum()
    gt_area = np.array([(np.concatenate([g.ravel() for g in gts]) == c).sum() for c in range(n)])
    tp = np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt_area + conf.sum(0) - tp)
        biou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return {"iou": iou, "miou": np.nanmean(iou), "pixel_accuracy": tp.sum() / gt_area.sum(),
            "boundary_iou": biou, "boundary_miou": np.nanmean(biou)}


def _same_numbers(a, b) -> None:
    for key in ("miou", "pixel_accuracy", "num_pixels", "num_images", "iou", "accuracy"):
        np.testing.assert_array_equal(np.asarray(a.metrics[key], float),
                                      np.asarray(b.metrics[key], float), err_msg=key)
    if a.boundary and b.boundary:
        np.testing.assert_array_equal(a.metrics["boundary_iou"], b.metrics["boundary_iou"])


# --------------------------------------------------------------------------- oracle
def test_oracle_matches_independent_computation(dataset, tmp_path):
    result = evaluate(dataset, method="oracle", boundary=True, run_dir=tmp_path / "run")
    gts = _labels(dataset)
    preds = [oracle_labels(g, patch_size=16).numpy() for g in gts]
    expected = _numpy_metrics(preds, gts, len(CLASSES))
    assert result.num_images == N_IMAGES
    assert result.miou == pytest.approx(expected["miou"], abs=1e-12)
    assert result.pixel_accuracy == pytest.approx(expected["pixel_accuracy"], abs=1e-12)
    np.testing.assert_allclose(list(result.per_class.values()), expected["iou"], atol=1e-12)
    assert list(result.per_class) == CLASSES
    assert result.boundary_iou == pytest.approx(expected["boundary_miou"], abs=1e-12)
    np.testing.assert_allclose(result.metrics["boundary_iou"], expected["boundary_iou"],
                               atol=1e-12)
    assert 0 < result.miou < 1  # the patch-resolution oracle is imperfect on 40 x 60 images
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["miou"] == result.miou
    assert [c["name"] for c in written["per_class"]] == CLASSES
    assert written["provenance"]["weights"] == {}  # the oracle runs no encoder
    table = result.to_markdown()
    assert "| mIoU |" in table and "| Boundary IoU |" in table and "| grass;lawn |" in table
    assert (tmp_path / "run" / "results.md").read_text() == table
    # Same numbers without records, and for the same images read in another order.
    _same_numbers(evaluate(dataset, method="oracle", boundary=True), result)


def test_bad_arguments(dataset, segmenter):
    with pytest.raises(ValueError, match="needs a segmenter"):
        evaluate(dataset, method="lposs")
    with pytest.raises(ValueError, match="method"):
        evaluate(dataset, method="sam")
    with pytest.raises(ValueError, match="limit"):
        evaluate(dataset, method="oracle", limit=0)
    with pytest.raises(TypeError, match="dataset"):
        evaluate([1, 2], method="oracle")
    with pytest.raises(ConfigError, match="cannot sweep"):
        sweep(dataset, segmenter, {"short_side": [32, 64]})


# --------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_with_identical_numbers(dataset, segmenter, tmp_path):
    reference = evaluate(dataset, segmenter, method="lposs", boundary=True)
    run = tmp_path / "run"
    seen = []

    def stop_after_two(stage, done, total):
        seen.append((stage, done, total))
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(dataset, segmenter, method="lposs", boundary=True, run_dir=run,
                 progress=stop_after_two)
    records = sorted(p.name for p in (run / "records").glob("*.json"))
    assert records == ["img0.json", "img1.json"]
    assert not (run / "results.json").exists()
    before = {p: p.stat().st_mtime_ns for p in (run / "records").glob("*.json")}

    computed = []
    resumed = evaluate(dataset, segmenter, method="lposs", boundary=True, run_dir=run,
                       progress=lambda stage, done, total: computed.append((done, total)))
    assert seen[0] == ("evaluating images", 0, 5)
    assert computed == [(0, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert resumed.stats["computed"] == 3 and resumed.stats["reused"] == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    _same_numbers(resumed, reference)
    assert resumed.boundary_iou == reference.boundary_iou
    record = json.loads((run / "results.json").read_text())["provenance"]
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["versions"]["torch"] == torch.__version__
    assert record["weights"]["clip"] == {"model": "ViT-B-16", "source": "random"}
    assert record["weights"]["dino"]["source"] == "random"

    # A finished run recomputes nothing; --limit within it too.
    again = []
    _same_numbers(evaluate(dataset, segmenter, method="lposs", boundary=True, run_dir=run,
                           progress=lambda *a: again.append(a[1:])), reference)
    limited = evaluate(dataset, segmenter, method="lposs", limit=2, run_dir=run,
                       progress=lambda *a: again.append(a[1:]))
    assert again == [(0, 5), (5, 5), (0, 2), (2, 2)] and limited.num_images == 2
    assert limited.stats["computed"] == 0


def test_damaged_records_are_redone(dataset, tmp_path):
    run = tmp_path / "run"
    reference = evaluate(dataset, method="oracle", boundary=True, run_dir=run)
    records = run / "records"
    (records / "img1.json").write_text('{"format": 1, "id": "im')  # truncated
    tampered = json.loads((records / "img3.json").read_text())
    tampered["counts"]["confusion"]["count"][0] += 1  # checksum no longer matches
    (records / "img3.json").write_text(json.dumps(tampered))
    (records / "img4.json").write_bytes(b"\x00\xff" * 10)
    before = {p.name: p.read_bytes() for p in records.iterdir()}
    result = evaluate(dataset, method="oracle", boundary=True, run_dir=run)
    redone = [p.stem for p in sorted(records.iterdir()) if p.read_bytes() != before[p.name]]
    assert redone == ["img1", "img3", "img4"]
    assert result.stats["redone"] == 3
    _same_numbers(result, reference)
    # Records made without Boundary IoU counts are redone when a boundary run needs them.
    plain = tmp_path / "plain"
    evaluate(dataset, method="oracle", run_dir=plain)
    redone = evaluate(dataset, method="oracle", boundary=True, run_dir=plain)
    _same_numbers(redone, reference)
    assert redone.stats["computed"] == N_IMAGES


def test_other_settings_are_refused(dataset, segmenter, folder, tmp_path):
    run = tmp_path / "run"
    evaluate(dataset, segmenter, method="lposs", limit=1, run_dir=run)
    other = Segmenter(segmenter.clip, segmenter.dino, segmenter.config.replace(k=10))
    with pytest.raises(LpossError, match=r"other settings \(differs in: config.k\).*--out"):
        evaluate(dataset, other, method="lposs", limit=1, run_dir=run)
    with pytest.raises(LpossError, match="config.pixel_stage"):
        evaluate(dataset, segmenter, method="lposs+", limit=1, run_dir=run)
    with pytest.raises(LpossError, match="method"):
        evaluate(dataset, method="oracle", run_dir=run)
    fewer = FolderDataset(folder[0], folder[1], CLASSES[:2] + ["street"])
    with pytest.raises(LpossError, match="dataset.classes"):
        evaluate(fewer, segmenter, method="lposs", limit=1, run_dir=run)
    assert [p.name for p in (run / "records").iterdir()] == ["img0.json"]


# ----------------------------------------------------------------------- processes
def test_two_processes_give_the_numbers_of_one(dataset, folder, tmp_path):
    script = tmp_path / "run_eval.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from lposs.evaluation.datasets import FolderDataset
        from lposs.evaluation import evaluate

        ids = []
        result = evaluate(FolderDataset(*sys.argv[1:4]), method="oracle", boundary=True,
                          run_dir=sys.argv[4], progress=lambda *a: ids.append(a[1:]))
        print("RESULT", json.dumps({"rank": int(os.environ["RANK"]), "ids": ids,
                                    "miou": result.miou, "stats": result.stats}))
    """))
    # What torchrun sets for each worker (launching them directly saves its agent process).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, str(script), *map(str, folder), str(tmp_path / "run")]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
            "LOCAL_RANK": str(rank)})
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    stdout = "".join(out for out, _ in outputs)
    reports = sorted((json.loads(line.split("RESULT", 1)[1])
                      for line in stdout.splitlines() if "RESULT" in line),
                     key=lambda r: r["rank"])
    assert [r["ids"] for r in reports] == [[[0, 3], [1, 3], [2, 3], [3, 3]],
                                           [[0, 2], [1, 2], [2, 2]]]
    assert all(r["stats"]["computed"] == N_IMAGES for r in reports)  # summed over ranks
    single = evaluate(dataset, method="oracle", boundary=True)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert reports[0]["miou"] == reports[1]["miou"] == single.miou == written["miou"]
    assert written["boundary_iou"] == single.boundary_iou
    assert [c["iou"] for c in written["per_class"]] == list(single.per_class.values())


# --------------------------------------------------------------------- cache, sweep
class _CallCounter:
    """Counts forward calls of the encoders' patch embeddings."""

    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_cache_skips_encoders_and_sweep_matches_uncached_runs(dataset, segmenter, tmp_path):
    counter = _CallCounter(segmenter.clip.model.visual.conv1, segmenter.dino.model.patch_embed)
    try:
        cache = tmp_path / "cache"
        first = evaluate(dataset, segmenter, method="lposs", cache_dir=cache)
        assert first.stats["cache_misses"] == N_IMAGES and counter.calls > 0
        files = sorted(cache.rglob("*.pt"))
        assert len(files) == N_IMAGES
        mtimes = [p.stat().st_mtime_ns for p in files]

        counter.calls = 0
        result = sweep(dataset, segmenter, {"k": [10, 20], "sigma": [0.05]}, method="lposs",
                       run_dir=tmp_path / "sweep", cache_dir=cache)
        assert counter.calls == 0  # every combination read the cached encoder outputs
        assert [p.stat().st_mtime_ns for p in files] == mtimes
        assert [values for values, _ in result.rows] == [{"k": 10, "sigma": 0.05},
                                                         {"k": 20, "sigma": 0.05}]
        assert all(r.stats["cache_hits"] == N_IMAGES for _, r in result.rows)
    finally:
        counter.close()
    for values, swept in result.rows:
        plain = Segmenter(segmenter.clip, segmenter.dino, segmenter.config.replace(**values))
        _same_numbers(swept, evaluate(dataset, plain, method="lposs"))
    table = result.to_markdown().splitlines()
    assert table[2] == "| k | sigma | mIoU (%) | pixel acc. (%) |"
    assert table[4].startswith("| 10 | 0.05 | ") and table[5].startswith("| 20 | 0.05 | ")
    assert (tmp_path / "sweep" / "k=10_sigma=0.05" / "results.json").is_file()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["names"] == ["k", "sigma"]

    # A damaged cache file is encoded again.
    files[0].write_bytes(b"not a torch file")
    again = evaluate(dataset, segmenter, method="lposs", cache_dir=cache)
    assert again.stats["cache_hits"] == N_IMAGES - 1
    _same_numbers(again, first)


# ------------------------------------------------------------------------------- CLI
def _voc_layout(root: Path) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = ["2007_000033", "2007_000042", "2008_000002", "2009_000005"]
    for id_ in ids:
        label = _blocky_label(rng, 21)
        Image.fromarray(_image_for(label, rng)).save(base / "JPEGImages" / f"{id_}.jpg")
        _palette_png(base / "SegmentationClass" / f"{id_}.png", label)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lposs")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_eval_oracle_on_voc_layout(tmp_path, capsys):
    _voc_layout(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["eval", "--dataset", "voc", "--data-root", str(tmp_path / "data"), "--method",
            "oracle", "--boundary", "--out", str(out), "--no-progress"]
    assert _run_cli(argv) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "results.json").read_text())
    assert written["num_images"] == 4 and written["dataset"] == "voc"
    assert f"| mIoU | {100 * written['miou']:.2f} | 91.5 |" in printed
    assert f"| Boundary IoU | {100 * written['boundary_iou']:.2f} | 80.1 |" in printed
    assert "| background |" in printed and "| aeroplane |" in printed
    assert _run_cli(argv) == 0  # resumed: same table
    assert capsys.readouterr().out == printed
    with pytest.raises(LpossError, match="needs --images"):
        _run_cli(["eval", "--dataset", "folder", "--method", "oracle"])
    with pytest.raises(LpossError, match="sweep needs a model"):
        _run_cli([*argv, "--sweep", "k=1,2"])


def test_lposs_main_runs_eval_when_registered(tmp_path, capsys, folder):
    from lposs import cli

    argv = ["eval", "--dataset", "folder", "--images", str(folder[0]), "--masks",
            str(folder[1]), "--class-file", str(folder[2]), "--method", "oracle",
            "--out", str(tmp_path / "run"), "--limit", "3", "--no-progress"]
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.skip("lposs.cli does not register the eval sub-command yet")
    assert cli.main(argv) == 0
    assert "| mIoU |" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_images"] == 3
    assert cli.main([*argv, "--method", "lposs", "--limit", "0"]) == 1
    assert "--limit" in capsys.readouterr().err


def test_parse_sweep():
    assert parse_sweep(["k=200,400", "tau=0.01,0.05"]) == {"k": [200, 400], "tau": [0.01, 0.05]}
    assert parse_sweep(None) == {}
    for bad, message in (("k", "NAME=V1"), ("clip=a", "cannot sweep"), ("k=1.5", "integers")):
        with pytest.raises(ConfigError, match=message):
            parse_sweep([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_sweep(["k=1", "k=2"])



def test_half_size_mask_refused_by_oracle_and_model_alike(tmp_path, folder, segmenter):
    images, masks, class_file = folder
    label = np.asarray(Image.open(masks / "img2.png"))
    _palette_png(masks / "img2.png", label[::2, ::2])  # (20, 30) beside a (40, 60) image
    expected = (f"label {masks / 'img2.png'} is (20, 30) but image {images / 'img2.png'} "
                "is (40, 60) (H, W)")
    for method, seg in (("oracle", None), ("lposs", segmenter)):
        with pytest.raises(DatasetError) as info:
            evaluate(FolderDataset(*folder), seg, method=method, run_dir=tmp_path / method)
        assert str(info.value) == expected


def _oracle_argv(folder, out, *extra):
    return ["eval", "--dataset", "folder", "--images", str(folder[0]), "--masks",
            str(folder[1]), "--class-file", str(folder[2]), "--method", "oracle",
            "--out", str(out), *extra]


def test_second_eval_into_a_run_folder_is_refused(tmp_path, capsys, folder):
    from lposs import cli
    from lposs.output.files import folder_lock

    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run):  # what a first `lposs eval` there holds while it runs
        assert cli.main(_oracle_argv(folder, run)) == 1
    err = capsys.readouterr().err
    assert err.startswith("lposs: error: another lposs is writing to") and err.count("\n") == 1
    assert not (run / "records").exists()
    assert cli.main(_oracle_argv(folder, run)) == 0  # released: it runs


def test_plain_run_keeps_boundary_results(tmp_path, capsys, folder):
    from lposs import cli

    run = tmp_path / "run"
    assert cli.main(_oracle_argv(folder, run, "--boundary")) == 0
    with_boundary = (run / "results.json").read_text()
    records = {p: p.read_bytes() for p in (run / "records").iterdir()}
    capsys.readouterr()
    assert cli.main(_oracle_argv(folder, run)) == 0
    assert "| mIoU |" in capsys.readouterr().out
    assert (run / "results.json").read_text() == with_boundary
    assert json.loads(with_boundary)["boundary_iou"] is not None
    assert {p: p.read_bytes() for p in records} == records


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_cli_eval_says_how_far_and_resumes(tmp_path, capsys, signum, status):
    from lposs import cli

    rng = np.random.default_rng(3)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    n = 150
    for i in range(n):
        label = np.kron(_blocky_label(rng, len(CLASSES)), np.ones((4, 4), np.uint8))
        Image.fromarray(label * 60).save(images / f"im{i:03d}.png")
        _palette_png(masks / f"im{i:03d}.png", label)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    folder = (images, masks, tmp_path / "classes.txt")
    run = tmp_path / "run"

    def interrupt_after_first_record():
        while not any((run / "records").glob("*.json")):
            time.sleep(0.001)
        os.kill(os.getpid(), signum)

    threading.Thread(target=interrupt_after_first_record, daemon=True).start()
    assert cli.main(_oracle_argv(folder, run)) == status
    err = capsys.readouterr().err
    done = int(re.fullmatch(r"lposs: error: interrupted: (\d+) of 150 images done; rerun the "
                            r"same command to resume\n", err)[1])
    written = len(list((run / "records").glob("*.json")))
    assert 1 <= done <= written <= done + 1 < n
    assert not (run / "results.json").exists() and not (run / ".lposs.lock").exists()
    assert cli.main(_oracle_argv(folder, run)) == 0
    assert json.loads((run / "results.json").read_text())["num_images"] == n
