"""The CLIP last-block predictors against step-by-step transcriptions of their official code.

Each ``official_*`` below follows the official file line by line (sequence-first ``(L, B, D)``
tokens, ``chunk``/``view(-1, bsz * heads, hd)`` head split, ``bmm``), on the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lposs.pipeline.windows import pad_to_multiple
from lposs.predictors import clearclip, maskclip, naclip, sclip
from lposs.predictors.common import resized_positional_embedding, tokens_before_last_block

TOL = {"atol": 1e-5, "rtol": 1e-5}


def official_interpolate_pos_encoding(visual, x, w, h):
    """SCLIP/NACLIP clip/model.py, ClearCLIP open_clip/transformer.py interpolate_pos_encoding."""
    npatch = x.shape[1] - 1
    N = visual.positional_embedding.shape[0] - 1
    if npatch == N and w == h:
        return visual.positional_embedding
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0, h0 = w // visual.patch_size[0] + 0.1, h // visual.patch_size[1] + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_custom_attn(attn_layer, x, strategy, addition=None):
    """custom_attn of the three repos; x is (L, B, D)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if strategy == "csa":
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    elif strategy == "clearclip":
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    else:  # naclip
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights += addition
        attn_weights = F.softmax(attn_weights, dim=-1)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def official_gaussian_window(dim1, dim2, std=1.0):
    """NACLIP clip/model.py gaussian_window."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, dim))
    return torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))


def official_attention_addition(dim1, dim2, window):
    """NACLIP clip/model.py get_attention_addition (adjust_for_cls=True)."""
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1),
                   padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])


def official_forward(visual, img, method, gaussian_std=5.0):
    """VisionTransformer.forward(return_all=True) of SCLIP (csa), ClearCLIP, NACLIP (reduced)."""
    _, _, w, h = img.shape
    n_patches = (w // visual.patch_size[0], h // visual.patch_size[1])
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + official_interpolate_pos_encoding(visual, x, w, h)
    else:
        x = x + visual.positional_embedding
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x.transpose(0, 1)).transpose(0, 1)  # open_clip >= 2.24 blocks are batch-first
    blk = visual.transformer.resblocks[-1]
    if method == "sclip":
        x = x + official_custom_attn(blk.attn, blk.ln_1(x), "csa")
        x = x + blk.mlp(blk.ln_2(x))
    elif method == "clearclip":  # ignore_residual=True: output = custom_attn(...)
        x = official_custom_attn(blk.attn, blk.ln_1(x), "clearclip")
    else:
        window = official_gaussian_window(*[s * 2 - 1 for s in n_patches], std=gaussian_std)
        addition = official_attention_addition(*n_patches, window).unsqueeze(0)
        x = official_custom_attn(blk.attn, blk.ln_1(x), "naclip", addition)
    x = x.permute(1, 0, 2)
    tokens = visual.ln_post(x) @ visual.proj
    return tokens[:, 1:].transpose(1, 2).reshape(img.shape[0], -1, *n_patches)


@pytest.fixture(scope="module")
def visual(tiny_clip):
    assert tiny_clip.model.visual.transformer.resblocks[0].attn.batch_first
    return tiny_clip.model.visual


@pytest.mark.parametrize("size", [(64, 96), (224, 224), (80, 48)])
@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
def test_matches_official_forward(visual, name, size):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *size)
    module = {"sclip": sclip, "clearclip": clearclip, "naclip": naclip}[name]
    with torch.no_grad():
        got = module.dense_features(visual, pixels)
        want = official_forward(visual, pixels, name)
    assert got.shape == (2, visual.proj.shape[1], size[0] // 16, size[1] // 16)
    torch.testing.assert_close(got, want, **TOL)


def test_naclip_std_changes_features_and_bias_matches_official(visual):
    window = official_gaussian_window(7, 11, std=2.5)
    torch.testing.assert_close(naclip.neighbourhood_bias(4, 6, 2.5),
                               official_attention_addition(4, 6, window), **TOL)
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got = naclip.dense_features(visual, pixels, gaussian_std=2.5)
        want = official_forward(visual, pixels, "naclip", gaussian_std=2.5)
        assert not torch.allclose(got, naclip.dense_features(visual, pixels), atol=1e-4)
    torch.testing.assert_close(got, want, **TOL)


def test_maskclip_equals_clip_encoder(tiny_clip):
    windows = torch.rand(3, 3, 48, 80)
    with torch.no_grad():
        padded = pad_to_multiple(windows.float(), tiny_clip.patch_size)
        pixels = (padded - tiny_clip.mean.view(1, 3, 1, 1)) / tiny_clip.std.view(1, 3, 1, 1)
        got = F.normalize(maskclip.dense_features(tiny_clip.model.visual, pixels), dim=1)
        want = tiny_clip.dense_features(windows)
    torch.testing.assert_close(got, want, **TOL)


def test_pos_rules_differ_off_grid_and_agree_on_it(visual):
    size = resized_positional_embedding(visual, 4, 6, pos_rule="size")
    scale = resized_positional_embedding(visual, 4, 6, pos_rule="scale")
    assert size.shape == scale.shape == (25, visual.positional_embedding.shape[1])
    torch.testing.assert_close(size[0], scale[0])
    assert not torch.allclose(size[1:], scale[1:], atol=1e-4)
    same = resized_positional_embedding(visual, 14, 14, pos_rule="scale")
    assert same is visual.positional_embedding
    with pytest.raises(ValueError, match="pos_rule"):
        resized_positional_embedding(visual, 4, 6, pos_rule="nearest")


def test_tokens_before_last_block_follow_the_blocks(visual):
    """With the last block run as is, the class token gives OpenCLIP's own image embedding."""
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x, grid = tokens_before_last_block(visual, pixels, pos_rule="size")
        x = visual.transformer.resblocks[-1](x)
        want = visual.ln_post(x[:, 0]) @ visual.proj
        pooled = visual(pixels)
    assert grid == (14, 14)
    torch.testing.assert_close(want, pooled, **TOL)


def test_bad_pixels_raise(visual):
    with pytest.raises(ValueError, match="pixels"):
        sclip.dense_features(visual, torch.zeros(1, 4, 32, 32))
