"""Tests for lposs.vocab: the rules for class names and synonyms, in one place."""

import pytest
import torch

import lposs
from lposs.errors import ClassNamesError, DatasetError
from lposs.pipeline import segmenter
from lposs.vocab import check_class_names, load_class_names, parse_class_names, split_synonyms


@pytest.mark.parametrize(
    "bad", [[], "", ["cat", ""], ["cat", "Cat"], ["a;"], " , dog", [3]],
)
def test_bad_vocabularies_raise_class_names_error(bad):
    with pytest.raises((lposs.ClassNamesError, TypeError)):
        parse_class_names(bad)


@pytest.mark.parametrize("unordered", [
    {"cat", "dog"}, frozenset({"cat", "dog"}), {"cat": 0, "dog": 1}, {"cat": 0}.keys(),
    (name for name in ["cat", "dog"]),
])
def test_classes_without_a_fixed_order_are_refused(unordered):
    with pytest.raises(TypeError, match="list, tuple or comma-separated str") as info:
        parse_class_names(unordered)
    assert "sorted(classes)" in str(info.value)


def test_lists_tuples_and_strings_keep_their_order():
    expected = ["dog", "cat", "sky"]
    for given in (expected, tuple(expected), "dog,cat,sky"):
        assert parse_class_names(given) == expected


def test_the_segmenter_refuses_a_set_of_classes(tiny_clip, tiny_dino):
    from lposs.config import LPOSSConfig

    seg = segmenter.Segmenter(tiny_clip, tiny_dino, LPOSSConfig(k=10, short_side=32))
    seg.set_image(torch.zeros(3, 32, 48))
    with pytest.raises(TypeError, match="order"):
        seg.predict({"cat", "dog"})


def test_class_names_are_cleaned():
    assert parse_class_names(" cat , grass ; lawn ") == ["cat", "grass;lawn"]


def test_too_many_classes_for_the_unknown_label():
    assert len(parse_class_names([f"c{i}" for i in range(254)])) == 254
    with pytest.raises(ClassNamesError, match="at most 254 classes .*8 bits"):
        parse_class_names([f"c{i}" for i in range(255)])


def test_too_many_names_and_synonyms_to_propagate():
    pairs = [f"c{i};d{i}" for i in range(200)]  # 400 rows in 200 classes
    assert len(parse_class_names([*pairs, ";".join(f"e{j}" for j in range(112))])) == 201
    with pytest.raises(ClassNamesError, match="at most 512 names and synonyms together.*513"):
        parse_class_names([*pairs, ";".join(f"e{j}" for j in range(113))])


@pytest.mark.parametrize("name,expected", [("cat", ["cat"]), (" grass ; lawn", ["grass", "lawn"])])
def test_split_synonyms(name, expected):
    assert split_synonyms(name) == expected


@pytest.mark.parametrize("name", ["", " ", "a;", ";a", "a; ;b"])
def test_split_synonyms_never_drops_an_empty_one(name):
    with pytest.raises(ClassNamesError, match="empty"):
        split_synonyms(name)


def test_benchmark_lists_are_kept_verbatim():
    assert check_class_names(["bed ", "Bed"], source="x") == ["bed ", "Bed"]
    with pytest.raises(ClassNamesError, match=r"x: empty class name or synonym in 'b;' \(class 2"):
        check_class_names(["a", "b;"], source="x")
    # the paper's COCO-Object background lists "bed", a class of its own: kept as published
    assert check_class_names(["sky;bed", "bed"], source="x") == ["sky;bed", "bed"]


def test_a_synonym_shared_by_two_classes_is_refused():
    with pytest.raises(ClassNamesError, match="'dog' belongs to both 'cat;dog' and 'dog'"):
        parse_class_names("cat;dog,dog")
    with pytest.raises(ClassNamesError, match="belongs to both"):
        parse_class_names(["grass;Lawn", "lawn;field"])


def test_an_empty_name_is_named_by_its_position():
    with pytest.raises(ClassNamesError, match=r"in '' \(class 2 of 'cat,,dog'\)"):
        parse_class_names("cat,,dog")


def test_vocabulary_rows_and_class_index():
    from lposs.vocab import vocabulary

    vocab = vocabulary(" cat , grass ; lawn ,sky")
    assert vocab.names == ("cat", "grass;lawn", "sky") and len(vocab) == 3
    assert vocab.rows == ("cat", "grass", "lawn", "sky")
    assert vocab.class_index == (0, 1, 1, 2)


def test_class_file_with_a_byte_order_mark_and_comments(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\ufeffdog # pet\n#all of this\ncat;kitty   # small\nc#\n", encoding="utf-8")
    assert load_class_names(path) == ["dog", "cat;kitty", "c#"]


def test_class_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# comment\n cat \n\ngrass ; lawn\n", encoding="utf-8")
    assert load_class_names(path) == ["cat", "grass;lawn"]
    assert lposs.load_class_names is load_class_names
    with pytest.raises(DatasetError, match="not found"):
        load_class_names(tmp_path / "missing.txt")


def test_class_file_that_cannot_be_a_class_list_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"cat\n" * (5 << 18))  # 5 MiB
    with pytest.raises(ClassNamesError, match="5.0 MiB.*at most 4 MiB"):
        load_class_names(huge)
    with pytest.raises(DatasetError, match="not a regular file"):
        load_class_names("/dev/null")
