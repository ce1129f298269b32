"""Tests for lposs.pipeline.image - decoding, finding files, label maps, the working size."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lposs.errors import ImageError
from lposs.pipeline.image import (
    IMAGE_SUFFIXES,
    find_images,
    load_label_map,
    read_image,
    resize_image,
    working_size,
)


def load_image(source, **kwargs):
    """``read_image`` as float in [0, 1] (8-bit values / 255)."""
    image = read_image(source, **kwargs)
    return image.float() / 255 if image.dtype == torch.uint8 else image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def as_hwc(t):
    return t.permute(1, 2, 0).numpy()


def grey3(values):
    return np.repeat(values[..., None], 3, axis=2)


# ----------------------------------------------------------------------------- load_image
def test_rgb_file_and_pil_and_array_agree(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "x.png")
    expected = RGB.astype(np.float32) / 255
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(RGB), RGB):
        out = load_image(source)
        assert out.shape == (3, 20, 30) and out.dtype == torch.float32
        np.testing.assert_allclose(as_hwc(out), expected, atol=1e-7)


def test_modes_are_converted(tmp_path):
    grey = RGB[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    np.testing.assert_allclose(as_hwc(load_image(tmp_path / "l.png")), grey3(grey / 255), atol=1e-6)

    la = np.stack([grey, RGB[..., 1]], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(as_hwc(load_image(tmp_path / "la.png")), grey3(grey / 255),
                               atol=1e-6)

    rgba = np.concatenate([RGB, RNG.integers(0, 256, (20, 30, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")  # alpha is dropped, colours kept
    np.testing.assert_allclose(as_hwc(load_image(tmp_path / "rgba.png")), RGB / 255, atol=1e-6)

    table = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    p_img = Image.frombytes("P", (30, 20), index.tobytes())
    p_img.putpalette(table.reshape(-1).tolist())
    p_img.info["transparency"] = 3
    p_img.save(tmp_path / "p.png", transparency=3)
    np.testing.assert_allclose(as_hwc(load_image(tmp_path / "p.png")), table[index] / 255,
                               atol=1e-6)

    cmyk = Image.fromarray(RGB).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tiff")
    expected = np.asarray(cmyk.convert("RGB")) / 255
    np.testing.assert_allclose(as_hwc(load_image(tmp_path / "cmyk.tiff")), expected, atol=1e-6)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 1000], [30000, 40000, 65000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_allclose(as_hwc(out), grey3(values / 65535), atol=1e-6)
    assert len(np.unique(out[0].numpy())) == values.size  # nothing saturated


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :20] = (255, 0, 0)  # left half red, right half blue
    img[:, 20:] = (0, 0, 255)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    pil.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (3, 40, 20)
    top, bottom = out[:, :15].mean(dim=(1, 2)), out[:, 25:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < 0.1  # the left (red) half is now on top
    assert bottom[2] > 0.9 and bottom[0] < 0.1


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"cut.{suffix}"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut"):
        load_image(path)


def test_unreadable_inputs(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png.*not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="not found.*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(TypeError):
        load_image(12)


def test_pixel_cap(tmp_path, monkeypatch):
    Image.fromarray(RGB).save(tmp_path / "x.png")
    with pytest.raises(ImageError, match="--max-pixels"):
        load_image(tmp_path / "x.png", max_pixels=599)
    with pytest.raises(ImageError, match="--max-pixels"):
        load_image(RGB, max_pixels=599)
    assert load_image(tmp_path / "x.png", max_pixels=600).shape == (3, 20, 30)
    # Pillow's own global limit neither fires nor warns; ours decides, and it is restored
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "x.png", max_pixels=None).shape == (3, 20, 30)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(RGB, max_pixels=0)


def test_arrays():
    grey = RGB[..., 0]
    np.testing.assert_allclose(as_hwc(load_image(grey)), grey3(grey / 255), atol=1e-6)
    rgba = np.concatenate([RGB, np.zeros((20, 30, 1), np.uint8)], axis=2)
    np.testing.assert_allclose(as_hwc(load_image(rgba)), RGB / 255, atol=1e-6)
    floats = RNG.random((20, 30, 3))
    np.testing.assert_allclose(as_hwc(load_image(floats)), floats, atol=1e-6)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(floats * 2)
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan))
    with pytest.raises(TypeError, match="dtype"):
        load_image(RGB.astype(np.int32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))


def test_tensors():
    t = torch.rand(3, 8, 9)
    out = load_image(t)
    torch.testing.assert_close(out, t)
    out[0, 0, 0] = 5.0
    assert t[0, 0, 0] <= 1  # a copy, not a view
    torch.testing.assert_close(load_image(t.double()), t)
    u8 = torch.from_numpy(RGB).permute(2, 0, 1)
    np.testing.assert_allclose(as_hwc(load_image(u8)), RGB / 255, atol=1e-6)
    assert load_image(torch.rand(1, 5, 6)).shape == (3, 5, 6)
    with pytest.raises(ImageError, match="channels first"):
        load_image(torch.rand(8, 9, 3))
    with pytest.raises(ImageError, match="NaN"):
        load_image(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(TypeError):
        load_image(torch.zeros(3, 2, 2, dtype=torch.int64))


# ----------------------------------------------------------------------------- find_images


def test_find_images(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ["a/x.jpg", "a/sub/y.PNG", "a/.hidden/z.png", "a/.w.png", "b.png", "c.webp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("x")
    inputs = [str(tmp_path / "a"), str(tmp_path / "b.png"), str(tmp_path / "*.png"),
              str(tmp_path / "a" / "x.jpg"), str(tmp_path / "nope.jpg"),
              str(tmp_path / "empty"), str(tmp_path / "*.gif")]
    found, missing = find_images(inputs)
    assert found == [tmp_path / "a" / "sub" / "y.PNG", tmp_path / "a" / "x.jpg",
                     tmp_path / "b.png"]
    assert missing == [str(tmp_path / "nope.jpg"), str(tmp_path / "empty"),
                       str(tmp_path / "*.gif")]
    found, missing = find_images([str(tmp_path / "**" / "*.jpg"), str(tmp_path / "c.webp")])
    assert found == [tmp_path / "a" / "x.jpg", tmp_path / "c.webp"] and missing == []
    with pytest.raises(TypeError):
        find_images(str(tmp_path))


def test_image_suffixes_are_the_folder_dataset_images(tmp_path):
    from lposs.evaluation.datasets import FolderDataset

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    # every suffix Pillow opens, not a fixed list: .jfif, .avif and .qoi too (issue 21)
    suffixes = [".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                ".avif", ".qoi", ".ppm"]
    assert set(suffixes) <= set(IMAGE_SUFFIXES) and ".txt" not in IMAGE_SUFFIXES
    for i, suffix in enumerate(suffixes):
        Image.fromarray(RGB).save(images / f"s{i}{suffix}")
        Image.fromarray(RGB[..., 0]).save(masks / f"s{i}.png")
    (images / "notes.txt").write_text("x")
    dataset = FolderDataset(images, masks, ["a"])
    assert sorted(s.image_path.suffix for s in dataset) == sorted(suffixes)
    found, _ = find_images([images])
    assert sorted(p.suffix for p in found) == sorted(suffixes)
    assert all(read_image(p).shape == (3, 20, 30) for p in found)


# ----------------------------------------------------------------------------- label maps
def test_load_label_map_errors(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match="mode 'RGB'"):
        load_label_map(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match="not found"):
        load_label_map(tmp_path / "none.png")
    (tmp_path / "t.png").write_text("x")
    with pytest.raises(ImageError, match="not an image"):
        load_label_map(tmp_path / "t.png")
    grey = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "g.png").numpy(), grey)


def test_load_label_map_reads_palette_indices_bilevel_and_16_bit(tmp_path):
    values = RNG.integers(0, 256, (7, 9), dtype=np.uint8)
    indexed = Image.frombytes("P", (9, 7), values.tobytes())  # colours differ from indices
    indexed.putpalette(list(range(255, -1, -1)) * 3)
    indexed.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "p.png").numpy(), values)
    bits = RNG.integers(0, 2, (7, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "b.png").numpy(), bits.astype(int))
    wide = RNG.integers(0, 65535, (7, 9)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "w.png").numpy(), wide)


def test_label_map_larger_than_the_pixel_cap_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400), np.uint8), mode="L").save(path)  # 120,000 pixels
    assert load_label_map(path, max_pixels=120_000).shape == (300, 400)
    with pytest.raises(ImageError, match="big.png"):
        load_label_map(path, max_pixels=119_999)


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
