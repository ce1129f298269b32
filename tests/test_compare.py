"""``lposs compare`` (per-image and per-class tables and plots of two eval runs) and the
sweep plots, against metrics computed from the predictions from scratch."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lposs.cli import main
from lposs.config import LPOSSConfig
from lposs.evaluation import evaluate, sweep
from lposs.evaluation.datasets import FolderDataset, SegmentationDataset
from lposs.evaluation.metrics import oracle_labels
from lposs.pipeline.segmenter import Segmenter

H, W = 40, 60
CLASSES = ["sky", "grass", "road", "car"]


@pytest.fixture
def dataset(tmp_path) -> FolderDataset:
    """Five 40 x 60 images of rectangles of random classes, a few ignored pixels."""
    rng = np.random.default_rng(3)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(5):
        label = np.full((H, W), rng.integers(len(CLASSES)), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            label[y:y + rng.integers(8, 30), x:x + rng.integers(8, 40)] = rng.integers(4)
        label[rng.random((H, W)) < 0.03] = 255
        colours = rng.integers(0, 256, (256, 3))
        Image.fromarray(colours[label].astype(np.uint8)).save(images / f"im{i}.png")
        Image.fromarray(label).save(masks / f"im{i}.png")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return FolderDataset(images, masks, tmp_path / "classes.txt")


@pytest.fixture(scope="module")
def segmenter(tiny_clip, tiny_dino) -> Segmenter:
    return Segmenter(tiny_clip, tiny_dino, LPOSSConfig(k=10, short_side=48))


def _per_image(pred: np.ndarray, gt: np.ndarray, n: int) -> tuple[float, float]:
    """(mIoU, Boundary IoU) of one image over the classes in its prediction or gt."""
    valid = gt != 255
    ious, bious = [], []
    d = max(1, round(0.02 * np.hypot(H, W)))
    for c in range(n):
        p, g = (pred == c) & valid, gt == c
        if (p | g).any():
            ious.append((p & g).sum() / (p | g).sum())
        bands = [m & ~ndimage.binary_erosion(m, np.ones((3, 3)), iterations=d) for m in (g, p)]
        if (bands[0] | bands[1]).any():
            bious.append((bands[0] & bands[1]).sum() / (bands[0] | bands[1]).sum())
    return float(np.mean(ious)), float(np.mean(bious))


def _class_iou(preds, gts, n: int) -> np.ndarray:
    inter, union = np.zeros(n), np.zeros(n)
    for pred, gt in zip(preds, gts):
        valid = gt != 255
        for c in range(n):
            p, g = (pred == c) & valid, gt == c
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    with np.errstate(invalid="ignore"):
        return inter / np.where(union > 0, union, np.nan)


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _number(cell: str) -> float:
    return float(cell) if cell else float("nan")


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300


def test_compare_matches_metrics_from_the_predictions(dataset, segmenter, tmp_path, capsys):
    evaluate(dataset, method="oracle", boundary=True, run_dir=tmp_path / "a")
    evaluate(dataset, segmenter, method="lposs", boundary=True, limit=4, run_dir=tmp_path / "b")
    out = tmp_path / "figures"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert "## folder: 4 images in both runs" in capsys.readouterr().out

    gts = [s.load_label() for s in dataset.samples[:4]]
    preds_a = [oracle_labels(g, patch_size=16).numpy() for g in gts]
    lposs = Segmenter(segmenter.clip, segmenter.dino, segmenter.config.replace(pixel_stage=False))
    preds_b = []
    for sample in dataset.samples[:4]:
        lposs.set_image(sample.image_path)
        preds_b.append(lposs.predict(CLASSES).labels.numpy())
    rows = _read_csv(out / "per_image.csv")
    assert [r["id"] for r in rows] == ["im0", "im1", "im2", "im3"]
    for row, gt, pa, pb in zip(rows, gts, preds_a, preds_b):
        expected = _per_image(pa, gt, 4) + _per_image(pb, gt, 4)
        got = [float(row[k]) for k in ("miou_a", "boundary_iou_a", "miou_b", "boundary_iou_b")]
        np.testing.assert_allclose(got, expected, atol=1e-6)
    classes = _read_csv(out / "per_class.csv")
    assert [r["class"] for r in classes] == CLASSES
    for key, preds in (("iou_a", preds_a), ("iou_b", preds_b)):
        np.testing.assert_allclose([_number(r[key]) for r in classes],
                                   _class_iou(preds, gts, 4), atol=1e-6)
    for name in ("miou_per_image", "boundary_iou_per_image", "iou_per_class",
                 "miou_vs_boundary_iou_a", "miou_vs_boundary_iou_b"):
        assert _is_png(out / f"{name}.png"), name


def test_without_boundary_results_no_boundary_columns_or_plots(dataset, tmp_path, capsys):
    evaluate(dataset, method="oracle", boundary=True, run_dir=tmp_path / "a")
    evaluate(dataset, method="oracle", limit=2, run_dir=tmp_path / "b")
    out = tmp_path / "figures"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    rows = _read_csv(out / "per_image.csv")
    assert list(rows[0]) == ["id", "miou_a", "miou_b"] and len(rows) == 2
    assert all(r["miou_a"] == r["miou_b"] for r in rows)  # the same oracle
    assert sorted(p.name for p in out.glob("*.png")) == [
        "iou_per_class.png", "miou_per_image.png", "miou_vs_boundary_iou_a.png"]
    assert "oracle (a)" in capsys.readouterr().out  # one method: the folder names tell them


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("lposs: error:"), err
    return lines[0]


def test_bad_runs_are_one_line_errors(dataset, tmp_path, capsys, monkeypatch):
    a, out = tmp_path / "a", str(tmp_path / "out")
    evaluate(dataset, method="oracle", run_dir=a, limit=2)
    (tmp_path / "empty").mkdir()
    assert "not an lposs eval run folder" in _error(
        ["compare", str(tmp_path / "empty"), str(a), "--out", out], capsys)
    assert "not an lposs eval run folder" in _error(
        ["compare", str(a), str(tmp_path / "missing"), "--out", out], capsys)

    other = SegmentationDataset("other", dataset.samples, CLASSES)
    evaluate(other, method="oracle", run_dir=tmp_path / "other", limit=2)
    assert "'folder' and 'other'" in _error(
        ["compare", str(a), str(tmp_path / "other"), "--out", out], capsys)
    renamed = SegmentationDataset("folder", dataset.samples, ["sky", "lawn", "road", "car"])
    evaluate(renamed, method="oracle", run_dir=tmp_path / "renamed", limit=2)
    assert "different class lists" in _error(
        ["compare", str(a), str(tmp_path / "renamed"), "--out", out], capsys)
    rest = SegmentationDataset("folder", dataset.samples[2:], CLASSES)
    evaluate(rest, method="oracle", run_dir=tmp_path / "rest")
    assert "no image in common" in _error(
        ["compare", str(a), str(tmp_path / "rest"), "--out", out], capsys)

    record = a / "records" / "im1.json"
    saved = record.read_text()
    record.write_text(saved.replace('"seconds"', '"second"'))
    assert "im1.json is damaged" in _error(["compare", str(a), str(a), "--out", out], capsys)
    record.write_text(saved)

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    assert "pip install 'lposs[plots]'" in _error(
        ["compare", str(a), str(a), "--out", out], capsys)


def test_sweep_plots_one_figure_per_setting(dataset, segmenter, tmp_path, monkeypatch):
    result = sweep(dataset, segmenter, {"k": [3, 6], "tau": [0.01, 0.05, 0.1]}, method="lposs",
                   limit=2, run_dir=tmp_path / "sweep")
    assert len(result.rows) == 6
    for name in ("k", "tau"):
        assert _is_png(tmp_path / "sweep" / f"sweep_{name}.png")
    written = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert written["names"] == ["k", "tau"]

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.warns(UserWarning, match=r"no sweep plots: .*lposs\[plots\]"):
        sweep(dataset, segmenter, {"k": [3, 6]}, method="lposs", limit=2,
              run_dir=tmp_path / "plain")
    assert (tmp_path / "plain" / "sweep.md").is_file()
    assert not list((tmp_path / "plain").glob("*.png"))
