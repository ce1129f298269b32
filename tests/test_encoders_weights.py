"""Tests of where encoder weights come from: sources, provenance, invalid files, the
sha256-keyed text-embedding cache (lposs.encoders.sources / weights / cache)."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
from conftest import perturb_
from safetensors.torch import save_file

from lposs import Segmenter
from lposs.cli import main
from lposs.encoders import ClipEncoder, load_clip, load_dino, resolve_weights
from lposs.encoders.cache import remembered_sha256
from lposs.errors import UnsafeCheckpointError, WeightsNotFoundError

CLIP_FILE = "ViT-B-16-laion2b_s34b_b88k.safetensors"  # the name load_clip looks for


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _template_average(model, tokenizer, templates, name: str) -> torch.Tensor:
    """The prompt-ensembled embedding of ``name`` from ``model.encode_text``: ``(E,)``."""
    with torch.no_grad():
        per_prompt = model.encode_text(tokenizer([t.format(name) for t in templates]))
    per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
    mean = per_prompt.mean(dim=0)
    return mean / mean.norm()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh LPOSS_CACHE, an LPOSS_WEIGHTS folder and an empty Hub cache folder."""
    monkeypatch.setenv("LPOSS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("LPOSS_WEIGHTS", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub").mkdir()
    return folder, tmp_path / "hub"


# ----------------------------------------------------------------------------- text cache


def test_replaced_weight_file_gets_fresh_text_embeddings(tiny_clip, tiny_clip_kwargs, isolated):
    folder, hub = isolated
    path = folder / CLIP_FILE
    _save(tiny_clip.model, path)
    first = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    old, _ = first.encode_classes(["cat"])
    templates = first.templates

    unchanged = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    calls = []
    unchanged.model.transformer.register_forward_hook(lambda *args: calls.append(1))
    again, _ = unchanged.encode_classes(["cat"])
    assert not calls  # the unchanged file reuses the embeddings on disk
    torch.testing.assert_close(again, old)

    size = path.stat().st_size
    replacement = perturb_(copy.deepcopy(tiny_clip.model), seed=11, scale=0.2)
    _save(replacement, path)  # same name, same size, new content
    assert path.stat().st_size == size
    fresh = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    new, _ = fresh.encode_classes(["cat"])
    expected = _template_average(replacement, tiny_clip.tokenizer, templates, "cat")
    torch.testing.assert_close(new[0], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(new[0], old[0], atol=1e-3)
    assert fresh.weights_info["sha256"] == _sha256(path) != first.weights_info["sha256"]


def test_text_cache_key_follows_templates_and_precision(tiny_clip, tiny_clip_kwargs, isolated):
    folder, hub = isolated
    _save(tiny_clip.model, folder / CLIP_FILE)
    encoder = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    encoder.encode_classes(["cat"])
    other = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    assert other.text_cache_dir == encoder.text_cache_dir
    other.templates = ("a photo of a {}.",)  # other prompts: not the cached embedding
    calls = []
    other.model.transformer.register_forward_hook(lambda *args: calls.append(1))
    embedding, _ = other.encode_classes(["cat"])
    assert calls
    expected = _template_average(other.model, other.tokenizer, other.templates, "cat")
    torch.testing.assert_close(embedding[0], expected, atol=1e-5, rtol=1e-4)
    assert other._disk_path("cat") != encoder._disk_path("cat")
    other.model.to(torch.bfloat16)
    assert other._disk_path("cat") != encoder._disk_path("cat")


@pytest.mark.parametrize("poison", ["nan", "zero", "norm", "shape", "not a tensor file"])
def test_a_poisoned_text_cache_entry_is_recomputed_rewritten_and_named(
        tiny_clip, tiny_clip_kwargs, isolated, poison):
    folder, hub = isolated
    _save(tiny_clip.model, folder / CLIP_FILE)
    first = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    first.encode_classes(["cat", "dog"])
    expected = _template_average(first.model, first.tokenizer, first.templates, "cat")
    path = first._disk_path("cat")
    if poison == "not a tensor file":
        path.write_bytes(b"garbage")
    else:
        bad = {"nan": torch.full((32,), float("nan")), "zero": torch.zeros(32),
               "norm": 1.01 * expected, "shape": expected[:16] / expected[:16].norm()}[poison]
        torch.save(bad, path)
    again = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    with pytest.warns(UserWarning) as caught:
        embeddings, _ = again.encode_classes(["cat", "dog"])
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    torch.testing.assert_close(embeddings[0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.load(path, weights_only=True), embeddings[0])  # rewritten
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry is good: no warning
        reread, _ = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs).encode_classes(
            ["cat"])
    torch.testing.assert_close(reread[0], embeddings[0])


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LPOSS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    file_sha256 = remembered_sha256
    assert file_sha256(path) == _sha256(path)
    index_path = tmp_path / "cache" / "file-sha256.json"
    index = json.loads(index_path.read_text())
    assert set(index) == {str(path.resolve())}
    # The digest is read back from the index, not recomputed, while the file is unchanged:
    index[str(path.resolve())]["sha256"] = "f" * 64
    index_path.write_text(json.dumps(index))
    assert file_sha256(path) == "f" * 64
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # changed file
    assert file_sha256(path) == _sha256(path)
    path.write_bytes(b"y" * 1000)  # same size, new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))
    assert file_sha256(path) == _sha256(path)
    index_path.write_text("{not json")  # a damaged index costs only the hashing
    assert file_sha256(path) == _sha256(path)


# ----------------------------------------------------------------------------- provenance


def test_weights_info_of_file_hub_and_random(
    tiny_clip, tiny_dino, tiny_clip_kwargs, tiny_dino_kwargs, isolated, tmp_path
):
    folder, hub = isolated
    given = tmp_path / "clip.safetensors"
    _save(tiny_clip.model, given)
    encoder = load_clip("ViT-B-16", weights=given, **tiny_clip_kwargs)
    assert encoder.weights_info == {"source": "file", "path": str(given),
                                    "sha256": _sha256(given)}
    _save(tiny_clip.model, folder / CLIP_FILE)
    found = load_clip("ViT-B-16", cache_dir=hub, **tiny_clip_kwargs)
    assert found.weights_info == {"source": "file", "path": str(folder / CLIP_FILE),
                                  "sha256": _sha256(given)}
    # The Hugging Face Hub cache layout: models--org--name/snapshots/<commit>/<file>.
    snapshot = hub / "models--timm--vit_base_patch16_224.dino/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("abc123")
    _save(tiny_dino.model, snapshot / "model.safetensors")
    dino = load_dino("dino_vitb16", cache_dir=hub, **tiny_dino_kwargs)
    assert dino.weights_info == {
        "source": "hub", "path": str(snapshot / "model.safetensors"),
        "repo": "timm/vit_base_patch16_224.dino", "revision": "abc123",
        "file": "model.safetensors", "sha256": _sha256(snapshot / "model.safetensors")}
    assert load_dino("dino_vitb16", pretrained=False, **tiny_dino_kwargs).weights_info == {
        "source": "random"}
    assert load_clip("ViT-B-16", pretrained=None, **tiny_clip_kwargs).weights_info == {
        "source": "random"}
    assert ClipEncoder(tiny_clip.model, tiny_clip.tokenizer).weights_info == {
        "source": "unknown"}
    json.dumps(dino.weights_info)  # ready for the output JSON
    # The one identity of the weights, for every cache key and identity check:
    assert encoder.weights_id == found.weights_id == f"sha256:{_sha256(given)}"
    assert dino.weights_id == ("hub:timm/vit_base_patch16_224.dino@abc123/model.safetensors"
                               f"#sha256:{_sha256(snapshot / 'model.safetensors')}")
    assert load_clip("ViT-B-16", pretrained=None, **tiny_clip_kwargs).weights_id == "random"


def test_local_dir_clip_reports_its_file(tiny_model_files):
    clip_dir, _ = tiny_model_files
    encoder = load_clip(f"local-dir:{clip_dir}")
    path = clip_dir / "open_clip_model.safetensors"
    assert encoder.weights_info == {"source": "file", "path": str(path), "sha256": _sha256(path)}
    assert encoder.text_cache_dir is None  # the folder's config is not part of a cache key


# ----------------------------------------------------------------------------- invalid files


@pytest.mark.parametrize(
    ("file_name", "content", "found"),
    [
        ("text.bin", b"some notes, not weights\n", "starts with the text"),
        ("empty.pt", b"", "empty"),
        ("config.pth", b'{"model": "ViT-B-16"}', "starts with the text"),
        ("noise.safetensors", bytes(range(200, 256)) * 3, "starts with the bytes"),
        ("broken.pt", b"\x80\x02garbage that is no pickle", "not a readable torch checkpoint"),
        ("broken.zip.pt", b"PK\x03\x04 not really a zip", "not a readable torch checkpoint"),
        ("cut.safetensors", b"\x0f" + bytes(7) + b'{"a": {"dtype":', "not a readable safetensors"),
    ],
)
def test_unreadable_files_are_weights_errors(
    tiny_clip_kwargs, tiny_dino_kwargs, tmp_path, file_name, content, found
):
    path = tmp_path / file_name
    path.write_bytes(content)
    for load in (lambda: load_clip("ViT-B-16", weights=path, **tiny_clip_kwargs),
                 lambda: load_dino("dino_vitb16", weights=path, **tiny_dino_kwargs)):
        with pytest.raises(WeightsNotFoundError) as err:
            load()
        message = str(err.value)
        assert not isinstance(err.value, UnsafeCheckpointError)
        assert str(path) in message and found in message
        assert "expected a .safetensors file or a PyTorch checkpoint" in message


def test_other_models_weights_are_weights_errors(
    tiny_clip, tiny_dino, tiny_clip_kwargs, tiny_dino_kwargs, tmp_path
):
    clip_file, dino_file = tmp_path / "clip.safetensors", tmp_path / "dino.pt"
    _save(tiny_clip.model, clip_file)
    torch.save(tiny_dino.model.state_dict(), dino_file)
    with pytest.raises(WeightsNotFoundError, match=f"{dino_file}.*does not hold weights"):
        load_clip("ViT-B-16", weights=dino_file, **tiny_clip_kwargs)
    with pytest.raises(WeightsNotFoundError, match=f"{clip_file}.*does not hold weights"):
        load_dino("dino_vitb16", weights=clip_file, **tiny_dino_kwargs)


def test_cli_text_file_as_clip_weights_is_one_line(tmp_path, tiny_model_files, capsys):
    from PIL import Image

    _, dino_file = tiny_model_files
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    text = tmp_path / "text.bin"
    text.write_text("not weights\n")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
                 "--clip-weights", str(text), "--dino-model", "vit_tiny_patch16_224",
                 "--dino-weights", str(dino_file)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lposs: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert str(text) in errors[0] and "expected" in errors[0]


def test_a_folder_given_as_weights_says_it_is_a_folder(tmp_path, tiny_model_files, capsys):
    from PIL import Image

    clip_dir, dino_file = tiny_model_files
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    for flag, other in (("--clip-weights", ["--dino-weights", str(dino_file)]),
                        ("--dino-weights", ["--clip-model", f"local-dir:{clip_dir}"])):
        code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
                     flag, str(tmp_path), "--dino-model", "vit_tiny_patch16_224", *other])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("lposs: error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err
        assert str(tmp_path) in errors[0] and "is a directory" in errors[0]
        assert "weight file is expected" in errors[0] and "does not exist" not in errors[0]


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_is_refused_without_torchs_warning(tiny_dino, tiny_dino_kwargs, tmp_path,
                                                    protocol):
    import pickle
    import warnings

    path = tmp_path / "weights.pt"  # a plain pickle of tensors, not written by torch.save
    with open(path, "wb") as f:
        pickle.dump(dict(tiny_dino.model.state_dict()), f, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsafeCheckpointError, match="pickled") as err:
            load_dino("dino_vitb16", weights=path, **tiny_dino_kwargs)
    assert not caught and str(path) in str(err.value)


@pytest.mark.parametrize("layout", ["no folder", "no config"])
def test_a_local_dir_without_openclip_config_is_one_line(tmp_path, capsys, layout):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    folder = tmp_path / "clip"
    if layout == "no config":
        folder.mkdir()
        (folder / "open_clip_model.safetensors").write_bytes(b"")
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o"),
                 "--clip-model", f"local-dir:{folder}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lposs: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert str(folder) in errors[0] and "open_clip_config.json" in errors[0]
    assert ("is not a folder" if layout == "no folder" else "has no") in errors[0]
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{folder}")


# ----------------------------------------------------------------------------- missing weights


def test_both_missing_models_are_reported_at_once(isolated, tmp_path, capsys):
    _, hub = isolated
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(clip="ViT-B-16", clip_pretrained="laion2b_s34b_b88k",
                        dino="dino_vitb16", cache_dir=hub)
    message = str(err.value)
    for hint in ("--clip-weights", "--dino-weights", CLIP_FILE, "dino_vitb16.safetensors"):
        assert hint in message
    assert len(message) < 600 and len(message.splitlines()) <= 5  # short, not one long line
    with pytest.raises(WeightsNotFoundError, match="(?s)--clip-weights.*--dino-weights"):
        Segmenter.from_pretrained("lposs+")
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    code = main(["segment", str(image), "--classes", "a,b", "--out", str(tmp_path / "o")])
    err_text = capsys.readouterr().err
    errors = [line for line in err_text.splitlines() if line.startswith("lposs: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err_text
    assert "--clip-weights" in errors[0] and "--dino-weights" in errors[0]


def test_one_missing_model_and_a_found_one(tiny_clip, isolated):
    folder, hub = isolated
    _save(tiny_clip.model, folder / CLIP_FILE)
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(clip="ViT-B-16", clip_pretrained="laion2b_s34b_b88k",
                        dino="dino_vitb16", cache_dir=hub)
    assert "--dino-weights" in str(err.value) and "--clip-weights" not in str(err.value)
    clip_source, dino_source = resolve_weights(
        clip="ViT-B-16", clip_pretrained="laion2b_s34b_b88k", cache_dir=hub)
    assert clip_source.source == "file" and clip_source.path == folder / CLIP_FILE
    assert dino_source is None
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(clip="ViT-B-16", clip_pretrained=None, dino="dino_vitb16",
                        dino_weights=folder / "nope.safetensors")


class _WithScale(torch.nn.Module):
    """A layer with a buffer that checkpoints do not hold (like CLIP's attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0), persistent=False)


def test_weights_become_the_parameters_and_unheld_buffers_are_rebuilt():
    from lposs.encoders.weights import build_with_weights

    state = {"linear.weight": torch.randn(2, 3), "linear.bias": torch.randn(2)}
    builds = []

    def build(device):
        builds.append(device.type)
        return _WithScale()

    def keep(model, checkpoint):
        return checkpoint

    def fill(model):
        model.scale = torch.full((2,), 2.0)

    model = build_with_weights(build, keep, dict(state), "f", "toy", fill=fill)
    assert builds == ["meta"]  # no random initialisation on the CPU
    assert model.linear.weight.data_ptr() == state["linear.weight"].data_ptr()  # no copy
    assert torch.equal(model.scale, torch.full((2,), 2.0))

    builds.clear()
    model = build_with_weights(build, keep, dict(state), "f", "toy")  # nothing fills `scale`
    assert builds == ["meta", "cpu"]  # built again for real rather than left unset
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert torch.equal(model.scale, torch.full((2,), 2.0))
    assert torch.equal(model.linear.weight, state["linear.weight"])


def test_safetensors_are_read_as_the_library_writes_them_into_memory_of_their_own(tmp_path):
    from safetensors.torch import load_file

    from lposs.encoders.weights import read_checkpoint

    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(),
               "b": torch.randn(2, 2).bfloat16(), "i": torch.arange(6).reshape(2, 3),
               "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 7)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    loaded = read_checkpoint(path)
    expected = load_file(str(path))
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    path.write_bytes(path.read_bytes()[:20] + b"\0" * (path.stat().st_size - 20))  # in place
    assert torch.equal(loaded["w"], tensors["w"])  # not a view of the file
    path.write_bytes(b"")  # cut short: a mapped tensor would crash the process (SIGBUS)
    assert all(torch.equal(loaded[name], value) for name, value in tensors.items())


@pytest.mark.parametrize("damage", ["offsets", "truncated", "dtype"])
def test_safetensors_that_break_the_format_are_weights_errors(tmp_path, damage):
    import struct

    from lposs.encoders.weights import read_checkpoint

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(3, 4)}, str(path))
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    if damage == "offsets":
        header["w"]["data_offsets"] = [0, 10**9]
    elif damage == "dtype":
        header["w"]["dtype"] = "F128"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = raw[8 + length:]
    path.write_bytes(struct.pack("<Q", len(text)) + text + (data[:10] if damage == "truncated"
                                                            else data))
    with pytest.raises(WeightsNotFoundError, match="not a readable safetensors file"):
        read_checkpoint(path)
