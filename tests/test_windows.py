import math

import pytest
import torch
import torch.nn.functional as F

from lposs.pipeline.windows import (
    crop_windows,
    patch_positions,
    stitch_windows,
    window_grid,
    window_setups,
)

SIZES = [(1, 1), (5, 300), (100, 150), (224, 224), (225, 224), (335, 336), (336, 337),
         (447, 448), (448, 448), (448, 597), (449, 1000), (1000, 449), (223, 900)]


def reference_boxes(height, width, size, stride):
    """Independent re-derivation: walk the starts, clamp the last window to the border."""

    def spans(length):
        if length <= size:
            return [(0, length)]
        out, start = [], 0
        while True:
            if start + size >= length:
                out.append((length - size, length))
                break
            out.append((start, start + size))
            start += stride
        return out

    return [(y1, x1, y2, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("size,stride", [(224, 112), (448, 224), (100, 37)])
def test_window_grid_matches_reference(height, width, size, stride):
    boxes = window_grid(height, width, size=size, stride=stride)
    assert boxes.dtype == torch.long
    assert [tuple(b) for b in boxes.tolist()] == reference_boxes(height, width, size, stride)
    # every window has the same size and the union covers every pixel
    hs, ws = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert set(hs.tolist()) == {min(size, height)} and set(ws.tolist()) == {min(size, width)}
    covered = torch.zeros(height, width, dtype=torch.bool)
    for y1, x1, y2, x2 in boxes.tolist():
        covered[y1:y2, x1:x2] = True
    assert covered.all()


def test_window_grid_known_cases():
    boxes = window_grid(448, 597)
    assert boxes.shape == (15, 4)
    assert boxes[-1].tolist() == [224, 373, 448, 597]  # last window hugs both borders
    assert boxes[4].tolist() == [0, 373, 224, 597]
    assert boxes[3].tolist() == [0, 336, 224, 560]
    assert window_grid(100, 150).tolist() == [[0, 0, 100, 150]]
    assert window_grid(448, 448).shape == (9, 4)


def test_crop_windows_content():
    image = torch.rand(3, 30, 50)
    boxes = torch.tensor([[0, 0, 20, 21], [10, 29, 30, 50]])
    crops = crop_windows(image, boxes)
    assert crops.shape == (2, 3, 20, 21)
    torch.testing.assert_close(crops[0], image[:, 0:20, 0:21])
    torch.testing.assert_close(crops[1], image[:, 10:30, 29:50])


def test_window_setups_without_windows_is_the_whole_image():
    assert [b.tolist() for b in window_setups(30, 50, None)] == [[[0, 0, 30, 50]]]
    two = window_setups(300, 470, ((224, 112), (448, 224)))
    assert [b.tolist() for b in two] == [window_grid(300, 470).tolist(),
                                         window_grid(300, 470, size=448, stride=224).tolist()]


def test_patch_positions():
    boxes = torch.tensor([[0, 0, 32, 48], [10, 20, 42, 68]])
    pos = patch_positions(boxes, (2, 3), 16)
    assert pos.dtype == torch.float32 and pos.shape == (12, 2)
    expected = []
    for y1, x1, _, _ in boxes.tolist():
        for row in range(2):
            for col in range(3):
                expected.append((y1 + 8 + row * 16, x1 + 8 + col * 16))
    assert pos.tolist() == [list(map(float, p)) for p in expected]
    assert patch_positions(boxes, (1, 1), 7).tolist() == [[3.5, 3.5], [13.5, 23.5]]


def test_stitch_constant_windows_gives_constant_image():
    boxes = window_grid(300, 470)
    scores = torch.full((len(boxes), 4, 14, 14), 2.5)
    out = stitch_windows(scores, boxes, 300, 470, patch_size=16)
    assert out.shape == (4, 300, 470)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_stitch_averages_overlaps():
    height, width, patch = 300, 470, 16
    boxes = window_grid(height, width)
    values = torch.arange(1, len(boxes) + 1, dtype=torch.float64) * 3.0
    scores = values[:, None, None, None].expand(-1, 2, 14, 14).clone()
    scores[:, 1] *= -1
    out = stitch_windows(scores, boxes, height, width, patch_size=patch)
    assert out.dtype == torch.float64
    # independent: for each pixel, the mean of the values of the windows containing it
    ys = torch.arange(height)[:, None]
    xs = torch.arange(width)[None, :]
    num = torch.zeros(height, width, dtype=torch.float64)
    den = torch.zeros(height, width, dtype=torch.float64)
    for (y1, x1, y2, x2), v in zip(boxes.tolist(), values.tolist(), strict=True):
        inside = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
        num += inside * v
        den += inside
    torch.testing.assert_close(out[0], num / den)
    torch.testing.assert_close(out[1], -num / den)
    assert math.isclose(out[0, 0, 0].item(), 3.0)  # corner pixel: only window 1
    assert math.isclose(out[0, 150, 150].item(), (3 * (1 + 2 + 5 + 6)) / 4)


def test_stitch_single_window_equals_interpolate():
    grid = torch.randn(5, 14, 14)
    boxes = window_grid(224, 224)
    out = stitch_windows(grid[None], boxes, 224, 224, patch_size=16)
    ref = F.interpolate(grid[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("height,width,size,stride", [(300, 470, 224, 112),
                                                     (520, 230, 448, 224), (90, 700, 224, 96)])
def test_stitch_random_windows_in_any_order_equal_resize_and_add(height, width, size, stride):
    boxes = window_grid(height, width, size=size, stride=stride)
    cells = size // 16
    order = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(0))
    boxes = boxes[order]
    scores = torch.randn(len(boxes), 3, cells, cells, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    out = stitch_windows(scores, boxes, height, width, patch_size=16)
    total = torch.zeros(3, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for grid, (y1, x1, y2, x2) in zip(scores, boxes.tolist(), strict=True):
        up = F.interpolate(grid[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                           align_corners=False)[0]
        total[:, y1:y2, x1:x2] += up
        count[y1:y2, x1:x2] += 1
    torch.testing.assert_close(out, total / count, rtol=0, atol=1e-12)


def test_stitch_small_image_resizes_the_grid_straight_to_the_window():
    # a 20x30 image is one window padded to 32x32 (2x2 patches of 16); as the paper's code,
    # the 2x2 grid is resized to the window's 20x30 pixels, not to 32x32 and then cropped
    grid = torch.randn(3, 2, 2)
    out = stitch_windows(grid[None], window_grid(20, 30), 20, 30, patch_size=16)
    ref = F.interpolate(grid[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref)
    cropped = F.interpolate(grid[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(out, cropped[:, :20, :30])


def test_stitch_keeps_half_dtype():
    boxes = window_grid(224, 336)
    scores = torch.randn(len(boxes), 2, 14, 14).half()
    out = stitch_windows(scores, boxes, 224, 336, patch_size=16)
    assert out.dtype == torch.float16 and out.shape == (2, 224, 336)


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    from lposs.pipeline.windows import pad_to_multiple

    x = torch.rand(2, 3, 5, 7) + 1
    out = pad_to_multiple(x, 4)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[..., :5, :7], x) and out[..., 5:, :].abs().sum() == 0
    assert out[..., :, 7:].abs().sum() == 0
    assert pad_to_multiple(x[..., :4, :4], 4) is not None and pad_to_multiple(x, 1) is x
