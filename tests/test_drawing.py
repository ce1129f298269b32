"""Tests for lposs.output.drawing: the palette, pixel shares, the overlay with its legend."""

import numpy as np
import pytest
import torch
from PIL import Image

from lposs.output.drawing import UNKNOWN_COLOR, class_shares, overlay, palette
from lposs.output.files import save_overlay


def as_hwc(t):
    return t.permute(1, 2, 0).numpy()


def _voc(i):
    """VOC's bitget colour of index i, written out bit by bit."""
    r = g = b = 0
    for j in range(8):
        r |= ((i >> (3 * j)) & 1) << (7 - j)
        g |= ((i >> (3 * j + 1)) & 1) << (7 - j)
        b |= ((i >> (3 * j + 2)) & 1) << (7 - j)
    return [r, g, b]


def test_palette_is_voc_without_dark_colours():
    colors = palette(256)
    assert colors.dtype == np.uint8 and colors.shape == (256, 3)
    assert colors[:5].tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                   [128, 0, 128]]
    expected = [_voc(i) for i in range(1, 400) if max(_voc(i)) >= 128
                and tuple(_voc(i)) != UNKNOWN_COLOR][:256]
    assert colors.tolist() == expected
    assert colors.max(axis=1).min() >= 128  # no black or near-black class
    assert UNKNOWN_COLOR not in {tuple(c) for c in colors.tolist()}
    big = palette(5000)
    assert len({tuple(c) for c in big.tolist()}) == 5000
    np.testing.assert_array_equal(big[:256], colors)
    assert palette(0).shape == (0, 3)


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
    assert first_row(colors[1]) is None  # a class with no pixel gets no colour square

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


def _font():
    from lposs.output.drawing import _legend_font

    return _legend_font(12)


@pytest.mark.parametrize("name", ["house", "número", "σπίτι", "дом", "Ærøskøbing"])
def test_the_shipped_font_draws_latin_greek_and_cyrillic(name):
    from lposs.output.drawing import drawable

    assert drawable(_font(), name)


@pytest.mark.parametrize("name", ["房子", "家", "cat 猫"])
def test_names_the_font_cannot_draw_are_shown_by_index(name):
    from lposs.output.drawing import drawable, legend_lines

    font = _font()
    assert not drawable(font, name)
    entries, not_found = legend_lines(font, ["sky", name, "road"], [0.5, 0.5, 0.0, 0.0], 300)
    assert [lines for _, lines in entries] == [["sky  50.0%"], ["#1  50.0%"]]
    assert not_found == ["not found: road"]


def test_legend_lists_absent_classes_as_not_found():
    from lposs.output.drawing import legend_lines

    entries, not_found = legend_lines(_font(), ["a", "b", "c", "d"],
                                      [0.25, 0.0, 0.5, 0.0, 0.25], 300, unknown_name="?")
    assert [i for i, _ in entries] == [2, 0, 4]  # by share; unknown is index C
    assert entries[2][1] == ["?  25.0%"]
    assert not_found == ["not found: b, d"]


def test_long_names_wrap_and_end_in_an_ellipsis():
    from lposs.output.drawing import wrap_text

    font = _font()
    lines = wrap_text(font, "x" * 500, 150, suffix="  12.5%")
    assert len(lines) == 2 and lines[1].endswith("\u2026  12.5%")
    assert all(font.getlength(line) <= 150 for line in lines)
    assert "".join(lines).count("x") < 500
    words = wrap_text(font, "green grass and trees", 100, max_lines=3)
    assert " ".join(words) == "green grass and trees"  # broken at spaces, nothing lost
    assert wrap_text(font, "sky", 100, suffix="  1.0%") == ["sky  1.0%"]


def test_legend_width_is_bounded_by_the_image_or_320_px():
    image = torch.rand(3, 50, 200)
    labels = np.zeros((50, 200), dtype=np.int64)
    labels[:, 100:] = 1
    out = overlay(image, labels, ["y" * 500, "sky"], palette(2))
    assert 200 < out.width <= 200 + 320
    wide = torch.rand(3, 50, 600)
    out = overlay(wide, np.zeros((50, 600), dtype=np.int64), ["z" * 500], palette(1))
    assert 600 < out.width <= 1200
