"""Tests for lposs.output.files: atomic writes, label PNGs, JSON, score arrays, file hashes."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lposs.errors import OutputError
from lposs.output.drawing import UNKNOWN_COLOR, palette
from lposs.output.files import (
    LOCK_NAME,
    atomic_write,
    file_sha256,
    folder_lock,
    save_label_png,
    save_scores,
    write_json,
)
from lposs.pipeline.image import load_label_map

RNG = np.random.default_rng(0)


def test_label_png_round_trip(tmp_path):
    n = 5
    labels = RNG.integers(0, n + 1, (20, 30))  # n = unknown
    labels[0, 0] = 255
    save_label_png(tmp_path / "l.png", torch.from_numpy(labels), palette(n))
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        values = np.asarray(im)
        table = np.array(im.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(values, np.where(labels >= n, 255, labels))
    np.testing.assert_array_equal(table[:n], palette(n))
    assert tuple(table[255]) == UNKNOWN_COLOR
    read = load_label_map(tmp_path / "l.png")
    assert read.dtype == torch.int64
    np.testing.assert_array_equal(read.numpy(), values)


def test_label_png_many_classes_is_16_bit(tmp_path):
    n = 300
    labels = RNG.integers(0, n + 1, (10, 12))
    save_label_png(tmp_path / "l.png", labels, palette(n))
    with Image.open(tmp_path / "l.png") as im:
        np.testing.assert_array_equal(np.asarray(im).astype(np.int64), labels)
    np.testing.assert_array_equal(load_label_map(tmp_path / "l.png").numpy(), labels)


def test_atomic_write(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"hello"))
    assert target.read_bytes() == b"hello"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    def broken(f):
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, broken)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "new.bin", broken)
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # old content kept, no temp files
    assert target.read_bytes() == b"hello"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "nofolder" / "x.bin", lambda f: None)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_atomic_write_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            write_json(folder / "x.json", {"a": 1})
    finally:
        folder.chmod(0o755)


def test_write_json_and_scores(tmp_path):
    obj = {"name": "café ☕", "miou": float("nan"), "n": np.int64(3), "v": torch.tensor([1.5])}
    write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert "café ☕" in text and '\n  "miou": null' in text
    assert json.loads(text) == {"name": "café ☕", "miou": None, "n": 3, "v": [1.5]}
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()

    scores = torch.randn(4, 5, 6, dtype=torch.float64)
    save_scores(tmp_path / "s.npy", scores)
    loaded = np.load(tmp_path / "s.npy")
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, scores.numpy().astype(np.float32))
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.npy"]


def test_file_sha256(tmp_path):
    data = RNG.integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()  # > 1 block
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        file_sha256(tmp_path / "missing.bin")


def test_folder_lock_is_exclusive_and_removed_on_release(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    with folder_lock(tmp_path):
        lock_file = tmp_path / LOCK_NAME
        assert lock_file.is_file()
        with pytest.raises(OutputError, match=f"another lposs is writing to {tmp_path}"):
            with folder_lock(tmp_path):
                pass
        with open(lock_file) as other, pytest.raises(BlockingIOError):  # fcntl sees it held
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path):  # free again
        pass


def test_folder_lock_does_not_trust_a_lock_file_removed_under_it(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / LOCK_NAME
    real_open, opened = os.open, []

    def open_then_lose_the_race(name, flags, *args):
        fd = real_open(name, flags, *args)
        opened.append(fd)
        if len(opened) == 1:  # the previous holder removes its file just after our open
            os.unlink(name)
        return fd

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    with folder_lock(tmp_path):
        assert len(opened) == 2 and path.is_file()  # locked again, the file now at the path
        with open(path) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not path.exists()
