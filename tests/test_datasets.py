"""Benchmarks in their on-disk layouts, the folder dataset, class files and the paper's table."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lposs.errors import ClassNamesError, DatasetError
from lposs.evaluation.datasets import (
    DATASETS,
    FolderDataset,
    Sample,
    SegmentationDataset,
    get_dataset,
)
from lposs.vocab import load_class_names

H, W = 32, 40
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CLASS_NAMES = json.loads((REPO / "src" / "lposs" / "data" / "class_names.json").read_text())
N_CLASSES = {
    "voc": 21, "voc20": 20, "context": 60, "context59": 59,
    "coco_object": 81, "coco_stuff": 171, "ade20k": 150, "cityscapes": 19,
}  # fmt: skip
REDUCE = {"voc20", "context59", "ade20k"}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_palette_png(path: Path, label: np.ndarray) -> None:
    """A palette PNG whose colours differ from the indices (RGB conversion would show)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    im.putpalette([(7 * i + 50) % 256 for i in range(768)])
    im.save(path)


def random_label(seed: int, n_values: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    label = rng.integers(0, n_values, (H, W))
    label[rng.random((H, W)) < 0.1] = 255
    label[0, 0] = 0  # always hold a zero and a 255
    label[0, 1] = 255
    return label.astype(np.uint8)


def expected_after_reduce(raw: np.ndarray) -> np.ndarray:
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    out[raw == 255] = 255
    return out


def build_layout(root: Path, name: str) -> dict[str, tuple[Path, Path, np.ndarray]]:
    """Write a tiny copy of a benchmark; return {id: (image path, label path, raw label)}."""
    expected = {}
    if name in ("voc", "voc20", "context", "context59"):
        if name.startswith("voc"):
            base, ann, split_dir, n = "VOC2012", "SegmentationClass", "Segmentation", 21
        else:
            base, ann, split_dir, n = (
                "VOC2010",
                "SegmentationClassContext",
                "SegmentationContext",
                60,
            )
        base = root / "VOCdevkit" / base
        ids = ["2008_000002", "2007_000033", "2010_000007"]  # split-file order, not sorted
        for i, id_ in enumerate([*ids, "2007_999999"]):  # the last is not in val.txt
            image, label = base / "JPEGImages" / f"{id_}.jpg", base / ann / f"{id_}.png"
            write_image(image, i)
            write_palette_png(label, random_label(i, n))
            if id_ in ids:
                expected[id_] = (image, label, random_label(i, n))
        split = base / "ImageSets" / split_dir / "val.txt"
        split.parent.mkdir(parents=True)
        split.write_text("\n".join(ids) + "\n\n")
    elif name in ("coco_object", "coco_stuff"):
        base = root / "coco_stuff164k"
        suffix = "_instanceTrainIds.png" if name == "coco_object" else "_labelTrainIds.png"
        for i, stem in enumerate(["000000000285", "000000000139", "000000000632"]):
            image = base / "images/val2017" / f"{stem}.jpg"
            label = base / "annotations/val2017" / f"{stem}{suffix}"
            write_image(image, i)
            write_palette_png(label, random_label(i, N_CLASSES[name]))
            write_palette_png(label.with_name(f"{stem}.png"), random_label(50 + i, 182))  # raw
            expected[stem] = (image, label, random_label(i, N_CLASSES[name]))
    elif name == "ade20k":
        base = root / "ADEChallengeData2016"
        for i, stem in enumerate(["ADE_val_00000002", "ADE_val_00000001"]):
            image = base / "images/validation" / f"{stem}.jpg"
            label = base / "annotations/validation" / f"{stem}.png"
            write_image(image, i)
            write_palette_png(label, random_label(i, 151))
            expected[stem] = (image, label, random_label(i, 151))
    elif name == "cityscapes":
        base = root / "cityscapes"
        stems = [("lindau", "lindau_000000_000019"), ("frankfurt", "frankfurt_000000_000294"),
                 ("frankfurt", "frankfurt_000001_000538")]  # fmt: skip
        for i, (city, stem) in enumerate(stems):
            image = base / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png"
            label = base / "gtFine/val" / city / f"{stem}_gtFine_labelTrainIds.png"
            write_image(image, i)
            write_palette_png(label, random_label(i, 19))
            write_palette_png(label.with_name(f"{stem}_gtFine_labelIds.png"), random_label(9, 34))
            expected[stem] = (image, label, random_label(i, 19))
    return expected


@pytest.mark.parametrize("name", sorted(N_CLASSES))
def test_benchmark_loads_images_and_labels(tmp_path, name):
    expected = build_layout(tmp_path, name)
    ds = get_dataset(name, tmp_path)
    assert isinstance(ds, SegmentationDataset)
    assert ds.name == name and len(ds) == len(expected)
    assert ds.classes == CLASS_NAMES[name] and len(ds.classes) == N_CLASSES[name]
    assert ds.ignore_index == 255 and ds.reduce_zero_label == (name in REDUCE)
    # Split-file datasets keep the file's order; globbed ones are sorted by path.
    if name.startswith(("voc", "context")):
        assert [s.id for s in ds] == list(expected)
    else:
        by_path = sorted(expected, key=lambda k: expected[k][0])
        assert [s.id for s in ds] == by_path
    for sample in ds:
        image, label, raw = expected[sample.id]
        assert isinstance(sample, Sample)
        assert sample.image_path == image and sample.label_path == label
        got = sample.load_label()
        assert got.dtype == np.int64 and got.shape == (H, W)
        want = expected_after_reduce(raw) if name in REDUCE else raw.astype(np.int64)
        np.testing.assert_array_equal(got, want)
        valid = got[got != 255]
        assert valid.min() >= 0 and valid.max() < N_CLASSES[name]


@pytest.mark.parametrize(
    "name, inner",
    [
        ("voc", "VOCdevkit/VOC2012"),
        ("context59", "VOCdevkit/VOC2010"),
        ("coco_stuff", "coco_stuff164k"),
        ("ade20k", "ADEChallengeData2016"),
        ("cityscapes", "cityscapes"),
    ],
)
def test_accepts_the_dataset_folder_itself(tmp_path, name, inner):
    expected = build_layout(tmp_path, name)
    ds = get_dataset(name, tmp_path / inner)
    assert sorted(s.id for s in ds) == sorted(expected)
    assert ds.root == tmp_path / inner


def test_ade_under_mmseg_ade_folder_and_train_split(tmp_path):
    build_layout(tmp_path / "ade", "ade20k")
    assert len(get_dataset("ade20k", tmp_path)) == 2
    voc = tmp_path / "v"
    build_layout(voc, "voc")
    (voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_text("2007_999999\n")
    assert [s.id for s in get_dataset("voc", voc, split="train")] == ["2007_999999"]


def test_context_accepts_segmentcontext_spelling(tmp_path):
    build_layout(tmp_path, "context")
    sets = tmp_path / "VOCdevkit/VOC2010/ImageSets"
    (sets / "SegmentationContext").rename(sets / "SegmentContext")
    assert len(get_dataset("context", tmp_path)) == 3


@pytest.mark.parametrize(
    "name, expected_path",
    [
        ("voc", "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
        ("voc20", "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
        ("context", "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
        ("context59", "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
        ("coco_object", "coco_stuff164k/images/val2017"),
        ("coco_stuff", "coco_stuff164k/images/val2017"),
        ("ade20k", "ADEChallengeData2016/images/validation"),
        ("cityscapes", "cityscapes/leftImg8bit/val"),
    ],
)
def test_missing_dataset_names_the_expected_path(tmp_path, name, expected_path):
    with pytest.raises(DatasetError) as info:
        get_dataset(name, tmp_path)
    assert str(tmp_path / expected_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_data_root_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="data root not found"):
        get_dataset("voc", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset 'pascal'"):
        get_dataset("pascal", tmp_path)
    with pytest.raises(TypeError):
        get_dataset("voc", 3)
    assert sorted(DATASETS) == sorted(N_CLASSES)


@pytest.mark.parametrize("name", ["voc", "coco_stuff", "coco_object", "cityscapes", "ade20k"])
def test_image_without_mask_names_both(tmp_path, name):
    expected = build_layout(tmp_path, name)
    image, label, _ = next(iter(expected.values()))
    label.unlink()
    with pytest.raises(DatasetError) as info:
        get_dataset(name, tmp_path)
    message = str(info.value)
    assert str(image) in message and str(label) in message
    if name in ("coco_stuff", "coco_object", "cityscapes"):  # raw annotations lie next to it
        assert f"lposs convert {name}" in message


def test_missing_image_of_split_file(tmp_path):
    expected = build_layout(tmp_path, "voc")
    image = expected["2007_000033"][0]
    image.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(image))):
        get_dataset("voc", tmp_path)


def test_rgb_or_corrupt_label_is_a_dataset_error(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (W, H)).save(rgb)
    with pytest.raises(DatasetError, match="single-channel"):
        Sample("a", tmp_path / "a.jpg", rgb).load_label()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read"):
        Sample("b", tmp_path / "b.jpg", bad).load_label()
    with pytest.raises(DatasetError, match="not found"):
        Sample("c", tmp_path / "c.jpg", tmp_path / "c.png").load_label()


def test_greyscale_label_and_slicing(tmp_path):
    expected = build_layout(tmp_path, "ade20k")
    ds = get_dataset("ade20k", tmp_path)
    grey = tmp_path / "grey.png"
    raw = random_label(3, 151)
    Image.fromarray(raw).save(grey)  # mode L
    got = Sample("g", tmp_path / "g.jpg", grey, reduce_zero_label=True).load_label()
    np.testing.assert_array_equal(got, expected_after_reduce(raw))
    head = ds[:1]
    assert isinstance(head, SegmentationDataset) and len(head) == 1
    assert head.classes == ds.classes and head.reduce_zero_label
    assert ds[-1].id == sorted(expected)[-1]
    with pytest.raises(TypeError):
        ds["0"]
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------------------------------------
# Folder dataset and class files


def make_folder(root: Path, stems, mask_stems=None, image_ext=".jpg"):
    images, masks = root / "images", root / "masks"
    for i, stem in enumerate(stems):
        write_image(images / f"{stem}{image_ext}", i)
    for i, stem in enumerate(mask_stems if mask_stems is not None else stems):
        write_palette_png(masks / f"{stem}.png", random_label(i, 3))
    return images, masks


def test_folder_dataset_with_class_file(tmp_path):
    images, masks = make_folder(tmp_path, ["b", "a", "c"], ["c", "a", "b", "extra"])
    class_file = tmp_path / "classes.txt"
    class_file.write_text("# my classes\nsky ; cloud\n\n  tree\ncar\n")
    ds = FolderDataset(images, masks, class_file, reduce_zero_label=True)
    assert ds.classes == ["sky;cloud", "tree", "car"]
    assert [s.id for s in ds] == ["a", "b", "c"]
    for s in ds:
        assert s.image_path == images / f"{s.id}.jpg" and s.label_path == masks / f"{s.id}.png"
    # mask "c" was written first (seed 0), "a" second (seed 1), "b" third (seed 2)
    np.testing.assert_array_equal(ds[0].load_label(), expected_after_reduce(random_label(1, 3)))
    np.testing.assert_array_equal(ds[2].load_label(), expected_after_reduce(random_label(0, 3)))
    plain = FolderDataset(images, masks, ["x", "y", "z"], ignore_index=0)
    assert plain.ignore_index == 0 and not plain.reduce_zero_label
    np.testing.assert_array_equal(plain[1].load_label(), random_label(2, 3))


def test_folder_dataset_errors(tmp_path):
    images, masks = make_folder(tmp_path, ["a", "b"], ["a"])
    with pytest.raises(DatasetError) as info:
        FolderDataset(images, masks, ["x"])
    assert str(images / "b.jpg") in str(info.value) and str(masks / "b.png") in str(info.value)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        FolderDataset(tmp_path / "nope", masks, ["x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        FolderDataset(tmp_path / "empty", masks, ["x"])
    write_image(images / "a.png", 5)  # a.jpg and a.png
    (masks / "b.png").write_bytes((masks / "a.png").read_bytes())
    with pytest.raises(DatasetError, match="share the stem 'a'"):
        FolderDataset(images, masks, ["x"])


def test_class_names_validation(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ClassNamesError, match="no class names"):
        load_class_names(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n")
    with pytest.raises(ClassNamesError, match="duplicate"):
        load_class_names(dup)
    bad = tmp_path / "bad.txt"
    bad.write_text("cat;;kitty\n")
    with pytest.raises(ClassNamesError, match="empty"):
        load_class_names(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_class_names(tmp_path / "missing.txt")
    images, masks = make_folder(tmp_path, ["a"])
    with pytest.raises(ClassNamesError):
        FolderDataset(images, masks, [])
    with pytest.raises(TypeError):
        FolderDataset(images, masks, [1, 2])


# ---------------------------------------------------------------------------------------------
# Real data (skipped where ../shared/data is absent)


@pytest.mark.parametrize("name, n_classes", [("voc2012", 21), ("ade20k", 150)])
def test_folder_dataset_on_real_photos(name, n_classes):
    folder = SHARED / "data" / "photos" / name
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        pytest.skip(f"real photos not present at {folder}")
    reduce = name == "ade20k"
    classes = CLASS_NAMES["voc" if name == "voc2012" else "ade20k"]
    ds = FolderDataset(folder / "images", folder / "masks", classes, reduce_zero_label=reduce)
    assert len(ds) == len(list((folder / "images").iterdir()))
    sample = ds[0]
    label = sample.load_label()
    with Image.open(sample.image_path) as im:
        assert label.shape == (im.height, im.width)
    values = set(np.unique(label).tolist())
    assert values <= set(range(n_classes)) | {255} and len(values - {255}) >= 2
    if name == "voc2012":
        with Image.open(sample.label_path) as m:
            assert m.mode == "P"
            np.testing.assert_array_equal(label, np.asarray(m))  # indices, not colours


def test_duplicate_voc_ids_are_named(tmp_path, capsys):
    from lposs import cli

    build_layout(tmp_path, "voc")
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join([*ids, ids[0]]) + "\n")
    with pytest.raises(DatasetError, match=f"more than once: {ids[0]}$"):
        get_dataset("voc", tmp_path)
    argv = ["eval", "--dataset", "voc", "--data-root", str(tmp_path), "--method", "oracle",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ids[0] in err and "Traceback" not in err
