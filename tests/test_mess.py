"""MESS datasets through mess-benchmark: tiny copies in the layout MESS's preparation
scripts write, evaluated with the oracle, against an mIoU computed here from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lposs.cli import main
from lposs.config import LPOSSConfig
from lposs.evaluation.datasets import get_dataset
from lposs.evaluation.mess import evaluate_mess
from lposs.evaluation.metrics import oracle_labels
from lposs.pipeline.segmenter import Segmenter

pytest.importorskip("mess")
_RNG = np.random.default_rng(7)


def _label(n_classes: int, shape=(36, 52)) -> np.ndarray:
    label = np.full(shape, _RNG.integers(n_classes), np.uint8)
    for _ in range(3):
        y, x = _RNG.integers(0, shape[0] - 6), _RNG.integers(0, shape[1] - 6)
        label[y:y + _RNG.integers(6, 24), x:x + _RNG.integers(6, 30)] = _RNG.integers(n_classes)
    label[_RNG.random(shape) < 0.02] = 255  # MESS's ignore label
    return label


def _save(image_path: Path, label_path: Path, label: np.ndarray) -> None:
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_RNG.integers(0, 256, (*label.shape, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(label).save(label_path)


def _suim(root: Path, n: int = 3) -> list[np.ndarray]:
    """SUIM as prepare_suim writes it: TEST/images/*.jpg, annotations_detectron2/test/*.png."""
    labels = [_label(8) for _ in range(n)]
    for i, label in enumerate(labels):
        _save(root / "SUIM/TEST/images" / f"d_r_{i}_.jpg",
              root / "SUIM/annotations_detectron2/test" / f"d_r_{i}_.png", label)
    return labels


def _paxray(root: Path, n: int = 2) -> dict[str, list[np.ndarray]]:
    """PAXRay: one image folder, a binary label folder per subset (prepare_paxray)."""
    base = root / "paxray_dataset"
    out = {}
    for part in ("lungs", "mediastinum", "bones", "diaphragm"):
        out[part] = [_label(2) for _ in range(n)]
        for i, label in enumerate(out[part]):
            _save(base / "images_detectron2/test" / f"{i}.png",
                  base / "annotations_detectron2/test" / part / f"{i}.png", label)
    return out


def _dark_zurich(root: Path, n: int = 2) -> list[np.ndarray]:
    """Dark Zurich: *_rgb_anon.png images, *_gt_labelIds.png labels (prepare_dark_zurich)."""
    labels = [_label(19) for _ in range(n)]
    for i, label in enumerate(labels):
        stem = f"GOPR0356_frame_{i:06d}"
        _save(root / "Dark_Zurich/rgb_anon/val/night/GOPR0356" / f"{stem}_rgb_anon.png",
              root / "Dark_Zurich/annotations_detectron2/val" / f"{stem}_gt_labelIds.png", label)
    return labels


def _oracle_miou(labels: list[np.ndarray], n_classes: int) -> float:
    """mIoU (percent) over the classes with a non-zero union, one confusion over all images."""
    inter, union = np.zeros(n_classes), np.zeros(n_classes)
    for gt in labels:
        pred = oracle_labels(gt.astype(np.int64), patch_size=16).numpy()
        valid = gt != 255
        for c in range(n_classes):
            p, g = (pred == c) & valid, gt == c
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    return 100 * float(np.mean(inter[union > 0] / union[union > 0]))


def _eval(root: Path, dataset: str, out: Path, *extra: str) -> int:
    return main(["eval", "--dataset", dataset, "--data-root", str(root), "--method", "oracle",
                 "--out", str(out), "--no-progress", *extra])


def test_a_mess_dataset_by_either_name_matches_an_independent_miou(tmp_path, capsys):
    from mess.utils.catalog import MetadataCatalog

    labels = _suim(tmp_path / "data")
    for name in ("mess:suim", "mess:suim_sem_seg_test"):
        assert _eval(tmp_path / "data", name, tmp_path / name) == 0
        written = json.loads((tmp_path / name / "results.json").read_text())
        assert written["dataset"] == "suim_sem_seg_test" and written["num_images"] == 3
        assert [c["name"] for c in written["per_class"]] == \
            list(MetadataCatalog.get("suim_sem_seg_test").stuff_classes)
        assert 100 * written["miou"] == pytest.approx(_oracle_miou(labels, 8), abs=1e-9)
    assert "| background (waterbody) |" in capsys.readouterr().out


def test_every_mess_dataset_present_with_domain_averages(tmp_path, capsys):
    root = tmp_path / "data"
    suim, paxray, zurich = _suim(root), _paxray(root), _dark_zurich(root)
    out = tmp_path / "mess"
    assert _eval(root, "mess", out) == 0
    summary = json.loads((out / "mess.json").read_text())
    expected = {"Dark Zurich": _oracle_miou(zurich, 20), "SUIM": _oracle_miou(suim, 8),
                "PAXRay-4": np.mean([_oracle_miou(v, 2) for v in paxray.values()])}
    assert [d["name"] for d in summary["datasets"]] == ["Dark Zurich", "PAXRay-4", "SUIM"]
    for row in summary["datasets"]:
        assert row["miou_percent"] == pytest.approx(expected[row["name"]], abs=1e-9)
        assert row["paper_percent"] is None  # the paper has no oracle row on MESS
    domains = {d: v["miou_percent"] for d, v in summary["domains"].items()}
    assert domains["General"] == pytest.approx(expected["Dark Zurich"])
    assert domains["Medical Sciences"] == pytest.approx(expected["PAXRay-4"])
    assert domains["Agriculture and Biology"] == pytest.approx(expected["SUIM"])
    assert domains["Earth Monitoring"] is None
    assert summary["domains"]["Engineering"]["datasets"] == 0
    assert domains["Non-general"] == pytest.approx((expected["PAXRay-4"] + expected["SUIM"]) / 2)
    assert domains["Mean"] == pytest.approx(np.mean(list(expected.values())))
    for name in ("suim_sem_seg_test", "paxray_sem_seg_test_bones", "dark_zurich_sem_seg_val"):
        assert (out / name / "results.md").is_file()  # a table per dataset
    printed = capsys.readouterr().out
    assert "| PAXRay-4 | Medical Sciences |" in printed and "| Non-general | 2 |" in printed
    assert _eval(root, "mess", out) == 0  # resumed from the records
    assert capsys.readouterr().out == printed


def test_the_papers_numbers_stand_beside_lposs(tmp_path, tiny_clip, tiny_dino):
    _suim(tmp_path / "data", n=1)
    segmenter = Segmenter(tiny_clip, tiny_dino, LPOSSConfig(k=5, short_side=48))
    dataset = get_dataset("mess:suim", tmp_path / "data")
    table = evaluate_mess([dataset], segmenter, method="lposs+").to_markdown()
    assert "| SUIM | Agriculture and Biology |" in table and table.count("| 40.3 |") == 1
    assert "| Agriculture and Biology | 1 |" in table and "| 31.3 |" in table
    assert "lposs+ with DINO ViT-B/16, 224 x 224 windows" in table
    ensemble = Segmenter(tiny_clip, tiny_dino, segmenter.config.replace(
        windows=((224, 112), (448, 224))))
    table = evaluate_mess([dataset], ensemble, method="lposs").to_markdown()
    assert table.count("| 40.1 |") == 1 and "| 30.7 |" in table and "ensemble windows" in table
    table = evaluate_mess([dataset], segmenter, method="maskclip").to_markdown()
    assert "The paper has no row" in table and "| SUIM | Agriculture and Biology |" in table


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lposs: error:"), err
    return err[0]


def test_bad_mess_input_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert _eval(tmp_path / "data", "mess:nope", tmp_path / "o") == 1
    assert "unknown MESS dataset 'nope'" in _one_error(capsys)
    assert _eval(tmp_path / "data", "mess:cwfid", tmp_path / "o") == 1
    assert "mess.prepare_all_datasets" in _one_error(capsys)
    assert _eval(tmp_path / "data", "mess", tmp_path / "o") == 1
    assert "no MESS dataset found" in _one_error(capsys)
    _suim(tmp_path / "data")
    assert _eval(tmp_path / "data", "mess", tmp_path / "o", "--sweep", "k=1,2") == 1
    assert "--sweep" in _one_error(capsys)


def test_without_mess_benchmark_a_one_line_error(tmp_path):
    code = ("import sys; sys.modules['mess'] = None; from lposs.cli import main; "
            f"sys.exit(main(['eval', '--dataset', 'mess:suim', '--data-root', {str(tmp_path)!r},"
            " '--method', 'oracle']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "pip install 'lposs[mess]'" in done.stderr
