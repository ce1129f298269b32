"""Tests for lposs.evaluation.metrics against independent numpy computations written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lposs.evaluation.metrics import SegmentationMetrics, boundary_iou, mean_iou, oracle_labels

VOC_MASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012_val_masks"


# ----------------------------------------------------------------------------- references
def ref_confusion(pred, gt, num_classes, ignore_index=255):
    """Pixel by pixel: rows gt, columns pred, last column out-of-range predictions."""
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for p, g in zip(np.asarray(pred).ravel().tolist(), np.asarray(gt).ravel().tolist()):
        if g == ignore_index:
            continue
        conf[g, p if 0 <= p < num_classes else num_classes] += 1
    return conf


def ref_scores(conf):
    """mIoU etc. from a confusion matrix, NaN classes skipped."""
    tp = np.diag(conf[:, :-1]).astype(float)
    gt_area, pred_area = conf.sum(1), conf[:, :-1].sum(0)
    union = gt_area + pred_area - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_area > 0, tp / gt_area, np.nan)
    return iou, acc


def ref_erode(mask, iterations):
    """Iterated 3x3 erosion; outside the image is background (explicit neighbour checks)."""
    m = mask.astype(bool)
    h, w = m.shape
    for _ in range(iterations):
        padded = np.zeros((h + 2, w + 2), dtype=bool)
        padded[1:-1, 1:-1] = m
        out = np.ones_like(m)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out &= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        m = out
    return m


def ref_boundary_counts(pred, gt, num_classes, ignore_index=255, ratio=0.02, d=None):
    """Cheng et al. per class: band = mask - erosion, pred ignored where gt is ignored."""
    pred = np.array(pred, dtype=np.int64)
    gt = np.asarray(gt, dtype=np.int64)
    pred[gt == ignore_index] = ignore_index
    h, w = gt.shape
    if d is None:
        d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
    inter = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        g, p = gt == c, pred == c
        g_band, p_band = g & ~ref_erode(g, d), p & ~ref_erode(p, d)
        inter[c] = (g_band & p_band).sum()
        union[c] = (g_band | p_band).sum()
    return inter, union


def ref_bilinear(x, out_h, out_w):
    """(K, H, W) bilinear resize, align_corners=False, no antialiasing, float64."""
    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = axis(x.shape[1], out_h)
    x0, x1, lx = axis(x.shape[2], out_w)
    rows = x[:, y0] * (1 - ly)[None, :, None] + x[:, y1] * ly[None, :, None]
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def blocky(rng, h, w, values, block):
    """A random label map made of block x block tiles, cropped to (h, w)."""
    tiles = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.kron(tiles, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.int64)


def counts(pred, gt, num_classes, **kwargs):
    """One image's confusion matrix and Boundary IoU counts, as ``update`` records them."""
    record = SegmentationMetrics(num_classes, **kwargs).update(pred, gt)
    return record["confusion"], record["boundary_intersection"], record["boundary_union"]


# ------------------------------------------------------------------------------- mIoU
def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [255, 2, 0]])
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]])  # last column: misses
    assert counts(pred, gt, 3)[0].tolist() == expected.tolist()
    result = SegmentationMetrics(3, boundary=False)
    result.update(pred, gt)
    out = result.compute()
    assert out["iou"] == pytest.approx([1 / 2, 1 / 3, 1.0])
    assert out["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert out["pixel_accuracy"] == pytest.approx(3 / 5)
    assert out["mean_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert out["num_pixels"] == 5 and out["num_images"] == 1
    assert mean_iou(pred, gt, 3) == pytest.approx(out["miou"])


def test_absent_classes_are_nan_and_skipped():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [255, 2, 0]])
    out = SegmentationMetrics(5, boundary=False)
    out.update(pred, gt)
    res = out.compute()
    assert all(math.isnan(v) for v in res["iou"][3:]) and all(
        math.isnan(v) for v in res["accuracy"][3:])
    assert res["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    # A class only predicted (never in gt) is not absent: its IoU is 0 and it counts.
    pred2 = pred.copy()
    pred2[0, 0] = 4
    assert mean_iou(pred2, gt, 5) == pytest.approx((0 + 1 / 3 + 1 + 0) / 4)


@pytest.mark.parametrize("miss", [3, 7, 255, -1])
def test_out_of_range_predictions_are_misses(miss):
    gt = np.array([[0, 1], [1, 2]])
    pred = np.array([[0, 1], [miss, 2]])
    conf = counts(torch.tensor(pred), torch.tensor(gt), 3)[0]
    assert conf.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    # Class 1: one hit, one gt pixel missed -> IoU 1/2 (the miss is a false negative).
    assert mean_iou(pred, gt, 3) == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_reduce_zero_label_shift():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 6, size=(7, 9))  # 0 = "other", classes 1..5
    shifted = np.where(raw == 0, 255, raw - 1)
    pred = rng.integers(0, 6, size=(7, 9))  # 5 is out of range after the shift: a miss
    conf = counts(pred, shifted, 5)[0]
    assert conf.numpy().tolist() == ref_confusion(pred, shifted, 5).tolist()
    iou, _ = ref_scores(ref_confusion(pred, shifted, 5))
    assert mean_iou(pred, shifted, 5) == pytest.approx(np.nanmean(iou))
    with pytest.raises(ValueError, match="gt holds labels"):
        SegmentationMetrics(5).update(pred, raw)  # forgot the shift: label 5 is not a class


def test_random_maps_match_reference():
    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = rng.choice([0, 1, 2, 3, 255], size=(13, 17))
        pred = rng.choice([0, 1, 2, 3, 4, 255], size=(13, 17))
        conf = ref_confusion(pred, gt, 4)
        assert counts(pred, gt, 4)[0].tolist() == conf.tolist()
        metrics = SegmentationMetrics(4, boundary=False)
        metrics.update(pred.astype(np.uint8), gt.astype(np.uint8))
        iou, acc = ref_scores(conf)
        res = metrics.compute()
        np.testing.assert_allclose(res["iou"], iou)
        np.testing.assert_allclose(res["accuracy"], acc)
        assert res["mean_accuracy"] == pytest.approx(np.nanmean(acc))
        assert res["pixel_accuracy"] == pytest.approx(np.trace(conf[:, :-1]) / conf.sum())


def test_streaming_equals_concatenation():
    rng = np.random.default_rng(2)
    sizes = [(5, 8), (11, 3), (7, 7), (1, 9)]
    gts = [rng.choice([0, 1, 2, 255], size=s) for s in sizes]
    preds = [rng.choice([0, 1, 2, 9], size=s) for s in sizes]
    streamed = SegmentationMetrics(3, boundary=False)
    for p, g in zip(preds, gts):
        streamed.update(p, g)
    big_p = np.concatenate([p.ravel() for p in preds])[None]
    big_g = np.concatenate([g.ravel() for g in gts])[None]
    assert streamed.confusion.tolist() == ref_confusion(big_p, big_g, 3).tolist()
    assert mean_iou(preds, gts, 3) == pytest.approx(mean_iou(big_p, big_g, 3))
    assert streamed.compute()["miou"] == pytest.approx(mean_iou(big_p, big_g, 3))


def test_merge_and_state_dict():
    rng = np.random.default_rng(3)
    pairs = [(blocky(rng, 30, 40, [0, 1, 2, 255], 5), blocky(rng, 30, 40, [0, 1, 2], 4))
             for _ in range(4)]
    whole, first, second = (SegmentationMetrics(3) for _ in range(3))
    records = []
    for i, (g, p) in enumerate(pairs):
        records.append(whole.update(p, g))
        (first if i < 2 else second).update(p, g)
    merged = SegmentationMetrics(3).merge(first.state_dict()).merge(second)
    from_records = SegmentationMetrics(3)
    for record in records:
        from_records.merge(record)
    for other in (merged, from_records):
        for name in ("confusion", "boundary_intersection", "boundary_union"):
            assert torch.equal(getattr(other, name), getattr(whole, name))
            assert getattr(other, name).dtype == torch.int64
        assert other.num_images == 4
        np.testing.assert_equal(other.compute(), whole.compute())
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(4).merge(whole)
    whole.reset()
    assert int(whole.confusion.sum()) == 0 and whole.num_images == 0


def test_input_validation():
    gt = np.zeros((4, 4), dtype=np.int64)
    metrics = SegmentationMetrics(2)
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(np.zeros((4, 5), dtype=np.int64), gt)
    with pytest.raises(TypeError, match="pred"):
        metrics.update(np.zeros((4, 4), dtype=np.float32), gt)
    with pytest.raises(ValueError, match="gt"):
        metrics.update(gt, np.zeros((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetrics(2, ignore_index=1)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="dilation_ratio"):
        SegmentationMetrics(2, dilation_ratio=0)
    with pytest.raises(ValueError, match="preds and gts"):
        mean_iou([gt, gt], [gt], 2)
    with pytest.raises(ValueError, match="patch_size"):
        oracle_labels(gt, patch_size=0)
    assert metrics.num_images == 0 and int(metrics.confusion.sum()) == 0  # nothing counted


# ------------------------------------------------------------------------ Boundary IoU
@pytest.mark.parametrize("size,d", [((375, 500), 12), ((10, 10), 1), ((300, 400), 10)])
def test_dilation_rounding(size, d):
    # diagonal 625: round(12.5) = 12 (half to even); 10 x 10: 0.28 -> at least 1
    rng = np.random.default_rng(d)
    gt, pred = blocky(rng, *size, [0, 1, 2], 13), blocky(rng, *size, [0, 1, 2], 11)
    _, inter, union = counts(pred, gt, 3)
    expected = ref_boundary_counts(pred, gt, 3, d=d)
    assert inter.tolist() == expected[0].tolist() and union.tolist() == expected[1].tolist()
    assert union.tolist() != ref_boundary_counts(pred, gt, 3, d=d + 1)[1].tolist()


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_boundary_band_equals_iterated_erosion(d):
    rng = np.random.default_rng(d)
    for h, w in [(23, 31), (9, 4), (1, 12), (12, 1), (40, 40)]:
        gt = blocky(rng, h, w, [0, 1, 2], int(rng.integers(1, 6)))
        pred = blocky(rng, h, w, [0, 1, 2], int(rng.integers(1, 6)))
        _, inter, union = counts(pred, gt, 3, dilation_ratio=d / math.hypot(h, w))
        expected = ref_boundary_counts(pred, gt, 3, d=d)
        assert inter.tolist() == expected[0].tolist()
        assert union.tolist() == expected[1].tolist()


def test_boundary_band_border_counts_as_boundary():
    full = np.ones((10, 12), dtype=np.int64)
    _, inter, union = counts(full, full, 2, dilation_ratio=2 / math.hypot(10, 12))
    assert inter.tolist() == union.tolist() == [0, 10 * 12 - 6 * 8]  # a ring 2 pixels wide


@pytest.mark.parametrize("size", [(40, 60), (80, 90), (110, 120)])
def test_boundary_iou_matches_reference(size):
    rng = np.random.default_rng(sum(size))
    metrics = SegmentationMetrics(4)
    inter_sum, union_sum = np.zeros(4, np.int64), np.zeros(4, np.int64)
    preds, gts = [], []
    for _ in range(3):
        gt = blocky(rng, *size, [0, 1, 2, 3, 255], int(rng.integers(6, 20)))
        pred = gt.copy()
        noise = blocky(rng, *size, [0, 1, 2, 3, 4, 255], 7)  # 4 and 255 are misses
        replace = blocky(rng, *size, [0, 0, 1], 9).astype(bool)
        pred[replace] = noise[replace]
        inter, union = ref_boundary_counts(pred, gt, 4)
        _, got_inter, got_union = counts(pred, gt, 4)
        assert got_inter.tolist() == inter.tolist() and got_union.tolist() == union.tolist()
        inter_sum += inter
        union_sum += union
        metrics.update(pred, gt)
        preds.append(pred)
        gts.append(gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_iou = np.where(union_sum > 0, inter_sum / union_sum, np.nan)
    res = metrics.compute()
    np.testing.assert_allclose(res["boundary_iou"], ref_iou)
    assert res["boundary_miou"] == pytest.approx(np.nanmean(ref_iou))
    assert boundary_iou(preds, gts, 4) == pytest.approx(np.nanmean(ref_iou))


def test_boundary_iou_ignore_and_perfect_prediction():
    gt = np.zeros((50, 50), dtype=np.int64)
    gt[10:30, 10:30] = 1
    gt[30:40] = 255
    assert boundary_iou(gt, gt, 2) == 1.0
    # Predictions under ignored ground truth do not matter.
    pred = gt.copy()
    pred[30:40] = 1
    assert boundary_iou(pred, gt, 2) == 1.0
    # A prediction that is all "unknown" hits nothing.
    assert boundary_iou(np.full_like(gt, 7), gt, 2) == 0.0


# ------------------------------------------------------------------------------- oracle
def ref_oracle(gt, patch=16):
    values = np.unique(gt)
    onehot = (gt[None] == values[:, None, None]).astype(np.float64)
    h, w = gt.shape
    small = ref_bilinear(onehot, max(1, h // patch), max(1, w // patch))
    back = ref_bilinear(small, h, w)
    top2 = np.sort(back, axis=0)[-2:] if len(values) > 1 else np.stack([back[0] - 1, back[0]])
    return values[back.argmax(0)], top2[1] - top2[0]


def test_oracle_grid_aligned_stripes_are_exact():
    gt = np.repeat(np.array([0, 3, 255, 1, 3]), 16)[:, None].repeat(70, axis=1)  # (80, 70)
    out = oracle_labels(gt)
    assert out.dtype == torch.int64 and out.shape == gt.shape
    assert out.numpy().tolist() == gt.tolist()  # 255 comes out where it dominates
    assert oracle_labels(gt.T.copy()).numpy().tolist() == gt.T.tolist()


def test_oracle_thin_line_disappears():
    gt = np.zeros((64, 64), dtype=np.uint8)
    gt[:, 30:32] = 5
    assert (oracle_labels(gt).numpy() == 0).all()


def test_oracle_matches_independent_bilinear():
    rng = np.random.default_rng(4)
    for h, w, block in [(75, 50, 7), (123, 97, 11), (10, 9, 3), (64, 48, 16)]:
        gt = blocky(rng, h, w, [0, 2, 7, 255], block)
        expected, margin = ref_oracle(gt)
        got = oracle_labels(torch.from_numpy(gt)).numpy()
        differ = got != expected
        assert (margin[differ] < 1e-5).all()  # only float32 near-ties may differ
        assert differ.mean() < 0.01
        assert set(np.unique(got)) <= set(np.unique(gt))


# ------------------------------------------------------------------------ real VOC masks
@pytest.mark.skipif(not VOC_MASKS.is_dir(), reason="../shared/data/voc2012_val_masks absent")
def test_real_voc_masks():
    from PIL import Image

    ids = (VOC_MASKS / "val.txt").read_text().split()[:3]
    metrics = SegmentationMetrics(21)
    conf = np.zeros((21, 22), np.int64)
    inter_sum, union_sum = np.zeros(21, np.int64), np.zeros(21, np.int64)
    for image_id in ids:
        gt = np.array(Image.open(VOC_MASKS / f"{image_id}.png")).astype(np.int64)
        assert set(np.unique(gt)) <= set(range(21)) | {255}
        pred = oracle_labels(gt).numpy()
        metrics.update(pred, gt)
        valid = gt != 255
        pred_col = np.where(pred < 21, pred, 21)
        conf += np.bincount(gt[valid] * 22 + pred_col[valid], minlength=462).reshape(21, 22)
        inter, union = ref_boundary_counts(pred, gt, 21)
        inter_sum += inter
        union_sum += union
        assert mean_iou(gt, gt, 21) == 1.0
    assert metrics.confusion.numpy().tolist() == conf.tolist()
    assert metrics.boundary_intersection.tolist() == inter_sum.tolist()
    assert metrics.boundary_union.tolist() == union_sum.tolist()
    res = metrics.compute()
    assert 0.5 < res["miou"] <= 1.0 and 0.3 < res["boundary_miou"] <= 1.0
