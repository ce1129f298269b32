"""Tests of lposs.encoders: MaskCLIP and DINO features, text embeddings, weights loading.

Reference computations are written out here from the models' own parameters with
explicit tensor operations, independent of the encoder code.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lposs.encoders import ClipEncoder, DinoEncoder, load_clip, load_dino
from lposs.errors import ClassNamesError, UnsafeCheckpointError, WeightsNotFoundError

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
TEMPLATES_JSON = Path(__file__).resolve().parents[1] / "src/lposs/data/prompt_templates.json"


def _pad_normalize(window, patch, mean, std):
    """(3, h, w) in [0, 1] -> (3, H, W): black bottom/right padding, then (x - mean) / std."""
    _, h, w = window.shape
    padded = torch.zeros(3, math.ceil(h / patch) * patch, math.ceil(w / patch) * patch)
    padded[:, :h, :w] = window
    return (padded - mean[:, None, None]) / std[:, None, None]


def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def maskclip_reference(model, window):
    """MaskCLIP features of one window (3, h, w) -> (E, gh, gw), written out step by step."""
    visual = model.visual
    patch = visual.conv1.kernel_size[0]
    width = visual.conv1.out_channels
    x = _pad_normalize(window, patch, CLIP_MEAN, CLIP_STD)
    gh, gw = x.shape[1] // patch, x.shape[2] // patch
    # Patch "convolution" as a matrix product over flattened (c, py, px) patches.
    patches = x.reshape(3, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, -1)
    tokens = patches @ visual.conv1.weight.reshape(width, -1).T
    tokens = torch.cat([visual.class_embedding[None], tokens])
    pos = visual.positional_embedding
    side = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(side, side, width).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    tokens = tokens + torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, width)])
    x = _layer_norm(tokens, visual.ln_pre)[None]  # (1, L, width)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)  # the model's own first blocks (batch-first layout in this version)
    last = blocks[-1]
    w_v = last.attn.in_proj_weight[2 * width :]
    b_v = last.attn.in_proj_bias[2 * width :]
    v = _layer_norm(x, last.ln_1) @ w_v.T + b_v
    v = v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    v = v + x
    assert isinstance(last.mlp.gelu, nn.GELU)
    hidden = F.gelu(_layer_norm(v, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias)
    v = v + hidden @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
    out = _layer_norm(v, visual.ln_post)[0, 1:] @ visual.proj  # (gh*gw, E)
    out = out / out.norm(dim=-1, keepdim=True)
    return out.T.reshape(-1, gh, gw)


def official_dino_prepare_tokens(vit, x):
    """facebookresearch/dino vision_transformer.py prepare_tokens and interpolate_pos_encoding,
    line by line (``w`` is the height there, as prepare_tokens passes it)."""
    B, nc, w, h = x.shape
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat((vit.cls_token.expand(B, -1, -1), x), dim=1)
    npatch = x.shape[1] - 1
    N = vit.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return x + vit.pos_embed
    class_pos_embed = vit.pos_embed[:, 0]
    patch_pos_embed = vit.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // vit.patch_embed.patch_size[0]
    h0 = h // vit.patch_embed.patch_size[0]
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return x + torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_reference(model, window, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Last-block values of one window: DINO's own token preparation (timm's forward for a
    model with register tokens), timm's blocks, the last qkv output split."""
    patch = model.patch_embed.patch_size[0]
    x = _pad_normalize(window, patch, mean, std)
    captured = {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(
        lambda module, args, out: captured.update(qkv=out)
    )
    try:
        with torch.no_grad():
            if model.num_prefix_tokens == 1:
                model.blocks(official_dino_prepare_tokens(model, x[None]))
            else:
                model.forward_features(x[None])
    finally:
        hook.remove()
    qkv = captured["qkv"][0]  # (L, 3 * D): [q heads | k heads | v heads]
    heads = model.blocks[-1].attn.num_heads
    tokens = qkv.shape[0]
    values = qkv.reshape(tokens, 3, heads, -1)[:, 2].reshape(tokens, -1)
    values = values[model.num_prefix_tokens :]
    values = values / values.norm(dim=-1, keepdim=True)
    gh, gw = x.shape[1] // patch, x.shape[2] // patch
    return values.T.reshape(-1, gh, gw)


def _windows(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("size", [(224, 224), (200, 150), (100, 260), (448, 448)])
def test_maskclip_matches_step_by_step_computation(tiny_clip, size):
    windows = _windows(2, 3, *size, seed=size[0])
    feats = tiny_clip.dense_features(windows)
    gh, gw = math.ceil(size[0] / 16), math.ceil(size[1] / 16)
    assert feats.shape == (2, 32, gh, gw) and feats.dtype == torch.float32
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(
                feats[i], maskclip_reference(tiny_clip.model, windows[i]), atol=2e-5, rtol=1e-4
            )


@pytest.mark.slow
def test_maskclip_real_vit_b16_architecture():
    torch.manual_seed(0)
    encoder = load_clip("ViT-B-16", pretrained=None)
    window = _windows(1, 3, 224, 224, seed=5)
    feats = encoder.dense_features(window)
    assert feats.shape == (1, 512, 14, 14) and encoder.patch_size == 16
    with torch.no_grad():
        torch.testing.assert_close(
            feats[0], maskclip_reference(encoder.model, window[0]), atol=1e-4, rtol=1e-3
        )
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_maskclip_independent_of_block_layout(tiny_clip):
    # Older open_clip versions run the blocks sequence-first (L, B, D); the encoder must
    # read the layout from the model, not assume it.
    model = copy.deepcopy(tiny_clip.model)
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    seq_first = ClipEncoder(model, tiny_clip.tokenizer)
    windows = _windows(3, 3, 200, 150, seed=1)
    with torch.no_grad():  # the model's own forward agrees in both layouts
        pixels = _windows(2, 3, 224, 224, seed=3)
        torch.testing.assert_close(model.encode_image(pixels), tiny_clip.model.encode_image(pixels))
    torch.testing.assert_close(
        seq_first.dense_features(windows), tiny_clip.dense_features(windows), atol=1e-5, rtol=1e-4
    )


def test_batching_gives_the_same_features(tiny_clip, tiny_dino):
    windows = _windows(5, 3, 64, 48, seed=2)
    for encoder in (tiny_clip, tiny_dino):
        full = encoder.dense_features(windows)
        torch.testing.assert_close(encoder.dense_features(windows, batch_size=2), full)
        torch.testing.assert_close(encoder.dense_features(windows[3:4])[0], full[3])


def test_factory_arguments_are_checked():
    with pytest.raises(ValueError, match="precision"):
        load_clip("ViT-B-16", pretrained=None, precision="fp8")
    with pytest.raises(ValueError, match="name"):
        load_clip("not-a-model", pretrained=None)
    with pytest.raises(ValueError, match="pretrained"):
        load_clip("ViT-B-16", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="name"):
        load_dino("resnet50", pretrained=False)
    with pytest.raises(ValueError, match="name"):
        load_dino("vit_base_patch16_224.no_such_tag")


# ----------------------------------------------------------------------------- text


def _templates():
    return json.loads(TEMPLATES_JSON.read_text())["imagenet_templates"]


def test_text_embedding_is_the_template_average(tiny_clip):
    embeddings, index = tiny_clip.encode_classes(["cat", "traffic light"])
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32
    assert index.tolist() == [0, 1] and index.dtype == torch.int64
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    templates = _templates()
    assert len(templates) == 80
    with torch.no_grad():
        for row, name in enumerate(["cat", "traffic light"]):
            tokens = tiny_clip.tokenizer([t.format(name) for t in templates])
            per_prompt = tiny_clip.model.encode_text(tokens)
            per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
            mean = per_prompt.mean(dim=0)
            torch.testing.assert_close(embeddings[row], mean / mean.norm(), atol=1e-5, rtol=1e-4)


def test_synonyms_become_rows_mapped_to_their_class(tiny_clip):
    names = ["cat", "person; man ;woman", "dog"]
    embeddings, index = tiny_clip.encode_classes(names)
    assert embeddings.shape == (5, 32)
    assert index.tolist() == [0, 1, 1, 1, 2]
    single, _ = tiny_clip.encode_classes(["man", "woman", "dog"])
    torch.testing.assert_close(embeddings[2:], single)
    assert not torch.allclose(embeddings[1], embeddings[2])


def test_text_embeddings_are_cached_per_name(tiny_clip):
    calls = []
    hook = tiny_clip.model.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        first, _ = tiny_clip.encode_classes(["zebra", "giraffe"])
        assert len(calls) >= 1 and {"zebra", "giraffe"} <= set(tiny_clip.text_cache)
        calls.clear()
        again, index = tiny_clip.encode_classes(["giraffe; zebra"])
        assert calls == []  # no text-encoder pass for cached names
        torch.testing.assert_close(again, first.flip(0))
        assert index.tolist() == [0, 0]
    finally:
        hook.remove()


def test_an_empty_synonym_is_a_class_names_error(tiny_clip):
    with pytest.raises(ClassNamesError, match="empty"):
        tiny_clip.encode_classes(["cat", " ; "])


# ----------------------------------------------------------------------------- DINO


@pytest.mark.parametrize(
    ("fixture", "patch"), [("tiny_dino", 16), ("tiny_dino_p8", 8), ("tiny_dinov2", 14)]
)
@pytest.mark.parametrize("size", [(224, 224), (200, 150), (448, 448)])
def test_dino_values_match_split_of_last_qkv(request, fixture, patch, size):
    encoder = request.getfixturevalue(fixture)
    windows = _windows(2, 3, *size, seed=patch)
    feats = encoder.dense_features(windows)
    assert encoder.patch_size == patch
    assert feats.shape == (2, 64, math.ceil(size[0] / patch), math.ceil(size[1] / patch))
    for i in range(2):
        torch.testing.assert_close(
            feats[i], dino_reference(encoder.model, windows[i]), atol=2e-5, rtol=1e-4
        )


def test_dino_keeps_timms_positions_at_its_native_size(tiny_dino):
    """At 224 x 224 (DINO's own 14 x 14 grid) nothing is resampled: timm's forward gives the
    same values, so the default 224 windows are as before."""
    window = _windows(1, 3, 224, 224, seed=9)
    x = _pad_normalize(window[0], 16, IMAGENET_MEAN, IMAGENET_STD)[None]
    model, captured = tiny_dino.model, {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: captured.update(o=out))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    values = captured["o"][0, 1:, 128:]  # (196, 64): the v third of qkv, class token dropped
    want = F.normalize(values, dim=-1).T.reshape(64, 14, 14)
    torch.testing.assert_close(tiny_dino.dense_features(window)[0], want, atol=1e-6, rtol=0)


def test_dinov2_with_registers_drops_register_tokens(tiny_dino_kwargs):
    torch.manual_seed(4)
    encoder = load_dino(
        "vit_base_patch14_reg4_dinov2.lvd142m", pretrained=False, **tiny_dino_kwargs
    )
    assert encoder.model.num_prefix_tokens == 5
    window = _windows(1, 3, 98, 70, seed=4)
    feats = encoder.dense_features(window)
    assert feats.shape == (1, 64, 7, 5)
    torch.testing.assert_close(
        feats[0], dino_reference(encoder.model, window[0]), atol=2e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_dino_real_vit_b16_architecture():
    torch.manual_seed(0)
    encoder = load_dino("dino_vitb16", pretrained=False)
    window = _windows(1, 3, 224, 224, seed=6)
    feats = encoder.dense_features(window)
    assert feats.shape == (1, 768, 14, 14) and encoder.embed_dim == 768
    torch.testing.assert_close(
        feats[0], dino_reference(encoder.model, window[0]), atol=1e-4, rtol=1e-3
    )
    assert not any(p.requires_grad for p in encoder.parameters())


# ----------------------------------------------------------------------------- precision / device


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_device_and_precision(tiny_clip, tiny_dino, device, precision):
    windows = _windows(2, 3, 96, 80, seed=7)
    for encoder in (tiny_clip, tiny_dino):
        reference = encoder.dense_features(windows)
        moved = copy.deepcopy(encoder).to(device)
        if precision == "bf16":
            moved.model.to(torch.bfloat16)
        feats = moved.dense_features(windows)
        assert feats.dtype == torch.float32 and feats.device.type == device
        tol = 1e-4 if precision == "fp32" else 5e-2
        torch.testing.assert_close(feats.cpu(), reference, atol=tol, rtol=tol)
    text = copy.deepcopy(tiny_clip).to(device)
    embeddings, _ = text.encode_classes(["cat"])
    assert embeddings.device.type == device


def test_factory_precision_casts_the_model(tiny_dino_kwargs):
    encoder = load_dino("dino_vitb16", pretrained=False, precision="bf16", **tiny_dino_kwargs)
    assert encoder.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert encoder.dense_features(_windows(1, 3, 32, 32)).dtype == torch.float32


# ----------------------------------------------------------------------------- weights


def _same_clip(a, b):
    windows = _windows(2, 3, 120, 90, seed=8)
    torch.testing.assert_close(a.dense_features(windows), b.dense_features(windows))
    torch.testing.assert_close(a.encode_classes(["cat"])[0], b.encode_classes(["cat"])[0])


def test_clip_loads_safetensors_and_weights_only_pt(tiny_clip, tiny_clip_kwargs, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    save_file(state, tmp_path / "clip.safetensors")
    loaded = load_clip(
        "ViT-B-16", pretrained=None, weights=tmp_path / "clip.safetensors", **tiny_clip_kwargs
    )
    _same_clip(loaded, tiny_clip)
    # A training-style .pt: nested under "state_dict", DataParallel "module." prefixes.
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        tmp_path / "clip.pt",
    )
    loaded = load_clip("ViT-B-16", weights=str(tmp_path / "clip.pt"), **tiny_clip_kwargs)
    _same_clip(loaded, tiny_clip)
    # OpenCLIP's convention: a file path given as `pretrained`.
    _same_clip(load_clip("ViT-B-16", str(tmp_path / "clip.pt"), **tiny_clip_kwargs), tiny_clip)


def test_text_embeddings_persist_across_loads_of_the_same_weights(
    tiny_clip, tiny_clip_kwargs, tmp_path, monkeypatch
):
    monkeypatch.setenv("LPOSS_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, weights)
    first = load_clip("ViT-B-16", weights=weights, **tiny_clip_kwargs)
    expected, _ = first.encode_classes(["cat", "dog;puppy"])
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 3

    second = load_clip("ViT-B-16", weights=weights, **tiny_clip_kwargs)
    calls = []
    second.model.transformer.register_forward_hook(lambda *args: calls.append(1))
    cached, _ = second.encode_classes(["cat", "dog;puppy"])
    assert not calls  # read from disk: the text tower did not run
    torch.testing.assert_close(cached, expected)
    second.encode_classes(["bird"])
    assert calls  # a new name still runs it

    # Other weights never see these embeddings; random weights keep nothing on disk.
    other = tmp_path / "other.safetensors"
    save_file({k: (v + 0.01).contiguous() for k, v in tiny_clip.model.state_dict().items()}, other)
    assert load_clip("ViT-B-16", weights=other, **tiny_clip_kwargs).text_cache_dir != \
        second.text_cache_dir
    assert load_clip("ViT-B-16", pretrained=None, **tiny_clip_kwargs).text_cache_dir is None


def test_dino_loads_local_and_original_layout(tiny_dinov2, tiny_dino_kwargs, tmp_path):
    windows = _windows(1, 3, 70, 84, seed=9)
    expected = tiny_dinov2.dense_features(windows)
    state = tiny_dinov2.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "v2.safetensors")
    loaded = load_dino("dinov2_vitb14", weights=tmp_path / "v2.safetensors", **tiny_dino_kwargs)
    torch.testing.assert_close(loaded.dense_features(windows), expected)
    # The facebookresearch DINOv2 layout: a mask token timm does not use, nested, prefixed.
    original = {f"module.{k}": v for k, v in state.items()}
    original["module.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    torch.save({"model": original}, tmp_path / "dinov2_vitb14_pretrain.pth")
    loaded = load_dino(
        "dinov2_vitb14", weights=tmp_path / "dinov2_vitb14_pretrain.pth", **tiny_dino_kwargs
    )
    torch.testing.assert_close(loaded.dense_features(windows), expected)


def test_weights_folder_env_and_hub_cache(
    tiny_dino, tiny_clip, tiny_clip_kwargs, tiny_dino_kwargs, tmp_path, monkeypatch
):
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()},
        folder / "ViT-B-16-laion2b_s34b_b88k.safetensors",
    )
    monkeypatch.setenv("LPOSS_WEIGHTS", str(folder))
    _same_clip(load_clip("ViT-B-16", cache_dir=tmp_path / "empty", **tiny_clip_kwargs), tiny_clip)
    # The Hugging Face Hub cache layout (what timm leaves after a download), no network.
    windows = _windows(1, 3, 64, 64, seed=10)
    snapshot = tmp_path / "hub/models--timm--vit_base_patch16_224.dino/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("abc123")
    save_file(dict(tiny_dino.model.state_dict()), snapshot / "model.safetensors")
    loaded = load_dino("dino_vitb16", cache_dir=tmp_path / "hub", **tiny_dino_kwargs)
    torch.testing.assert_close(loaded.dense_features(windows), tiny_dino.dense_features(windows))


class _Opaque:
    """A pickled object: unpickling it would run __setstate__."""

    unpickled = False

    def __setstate__(self, state):
        type(self).unpickled = True


def test_pickled_objects_are_refused(tiny_dino, tiny_dino_kwargs, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_dino.model.state_dict(), "args": _Opaque()}, path)
    with pytest.raises(UnsafeCheckpointError, match="pickled"):
        load_dino("dino_vitb16", weights=path, **tiny_dino_kwargs)
    assert not _Opaque.unpickled


def test_wrong_or_missing_file_is_a_weights_error(tiny_clip_kwargs, tiny_dino_kwargs, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_dino("dino_vitb16", weights=tmp_path / "nope.safetensors", **tiny_dino_kwargs)
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsNotFoundError, match="does not hold weights"):
        load_clip("ViT-B-16", weights=tmp_path / "other.safetensors", **tiny_clip_kwargs)


def _no_weights_anywhere(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("LPOSS_WEIGHTS", str(empty))
    return empty


def test_missing_weights_offline_say_how_to_provide_them(
    tiny_clip_kwargs, tiny_dino_kwargs, tmp_path, monkeypatch
):
    cache = _no_weights_anywhere(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as clip_err:
        load_clip("ViT-B-16", "laion2b_s34b_b88k", cache_dir=cache, **tiny_clip_kwargs)
    message = str(clip_err.value)
    for hint in (
        "--clip-weights",
        "weights=",
        "LPOSS_WEIGHTS",
        "ViT-B-16-laion2b_s34b_b88k.safetensors",
        "HF_HUB_OFFLINE",
        "hf download",
    ):
        assert hint in message
    with pytest.raises(WeightsNotFoundError) as dino_err:
        load_dino("dino_vitb8", cache_dir=cache, **tiny_dino_kwargs)
    for hint in ("--dino-weights", "weights=", "LPOSS_WEIGHTS", "dino_vitb8.safetensors"):
        assert hint in str(dino_err.value)


def test_unreachable_hub_gives_the_typed_error(tiny_dino_kwargs, tmp_path, monkeypatch):
    # Not offline, but the Hub endpoint refuses connections: no retries, the typed error.
    cache = _no_weights_anywhere(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsNotFoundError, match="unreachable"):
        load_dino("dino_vitb16", cache_dir=cache, **tiny_dino_kwargs)


def test_encoder_constructors_reject_other_models():
    with pytest.raises(TypeError):
        ClipEncoder(nn.Linear(2, 2), tokenizer=None)
    with pytest.raises(TypeError):
        DinoEncoder(nn.Linear(2, 2))
