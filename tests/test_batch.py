"""``segment_files``: the pipelined loop writes what the plain loop writes, reports failures
per file and leaves only complete files when interrupted."""

import json
import threading

import numpy as np
import pytest
from PIL import Image

from lposs.config import LPOSSConfig
from lposs.pipeline.batch import segment_files
from lposs.pipeline.segmenter import Segmenter

FAST = LPOSSConfig(k=30, short_side=224)
CLASSES = ["red thing", "green thing;grass", "sky"]


def _photo(path, seed, size=(80, 60)):
    """Two noisy colour halves saved at ``path``; size is (width, height)."""
    rng = np.random.default_rng(seed)
    rgb = np.zeros((size[1], size[0], 3), np.int64)
    rgb[:, : size[0] // 2] = (200, 40, 30)
    rgb[:, size[0] // 2 :] = (30, 160, 60)
    rgb = np.clip(rgb + rng.integers(-25, 25, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def segmenter(tiny_clip, tiny_dino):
    return Segmenter(tiny_clip, tiny_dino, FAST)


def _without_timings(path):
    summary = json.loads(path.read_text())
    summary.pop("timings_s")
    return summary


def _no_writer_left():
    for thread in threading.enumerate():  # a writer that is ending may need a moment
        if thread.name == "lposs-writer":
            thread.join(timeout=10)
    return not any(t.name == "lposs-writer" for t in threading.enumerate())


def test_outputs_equal_the_plain_loop_and_bad_files_are_reported_in_order(tmp_path, segmenter):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [_photo(folder / "a.png", 0), folder / "broken.png",
             _photo(folder / "c.png", 1, size=(50, 70))]
    paths[1].write_bytes(b"not an image")
    stages = []
    outcomes = list(segment_files(segmenter, paths, CLASSES, tmp_path / "out",
                                  stems=["a", "b", "c"], save_scores=True,
                                  progress=lambda stage, done, total: stages.append(
                                      (stage, done, total))))
    assert [o.path for o in outcomes] == paths and [o.stem for o in outcomes] == ["a", "b", "c"]
    assert outcomes[1].error is not None and "broken.png" in str(outcomes[1].error)
    assert outcomes[0].error is None and outcomes[2].error is None
    assert [s for s in stages if s[0] == "images"] == [("images", i, 3) for i in range(3)]
    assert _no_writer_left()

    plain = tmp_path / "plain"  # what calling the library one image at a time writes
    for path, stem in ((paths[0], "a"), (paths[2], "c")):
        segmenter(path, CLASSES).save(plain, stem, segmenter.image, scores=True)
    for outcome in (outcomes[0], outcomes[2]):
        names = sorted(p.name for p in outcome.written)
        assert names == sorted(f"{outcome.stem}{s}" for s in
                               (".png", "_overlay.png", "_scores.npy", ".json"))
        for name in names:
            if name.endswith(".json"):
                assert _without_timings(tmp_path / "out" / name) == _without_timings(plain / name)
            else:
                assert (tmp_path / "out" / name).read_bytes() == (plain / name).read_bytes()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        p.name for o in outcomes for p in o.written}


def test_a_failed_write_is_reported_for_its_file_only(tmp_path, segmenter):
    paths = [_photo(tmp_path / f"{stem}.png", i) for i, stem in enumerate("abc")]
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)  # a folder where b's label map should go
    outcomes = list(segment_files(segmenter, paths, CLASSES, out))
    assert [o.error is None for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, OSError)
    assert (out / "a.png").is_file() and (out / "c.json").is_file()


def test_interrupt_writes_what_is_done_then_raises(tmp_path, segmenter):
    paths = [_photo(tmp_path / f"{stem}.png", i) for i, stem in enumerate("abc")]

    def ctrl_c_at_second_image(stage, done, total):
        if stage == "images" and done == 1:
            raise KeyboardInterrupt

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for outcome in segment_files(segmenter, paths, CLASSES, tmp_path / "out",
                                     progress=ctrl_c_at_second_image):
            seen.append(outcome)
    assert [o.stem for o in seen] == ["a"] and seen[0].error is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.json", "a.png", "a_overlay.png"]  # complete files only, no temporaries
    assert np.array(Image.open(tmp_path / "out" / "a.png")).shape == (60, 80)
    assert _no_writer_left()


def test_bad_arguments_fail_before_any_work(tmp_path, segmenter):
    with pytest.raises(ValueError, match="stems"):
        next(segment_files(segmenter, [tmp_path / "a.png"], CLASSES, tmp_path, stems=[]))
    with pytest.raises(ValueError, match="duplicate"):
        next(segment_files(segmenter, [tmp_path / "a.png"], ["a", "a"], tmp_path))


def test_a_file_that_cannot_be_written_leaves_none_of_its_outputs(tmp_path, segmenter):
    out = tmp_path / "out"
    (out / "a.json").mkdir(parents=True)  # the last of a's files cannot replace a folder
    paths = [_photo(tmp_path / "a.png", 0), _photo(tmp_path / "b.png", 1)]
    outcomes = list(segment_files(segmenter, paths, CLASSES, out, save_scores=True))
    assert isinstance(outcomes[0].error, OSError) and outcomes[1].error is None
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "b.json", "b.png", "b_overlay.png", "b_scores.npy"]  # a's written ones removed
    assert (out / "a.json").is_dir()


def test_a_file_name_that_is_not_utf8_is_segmented_and_named_in_valid_json(tmp_path, segmenter):
    import os

    folder = os.fsencode(tmp_path / "in")
    os.mkdir(folder)
    name = os.fsdecode(folder + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    _photo(name, 0)
    outcomes = list(segment_files(segmenter, [name], CLASSES, tmp_path / "out"))
    assert outcomes[0].error is None
    summary = json.loads((tmp_path / "out" / "caf\udce9.json").read_bytes().decode("utf-8"))
    assert summary["source"].endswith("/caf\\xe9.png")


def test_images_encoded_together_write_what_one_at_a_time_writes(tmp_path, segmenter):
    """Encoding the windows of three images in shared batches (the default on CUDA) changes
    no output; a broken file inside the group fails alone."""
    paths = [_photo(tmp_path / "a.png", 0), tmp_path / "b.png", _photo(tmp_path / "c.png", 1),
             _photo(tmp_path / "d.png", 2, size=(50, 70))]
    paths[1].write_bytes(b"not an image")
    one = list(segment_files(segmenter, paths, CLASSES, tmp_path / "one", encode_together=1))
    three = list(segment_files(segmenter, paths, CLASSES, tmp_path / "three", encode_together=3,
                               read_ahead=3))
    assert [o.error is None for o in three] == [o.error is None for o in one] == [
        True, False, True, True]
    for stem in "acd":
        a = np.array(Image.open(tmp_path / "one" / f"{stem}.png"))
        b = np.array(Image.open(tmp_path / "three" / f"{stem}.png"))
        assert a.shape == b.shape and (a == b).mean() > 0.999  # batched matmuls round apart


def test_a_full_disk_stops_the_batch_at_the_first_failed_write(tmp_path, segmenter):
    import resource
    import signal

    from lposs.errors import OutputError

    paths = [_photo(tmp_path / f"{stem}.png", i) for i, stem in enumerate("abcdef")]
    images = []
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it is EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, limits[1]))  # no overlay fits
    try:
        with pytest.raises(OutputError) as info:
            for outcome in segment_files(
                    segmenter, paths, CLASSES, tmp_path / "out",
                    progress=lambda stage, done, total: images.append(done)
                    if stage == "images" else None):
                raise AssertionError(f"{outcome.path} written on a full disk")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(info.value).startswith(f"cannot write the outputs of {paths[0]} to ")
    assert str(info.value).endswith("; stopped with 0 of 6 images written")
    assert "\n" not in str(info.value)
    assert max(images) <= 2  # a, at most b and c while a's files were being written
    assert not any((tmp_path / "out").iterdir()) and _no_writer_left()
