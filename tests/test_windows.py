import math

import pytest
import torch
import torch.nn.functional as F

from lposs.pipeline.windows import (
    BandResize,
    crop_windows,
    patch_positions,
    resize_image,
    stitch_windows,
    window_grid,
    working_size,
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


@pytest.mark.parametrize("bad", [dict(height=0, width=5), dict(height=5, width=-1),
                                 dict(height=5, width=5, size=0),
                                 dict(height=5, width=5, stride=0)])
def test_window_grid_rejects_non_positive(bad):
    with pytest.raises(ValueError):
        window_grid(**bad)


def test_working_size():
    assert working_size(500, 375) == (597, 448)  # 500 * 448 / 375 = 597.33
    assert working_size(375, 500) == (448, 597)
    assert working_size(448, 448) == (448, 448)
    assert working_size(10, 10) == (448, 448)
    assert working_size(2, 3) == (448, 672)
    assert working_size(896, 1793) == (448, 897)  # 896.5 rounds half up, like mmcv
    for h, w in [(333, 777), (1080, 1920), (4000, 3000), (281, 500)]:
        out = working_size(h, w)
        assert min(out) == 448
        long_side = max(h, w) * 448 / min(h, w)
        assert abs(max(out) - long_side) <= 0.5
    with pytest.raises(ValueError):
        working_size(0, 5)


def test_working_size_caps_the_long_side_like_mmseg():
    # scale = min(2048 / long, 448 / short); sides int(side * scale + 0.5), worked by hand
    assert working_size(300, 1500) == (410, 2048)  # 2048/1500: 300 * 1.36533 = 409.6
    assert working_size(1500, 300) == (2048, 410)
    assert working_size(2, 5000) == (1, 2048)  # 2 * 0.4096 = 0.82 -> 1
    assert working_size(5000, 2) == (2048, 1)
    assert working_size(1, 100_000) == (1, 2048)  # 0.02 would round to 0: kept at 1 pixel
    assert working_size(448, 2048) == (448, 2048)  # exactly at the ratio: both limits agree
    assert working_size(100, 500, short_side=224, long_side=1000) == (200, 1000)
    # below the ratio 2048 / 448 the cap changes nothing
    assert working_size(375, 1700) == (448, int(1700 * 448 / 375 + 0.5))


def test_resize_image_matches_interpolate_and_keeps_dtype():
    image = torch.rand(3, 37, 53)
    out = resize_image(image, (20, 30))
    ref = F.interpolate(image[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref)
    half = resize_image(image.half(), (20, 30))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-3, rtol=0)
    with pytest.raises(ValueError):
        resize_image(torch.rand(37, 53), (5, 5))


def test_resize_image_of_uint8_is_opencv_bilinear_over_255():
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(61, 97, 3), dtype=np.uint8)
    for size in [(40, 63), (448, 712), (61, 97), (1, 30)]:
        out = resize_image(torch.from_numpy(pixels).permute(2, 0, 1), size)
        ref = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        assert out.dtype == torch.float32 and out.shape == (3, *size)
        expected = torch.from_numpy(ref.reshape(*size, 3)).permute(2, 0, 1).float() / 255
        assert torch.equal(out, expected)
    # fixed-point OpenCV is not the rounded float resize (why the uint8 path exists)
    as_float = resize_image(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, (40, 63))
    as_uint8 = resize_image(torch.from_numpy(pixels).permute(2, 0, 1), (40, 63))
    assert not torch.equal((as_float * 255).round(), as_uint8 * 255)


def test_crop_windows_content_and_zero_padding():
    image = torch.rand(3, 30, 50)
    boxes = torch.tensor([[0, 0, 20, 21], [10, 29, 30, 50]])
    crops = crop_windows(image, boxes, multiple=8)
    assert crops.shape == (2, 3, 24, 24)
    torch.testing.assert_close(crops[0, :, :20, :21], image[:, 0:20, 0:21])
    torch.testing.assert_close(crops[1, :, :20, :21], image[:, 10:30, 29:50])
    assert (crops[:, :, 20:, :] == 0).all() and (crops[:, :, :, 21:] == 0).all()
    exact = crop_windows(image, torch.tensor([[0, 0, 16, 16]]), multiple=16)
    assert exact.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError):
        crop_windows(image, torch.tensor([[0, 0, 20, 20], [0, 0, 10, 10]]), multiple=8)
    with pytest.raises(ValueError):
        crop_windows(image, torch.tensor([[0, 0, 31, 10]]), multiple=8)


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


def test_stitch_keeps_half_dtype_and_validates():
    boxes = window_grid(224, 336)
    scores = torch.randn(len(boxes), 2, 14, 14).half()
    out = stitch_windows(scores, boxes, 224, 336, patch_size=16)
    assert out.dtype == torch.float16 and out.shape == (2, 224, 336)
    with pytest.raises(ValueError, match="uncovered"):
        stitch_windows(scores[:1], boxes[:1], 224, 336, patch_size=16)
    with pytest.raises(ValueError, match="windows"):
        stitch_windows(scores, boxes[:1], 224, 336, patch_size=16)
    with pytest.raises(ValueError, match="patch grid"):
        stitch_windows(scores, boxes, 224, 336, patch_size=8)


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    from lposs.pipeline.windows import pad_to_multiple

    x = torch.rand(2, 3, 5, 7) + 1
    out = pad_to_multiple(x, 4)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[..., :5, :7], x) and out[..., 5:, :].abs().sum() == 0
    assert out[..., :, 7:].abs().sum() == 0
    assert pad_to_multiple(x[..., :4, :4], 4) is not None and pad_to_multiple(x, 1) is x


@pytest.mark.parametrize(("source", "target"), [
    ((448, 597), (375, 500)),    # a VOC photo's working size back to the photo (down)
    ((448, 672), (2000, 3000)),  # up, by a non-integer factor
    ((33, 71), (1000, 333)),     # up in rows, down in columns
    ((1, 5), (7, 3)),            # a single source row
])
def test_band_resize_is_interpolate_a_band_at_a_time(source, target):
    planes = torch.randn(3, *source, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(planes[None], size=target, mode="bilinear", align_corners=False)[0]
    resize = BandResize(source, target)
    for rows in (1, 7, 64, target[0]):
        bands = [resize.band(planes, top, bottom) for top, bottom in resize.bands(rows)]
        assert [b.shape[-2] for b in bands] == [min(rows, target[0] - t)
                                                for t in range(0, target[0], rows)]
        out = torch.cat(bands, dim=-2)
        torch.testing.assert_close(out, expected, rtol=0, atol=4e-7)  # a float32 rounding
        assert torch.equal(out.argmax(0), expected.argmax(0))


def test_band_resize_refuses_the_wrong_plane_or_band():
    resize = BandResize((10, 20), (30, 40))
    with pytest.raises(ValueError, match=r"\(\.\.\., 10, 20\)"):
        resize.band(torch.zeros(3, 20, 10), 0, 5)
    with pytest.raises(ValueError, match="outside"):
        resize.band(torch.zeros(10, 20), 25, 31)
