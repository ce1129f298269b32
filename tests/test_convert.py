"""Annotation converters: lookup tables, COCO RLE and polygons, atomic idempotent writing."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lposs.errors import DatasetError
from lposs.evaluation.convert import (
    CITYSCAPES_LUT,
    COCO_OBJECT_LUT,
    COCO_STUFF_LUT,
    convert_cityscapes,
    convert_coco_object,
    convert_coco_stuff,
    decode_rle,
    polygons_to_mask,
)
from lposs.evaluation.datasets import get_dataset

H, W = 32, 40
REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = json.loads((REPO / "src" / "lposs" / "data" / "class_names.json").read_text())
# COCO category ids 1..91 that COCO does not use, as raw COCO-Stuff values (id - 1).
UNUSED_RAW = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def write_raw(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Lookup tables against independent derivations


def test_coco_stuff_table():
    for raw in range(256):
        if raw <= 181 and raw not in UNUSED_RAW:
            expected = raw - sum(u < raw for u in UNUSED_RAW)
        else:
            expected = 255
        assert COCO_STUFF_LUT[raw] == expected, raw
    names = CLASS_NAMES["coco_stuff"]
    assert names[COCO_STUFF_LUT[0]] == "person" and names[COCO_STUFF_LUT[12]] == "stop sign"
    assert names[COCO_STUFF_LUT[89]] == "toothbrush" and names[COCO_STUFF_LUT[91]] == "banner"
    assert names[COCO_STUFF_LUT[181]] == "wood"
    assert sorted(set(COCO_STUFF_LUT.tolist()) - {255}) == list(range(171))


def test_coco_object_table():
    stuff_names, object_names = CLASS_NAMES["coco_stuff"], CLASS_NAMES["coco_object"]
    for raw in range(256):
        if raw in UNUSED_RAW or 182 <= raw <= 254:
            assert COCO_OBJECT_LUT[raw] == 255
        elif raw <= 89:  # things: their COCO-Stuff train id + 1, the same class name
            assert COCO_OBJECT_LUT[raw] == COCO_STUFF_LUT[raw] + 1
            same = {"airplane": "aeroplane"}.get(stuff_names[COCO_STUFF_LUT[raw]])
            assert object_names[COCO_OBJECT_LUT[raw]] in (stuff_names[COCO_STUFF_LUT[raw]], same)
        else:  # stuff and unlabeled: background
            assert COCO_OBJECT_LUT[raw] == 0


def test_cityscapes_table():
    train_ids = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    for raw in range(256):
        assert CITYSCAPES_LUT[raw] == train_ids.get(raw, 255)


# ---------------------------------------------------------------------------------------------
# Converting files


def coco_raw_layout(root: Path, splits=("val2017",)) -> dict[Path, np.ndarray]:
    """Raw COCO-Stuff PNGs with a few known ids; returns {raw path: raw label}."""
    out = {}
    for s, split in enumerate(splits):
        for i, stem in enumerate(["000000000139", "000000000285"]):
            raw = np.full((H, W), 255, dtype=np.uint8)
            raw[0, :7] = [0, 12, 89, 91, 181, 255, 26]
            raw[5:10, 5:10] = 57 + i + s
            path = root / "coco_stuff164k/annotations" / split / f"{stem}.png"
            write_raw(path, raw)
            out[path] = raw
            image = root / "coco_stuff164k/images" / split / f"{stem}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (W, H)).save(image)
    return out


def test_convert_coco_stuff_known_pixels_and_idempotence(tmp_path):
    raws = coco_raw_layout(tmp_path)
    calls = []
    result = convert_coco_stuff(tmp_path, progress=lambda *report: calls.append(report))
    assert (result.written, result.skipped, result.total) == (2, 0, 2)
    assert calls == [("converting annotations", i, 2) for i in range(3)]
    for raw_path in raws:
        out = raw_path.with_name(raw_path.stem + "_labelTrainIds.png")
        label = read_png(out)
        assert label.dtype == np.uint8 and label.shape == (H, W)
        # raw 0 person -> 0, 12 stop sign -> 11, 89 toothbrush -> 79, 91 banner -> 80,
        # 181 wood -> 170, 255 -> 255, 26 backpack -> 24; 57 -> 52 (5 unused ids below it)
        assert label[0, :7].tolist() == [0, 11, 79, 80, 170, 255, 24]
        assert label[5, 5] in (52, 53) and label[20, 20] == 255
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*_labelTrainIds.png")}
    again = convert_coco_stuff(tmp_path)
    assert (again.written, again.skipped) == (0, 2)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    forced = convert_coco_stuff(tmp_path, overwrite=True)
    assert (forced.written, forced.skipped) == (2, 0)
    assert no_temp_files(tmp_path)
    # The converted files are what the dataset reads (raw PNGs next to them are not samples).
    ds = get_dataset("coco_stuff", tmp_path)
    assert [s.id for s in ds] == ["000000000139", "000000000285"]
    np.testing.assert_array_equal(ds[0].load_label()[0, :7], [0, 11, 79, 80, 170, 255, 24])


def test_convert_coco_splits(tmp_path):
    coco_raw_layout(tmp_path, splits=("val2017", "train2017"))
    assert convert_coco_stuff(tmp_path, splits="val2017").written == 2
    assert not list((tmp_path / "coco_stuff164k/annotations/train2017").glob("*TrainIds.png"))
    result = convert_coco_stuff(tmp_path / "coco_stuff164k")  # default: every split present
    assert (result.written, result.skipped) == (2, 2)
    with pytest.raises(DatasetError, match="test2017"):
        convert_coco_stuff(tmp_path, splits=["test2017"])


def test_convert_coco_object_from_stuff_pngs(tmp_path):
    raws = coco_raw_layout(tmp_path)
    assert convert_coco_object(tmp_path).written == 2
    for raw_path in raws:
        label = read_png(raw_path.with_name(raw_path.stem + "_instanceTrainIds.png"))
        # things +1, stuff and unlabeled -> background 0
        assert label[0, :7].tolist() == [1, 12, 80, 0, 0, 0, 25]
        assert label[20, 20] == 0
    ds = get_dataset("coco_object", tmp_path)
    assert len(ds) == 2 and ds.classes[1] == "person"
    # coco_stuff outputs are not mistaken for raw input on a later run
    convert_coco_stuff(tmp_path)
    assert convert_coco_object(tmp_path).skipped == 2


def test_corrupt_input_is_reported_and_the_rest_converted(tmp_path, capsys):
    from lposs import cli

    raws = list(coco_raw_layout(tmp_path))
    bad = raws[0].with_name("000000000200.png")  # sorts between the two good files
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = convert_coco_stuff(tmp_path)
    assert (result.written, result.skipped) == (2, 0)
    assert len(result.failed) == 1 and "000000000200.png" in result.failed[0]
    outputs = sorted(p.name for p in bad.parent.glob("*_labelTrainIds.png"))
    assert outputs == ["000000000139_labelTrainIds.png", "000000000285_labelTrainIds.png"]
    assert no_temp_files(tmp_path)
    assert cli.main(["convert", "coco_stuff", "--data-root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"lposs: error: {result.failed[0]}\n"  # no bar off a terminal
    assert captured.out == "coco_stuff: wrote 0 file(s), kept 2 existing, 1 failed\n"
    bad.unlink()
    result = convert_coco_stuff(tmp_path, overwrite=True)
    assert (result.written, result.skipped, result.failed) == (2, 0, ())


def test_convert_errors(tmp_path):
    with pytest.raises(DatasetError, match="coco_stuff164k"):
        convert_coco_stuff(tmp_path)
    (tmp_path / "coco_stuff164k/annotations/val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no raw COCO-Stuff annotations"):
        convert_coco_object(tmp_path)
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        convert_coco_object(tmp_path, instances_json="annotations/instances_val2017.json")
    with pytest.raises(DatasetError, match="cityscapes"):
        convert_cityscapes(tmp_path)
    with pytest.raises(TypeError):
        convert_coco_stuff(tmp_path, splits=[1])


def test_convert_cityscapes(tmp_path):
    gt = tmp_path / "cityscapes" / "gtFine"
    raw = np.zeros((H, W), dtype=np.uint8)
    raw[0, :8] = [0, 7, 8, 9, 24, 33, 34, 255]
    names = []
    for split, city, stem in [("val", "lindau", "lindau_000000_000019"),
                              ("val", "frankfurt", "frankfurt_000000_000294"),
                              ("train", "aachen", "aachen_000000_000019")]:  # fmt: skip
        write_raw(gt / split / city / f"{stem}_gtFine_labelIds.png", raw)
        write_raw(gt / split / city / f"{stem}_gtFine_color.png", raw)  # not a labelIds file
        names.append(gt / split / city / f"{stem}_gtFine_labelTrainIds.png")
    assert convert_cityscapes(tmp_path, splits=["val"]).written == 2
    assert not names[2].exists()
    result = convert_cityscapes(tmp_path / "cityscapes")
    assert (result.written, result.skipped) == (1, 2)
    for path in names:
        label = read_png(path)
        assert label[0, :8].tolist() == [255, 0, 1, 255, 11, 18, 255, 255]
        assert label[10, 10] == 255
    assert no_temp_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO RLE and polygons


def encode_rle_string(counts: list[int]) -> str:
    """COCO's rleToString, written from its C source, independently of the decoder."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def runs_of(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(int)  # column-major
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_decode_rle_hand_computed():
    # "1213" = runs [1, 2, 1, 2+3] (0, 1, 0, 1 alternately, column-major): the fourth run is
    # stored as the difference to the second.
    mask = decode_rle({"size": [3, 3], "counts": "1213"})
    np.testing.assert_array_equal(mask, [[0, 0, 1], [1, 1, 1], [1, 1, 1]])
    # "151M": 'M' - 48 = 29 = 0b11101, sign bit set: 29 - 32 = -3, so the run is 5 - 3 = 2.
    mask = decode_rle({"size": [3, 3], "counts": b"151M"})
    np.testing.assert_array_equal(mask, [[0, 1, 0], [1, 1, 1], [1, 1, 1]])
    # "0T3": runs [0, 100]; 'T' = 36 = 0x20 | 4 (more follows), '3' = 3: 4 + 3 * 32 = 100.
    assert decode_rle({"size": [10, 10], "counts": "0T3"}).all()
    # Uncompressed counts, as COCO stores crowds.
    mask = decode_rle({"size": [2, 3], "counts": [1, 3, 2]})
    np.testing.assert_array_equal(mask, [[0, 1, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [3, 3], "counts": [1, 2]})
    with pytest.raises(ValueError, match="truncated"):
        decode_rle({"size": [3, 3], "counts": "1T"})
    with pytest.raises(ValueError, match="differs"):
        decode_rle({"size": [3, 3], "counts": "9"}, 4, 4)


def test_decode_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(1, 60, 2)
        mask = rng.random((h, w)) < rng.random()
        if trial % 3 == 0:  # long runs exercise multi-group numbers and negative deltas
            mask = np.zeros((h, w), bool)
            mask[: h // 2, : w // 3] = True
        counts = runs_of(mask)
        got = decode_rle({"size": [int(h), int(w)], "counts": encode_rle_string(counts)})
        np.testing.assert_array_equal(got, mask)
        np.testing.assert_array_equal(decode_rle({"size": [h, w], "counts": counts}), mask)


def centre_in_polygon(x: float, y: float, xs, ys) -> bool:
    """Even-odd ray casting towards +x, one point at a time."""
    inside = False
    n = len(xs)
    for i in range(n):
        xa, ya, xb, yb = xs[i], ys[i], xs[(i + 1) % n], ys[(i + 1) % n]
        if (ya > y) != (yb > y):
            x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
            if x < x_cross:
                inside = not inside
    return inside


def test_polygons_to_mask_known_pixels():
    square = polygons_to_mask([[10, 5, 20, 5, 20, 15, 10, 15]], H, W)
    expected = np.zeros((H, W), bool)
    expected[5:15, 10:20] = True  # pixel centres 10.5..19.5 lie in [10, 20]
    np.testing.assert_array_equal(square, expected)
    triangle = polygons_to_mask([[0, 0, 8.2, 0, 0, 8.2]], H, W)
    rows, cols = np.mgrid[:H, :W]
    np.testing.assert_array_equal(triangle, (rows + 0.5) + (cols + 0.5) < 8.2)
    clipped_union = polygons_to_mask([[-5, -5, 3, -5, 3, 2, -5, 2], [38, 30, 45, 30, 45, 40]], H, W)
    expected = np.zeros((H, W), bool)
    expected[:2, :3] = True
    expected[30:, 38:] = (cols[30:, 38:] + 0.5 - 38) * 10 / 7 > (rows[30:, 38:] + 0.5 - 30)
    np.testing.assert_array_equal(clipped_union, expected)
    with pytest.raises(ValueError, match="pairs"):
        polygons_to_mask([[1, 2, 3, 4]], H, W)


def test_polygons_to_mask_matches_ray_casting():
    rng = np.random.default_rng(1)
    for _ in range(5):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = rng.uniform(3, 15, 9)  # star-shaped, non-convex
        xs = 20 + radii * np.cos(angles) + 0.013
        ys = 16 + radii * np.sin(angles) + 0.017
        polygon = np.stack([xs, ys], 1).reshape(-1).tolist()
        got = polygons_to_mask([polygon], H, W)
        want = np.array(
            [[centre_in_polygon(c + 0.5, r + 0.5, xs, ys) for c in range(W)] for r in range(H)]
        )
        np.testing.assert_array_equal(got, want)


def test_convert_coco_object_from_instances_json(tmp_path):
    ann_dir = tmp_path / "coco_stuff164k" / "annotations"
    ann_dir.mkdir(parents=True)
    blob = np.zeros((H, W), bool)
    blob[20:30, 2:6] = True
    crowd = np.zeros((H, W), bool)
    crowd[0:4, 30:40] = True
    crowd[25:28, 4:10] = True  # partly under the blob: the instance wins there
    coco = {
        "images": [
            {"id": 7, "file_name": "000000000007.jpg", "height": H, "width": W},
            {"id": 9, "file_name": "000000000009.jpg", "height": H, "width": W},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                       {"id": 3, "name": "car"}, {"id": 2, "name": "bicycle"}],  # fmt: skip
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
             "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]]},
            {"id": 2, "image_id": 7, "category_id": 90, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": encode_rle_string(runs_of(blob))}},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0,  # overlaps the car
             "segmentation": [[18, 10, 25, 10, 25, 12, 18, 12]]},
            {"id": 4, "image_id": 7, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": runs_of(crowd)}},
        ],
    }  # fmt: skip
    (ann_dir / "instances_val2017.json").write_text(json.dumps(coco))
    result = convert_coco_object(tmp_path, instances_json="annotations/instances_val2017.json")
    assert (result.written, result.skipped) == (2, 0)
    expected = np.zeros((H, W), np.uint8)
    expected[crowd] = 255
    expected[5:15, 10:20] = 3  # car: third category by sorted id (1, 2, 3, 90)
    expected[blob] = 4  # toothbrush
    expected[10:12, 18:25] = 1  # person, painted after the car
    np.testing.assert_array_equal(
        read_png(ann_dir / "val2017/000000000007_instanceTrainIds.png"), expected
    )
    empty = read_png(ann_dir / "val2017/000000000009_instanceTrainIds.png")
    assert empty.shape == (H, W) and not empty.any()
    again = convert_coco_object(tmp_path, instances_json=ann_dir / "instances_val2017.json")
    assert (again.written, again.skipped) == (0, 2)
    with pytest.raises(ValueError, match="one split"):
        convert_coco_object(tmp_path, instances_json="x.json", splits=["val2017", "train2017"])
    coco["annotations"][0]["category_id"] = 55
    (ann_dir / "bad.json").write_text(json.dumps(coco))
    bad = convert_coco_object(tmp_path, instances_json="annotations/bad.json", overwrite=True)
    assert (bad.written, len(bad.failed)) == (1, 1) and "unknown category 55" in bad.failed[0]
    assert no_temp_files(tmp_path)
    (ann_dir / "none.json").write_text(json.dumps({**coco, "images": []}))
    with pytest.raises(DatasetError, match="lists no images"):
        convert_coco_object(tmp_path, instances_json="annotations/none.json")


def test_cli_convert_instances_without_images_fails_in_one_line(tmp_path, capsys):
    from lposs import cli

    ann_dir = tmp_path / "coco_stuff164k" / "annotations"
    ann_dir.mkdir(parents=True)
    (ann_dir / "empty.json").write_text(json.dumps({"images": [], "categories": []}))
    argv = ["convert", "coco_object", "--data-root", str(tmp_path), "--instances-json",
            str(ann_dir / "empty.json")]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    empty = ann_dir / "empty.json"
    assert captured.err == f"lposs: error: COCO instances file {empty} lists no images\n"
    assert captured.out == ""
