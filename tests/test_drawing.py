"""Tests for lposs.drawing: the palette, pixel shares, the overlay with its legend."""

import numpy as np
import pytest
import torch
from PIL import Image

from lposs.drawing import UNKNOWN_COLOR, class_shares, overlay, palette
from lposs.files import save_overlay


def as_hwc(t):
    return t.permute(1, 2, 0).numpy()


def test_palette():
    colors = palette(256)
    assert colors.dtype == np.uint8 and colors.shape == (256, 3)
    assert colors[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                   [0, 0, 128]]
    assert colors[15].tolist() == [192, 128, 128] and colors[20].tolist() == [0, 64, 128]
    assert tuple(colors[255]) == UNKNOWN_COLOR
    big = palette(5000)
    assert len({tuple(c) for c in big.tolist()}) == 5000
    np.testing.assert_array_equal(big[:256], colors)


def test_overlay_blend_and_legend(tmp_path):
    image = torch.rand(3, 40, 60)
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[:, 40:] = 2  # class 2: a third
    labels[:5, :5] = 3  # unknown (3 classes)
    colors = palette(3)
    colors[0] = (10, 200, 30)  # a colour that cannot come from the blend by accident
    out = overlay(image, labels, ["sky", "tree", "road"], colors, alpha=0.4)
    assert out.mode == "RGB" and out.width > 60 and out.height >= 40
    canvas = np.asarray(out).astype(np.int64)
    table = np.concatenate([colors, [UNKNOWN_COLOR]]).astype(np.float64)
    expected = 0.6 * as_hwc(image).astype(np.float64) * 255 + 0.4 * table[labels]
    assert np.abs(canvas[:40, :60] - expected).max() <= 1

    panel = canvas[:, 60:]

    def first_row(color):
        rows = np.nonzero((panel == np.array(color)).all(axis=2).any(axis=1))[0]
        return rows[0] if len(rows) else None

    rows = [first_row(colors[0]), first_row(colors[2]), first_row(UNKNOWN_COLOR)]
    assert None not in rows and rows == sorted(rows)  # ordered by share
    assert first_row(colors[1]) is None  # absent classes are not listed

    save_overlay(tmp_path / "o.png", out)
    with Image.open(tmp_path / "o.png") as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(out))


def test_overlay_takes_the_shares_it_is_given():
    image = torch.rand(3, 8, 8)
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:, 4:] = 1
    colors = palette(2)
    computed = overlay(image, labels, ["a", "b"], colors)
    given = overlay(image, labels, ["a", "b"], colors, shares=class_shares(labels, 2))
    np.testing.assert_array_equal(np.asarray(given), np.asarray(computed))
    with pytest.raises(ValueError, match="shares"):
        overlay(image, labels, ["a", "b"], colors, shares=[0.5, 0.5])


def test_class_shares():
    labels = np.array([[0, 0, 1, 5], [255, 1, 1, 0]])
    shares = class_shares(torch.from_numpy(labels), 3)
    assert shares == pytest.approx([3 / 8, 3 / 8, 0.0, 2 / 8])
