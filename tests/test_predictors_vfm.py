"""ProxyCLIP and CLIP-DINOiser (lposs.predictors.proxyclip / clip_dinoiser) against the official
code written out step by step: mc-lan/ProxyCLIP ``open_clip/transformer.py`` and
``proxyclip_segmentor.py``; wysoczanska/clip_dinoiser ``models/clip_dinoiser/clip_dinoiser.py``
and ``models/maskclip/maskclip.py``; facebookresearch/dino ``vision_transformer.py``. Small
random-weight OpenCLIP and timm models, the same weights on both sides."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_KWARGS, perturb_
from safetensors.torch import save_file
from torch import nn

from lposs.encoders import load_clip
from lposs.encoders.dino import dino_value_features, interpolate_pos_encoding
from lposs.errors import UnsafeCheckpointError, WeightsNotFoundError
from lposs.predictors import clip_dinoiser as cd
from lposs.predictors import proxyclip

ATOL = 1e-5


@pytest.fixture(scope="module")
def clip4():
    """A ClipEncoder over a random OpenCLIP ViT with 4 blocks (the trained form reads -3)."""
    kwargs = {**TINY_CLIP_KWARGS, "vision_cfg": {**TINY_CLIP_KWARGS["vision_cfg"], "layers": 4}}
    torch.manual_seed(4)
    encoder = load_clip("ViT-B-16", pretrained=None, **kwargs)
    perturb_(encoder.model, 4)
    return encoder


def _normalised(encoder, windows):
    return (windows - encoder.mean.view(1, 3, 1, 1)) / encoder.std.view(1, 3, 1, 1)


# --------------------------------------------------------- facebookresearch/dino, written out
def official_interpolate_pos_encoding(pos_embed, patch_size, x, w, h):
    """vision_transformer.py VisionTransformer.interpolate_pos_encoding (open_clip/transformer.py
    of ProxyCLIP has the same lines); ``w`` is the height there, as its caller passes it."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_prepare_tokens(vit, x):
    """vision_transformer.py prepare_tokens (PatchEmbed: proj, flatten, transpose)."""
    B, nc, w, h = x.shape
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    cls_tokens = vit.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + official_interpolate_pos_encoding(vit.pos_embed, vit.patch_embed.patch_size[0], x, w, h)
    return x


@pytest.mark.parametrize("grid", [(28, 28), (20, 33), (9, 7), (14, 14)])
def test_interpolate_pos_encoding_is_dinos_rule(grid):
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    x = torch.zeros(1, 1 + grid[0] * grid[1], 8)
    expected = official_interpolate_pos_encoding(pos, 16, x, grid[0] * 16, grid[1] * 16)[0]
    got = interpolate_pos_encoding(pos[0], *grid)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    if grid != (14, 14):  # the +0.1 / scale_factor rule is not a resize to the grid's size
        by_size = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=grid,
                                mode="bicubic", align_corners=False)
        assert (got[1:] - by_size.flatten(2)[0].T).abs().max() > 1e-3


# ------------------------------------------------------------------ ProxyCLIP, written out
def official_vfm_features(vit, imgs_norm):
    """proxyclip_segmentor.py forward_feature, vfm_model == 'dino'."""
    x = official_prepare_tokens(vit, imgs_norm)
    for blk in vit.blocks:  # get_intermediate_layers(imgs_norm)[0]: norm of the last output
        x = blk(x)
    feat = vit.norm(x)
    nb_im = feat.shape[0]
    patch_size = vit.patch_embed.patch_size[0]
    I, J = imgs_norm[0].shape[-2] // patch_size, imgs_norm[0].shape[-2] // patch_size  # noqa: E741
    return feat[:, 1:, :].reshape(nb_im, I, J, -1).permute(0, 3, 1, 2)


def official_custom_attn(attn_layer, x, ex_feats, beta, gamma, token_size):
    """open_clip/transformer.py VisionTransformer.custom_attn (x: LND)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim)
    v = F.interpolate(v.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def official_proxyclip(visual, x, ex_feats, beta=1.2, gamma=3.0):
    """open_clip/transformer.py VisionTransformer.forward with ex_feats: (B, H*W, E)."""
    B, nc, w, h = x.shape
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(B, -1, -1), x], dim=1)
    pos = visual.positional_embedding
    if x.shape[1] != pos.shape[0]:
        x = x + official_interpolate_pos_encoding(pos[None], visual.patch_size[0], x, w, h)
    else:
        x = x + pos
    x = visual.ln_pre(x)
    token_size = h // visual.patch_size[0], w // visual.patch_size[1]
    for blk in visual.transformer.resblocks[:-1]:  # open_clip >= 2.24 blocks are batch-first
        x = blk(x)
    x = x.permute(1, 0, 2)  # NLD -> LND, the layout custom_attn reads
    blk = visual.transformer.resblocks[-1]
    x = official_custom_attn(blk.attn, blk.ln_1(x), ex_feats, beta, gamma, token_size)
    x = x.permute(1, 0, 2)
    return visual.ln_post(x) @ visual.proj


def _as_grid(tokens, h, w):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@torch.no_grad()
def test_dino_output_features_are_proxyclips_vfm_features(tiny_dino_p8):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = official_vfm_features(tiny_dino_p8.model, pixels)
    got = proxyclip.dino_output_features(tiny_dino_p8.model, pixels)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_proxyclip_is_official_per_window(clip4, tiny_dino_p8):
    visual = clip4.model.visual
    generator = torch.Generator().manual_seed(2)
    windows = torch.rand(2, 3, 64, 64, generator=generator)
    windows[1] = windows[1] * 0.3 + 0.5  # a flatter second window: another mean similarity
    ex_feats = official_vfm_features(tiny_dino_p8.model, torch.randn(2, 3, 64, 64,
                                                                     generator=generator))
    pixels = _normalised(clip4, windows)
    got = proxyclip.dense_features(visual, pixels, ex_feats, gamma=3.0, beta=1.2)
    assert got.shape == (2, 32, 8, 8)
    for i in range(2):
        feats = F.normalize(ex_feats[i].flatten(1), dim=0)
        shifted = feats.T @ feats - 1.2 * (feats.T @ feats).mean()
        assert (shifted < 0).any() and (shifted > 0).any()  # the mask is exercised
        expected = official_proxyclip(visual, pixels[i : i + 1], ex_feats[i : i + 1])
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got[i : i + 1], _as_grid(expected, 8, 8), atol=ATOL, rtol=0)
    batched = _as_grid(official_proxyclip(visual, pixels, ex_feats), 8, 8)
    assert (batched - got).abs().max() > 1e-4  # the official batch-wide mean is not per window


@torch.no_grad()
def test_proxyclip_without_positive_entries_keeps_each_tokens_value(clip4):
    """VFM features that all point one way: beta * mean > 1, every entry negative. The official
    code gives NaN; lposs gives what orthogonal VFM features give (attention = identity)."""
    visual = clip4.model.visual
    generator = torch.Generator().manual_seed(3)
    pixels = _normalised(clip4, torch.rand(1, 3, 64, 64, generator=generator))
    aligned = 1 + 0.05 * torch.randn(1, 64, 8, 8, generator=generator)
    assert torch.isnan(official_proxyclip(visual, pixels, aligned)).all()
    orthogonal = torch.eye(64).reshape(1, 64, 8, 8)  # cos = I: only the diagonal survives
    expected = _as_grid(official_proxyclip(visual, pixels, orthogonal), 8, 8)
    got = proxyclip.dense_features(visual, pixels, aligned, gamma=3.0, beta=1.2)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    weights = proxyclip.proxy_attention(aligned, gamma=3.0, beta=1.2)
    torch.testing.assert_close(weights[0], torch.eye(64))


# --------------------------------------------------------------- CLIP-DINOiser, written out
def official_maskclip(visual, inputs, patch_size=16, img_size=224):
    """maskclip.py MaskClip.extract_feat + MaskClipHead.proj, and the hook of clip_dinoiser.py
    on resblocks[-3].ln_2: (feat (B, E, h, w), clip_inter (B, N, width))."""
    B, C, H, W = inputs.shape
    hw_shape = (H // patch_size, W // patch_size)
    pos_h = pos_w = img_size // patch_size
    pos_embed = visual.positional_embedding[None]  # resize_pos_embed(self._positional_embd[None])
    cls_token_weight = pos_embed[:, 0]
    pos_embed_weight = pos_embed[:, (-1 * pos_h * pos_w) :]
    pos_embed_weight = pos_embed_weight.reshape(1, pos_h, pos_w, pos_embed.shape[2])
    pos_embed_weight = F.interpolate(pos_embed_weight.permute(0, 3, 1, 2), size=hw_shape,
                                     align_corners=False, mode="bicubic")
    cls_token_weight = cls_token_weight.unsqueeze(1)
    pos_embed_weight = torch.flatten(pos_embed_weight, 2).transpose(1, 2)
    positional_embedding = torch.cat((cls_token_weight, pos_embed_weight), dim=1)[0]
    # _ = self.backbone(inputs): open_clip's VisionTransformer.forward, hooked
    x = visual.conv1(inputs).reshape(B, visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(B, -1, -1), x], dim=1)
    x = visual.ln_pre(x + positional_embedding)
    blocks = visual.transformer.resblocks
    for i, blk in enumerate(blocks[:-1]):
        if i == len(blocks) - 3:  # the ln_2 output of block -3: x + attention, normed
            clip_inter = blk.ln_2(x + blk.attention(q_x=blk.ln_1(x)))
        x = blk(x)
    x = x.permute(1, 0, 2)  # hook_features["v"] is LND in the official open_clip
    block = blocks[-1]  # extract_v
    y = block.ln_1(x)
    y = torch.nn.functional.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
    Bq, N, Cq = y.shape
    y = y.view(Bq, N, 3, Cq // 3).permute(2, 0, 1, 3).reshape(3 * Bq, N, Cq // 3)
    y = F.linear(y, block.attn.out_proj.weight, block.attn.out_proj.bias)
    q, k, v = y.tensor_split(3, dim=0)
    v += x
    v += block.mlp(block.ln_2(v))
    v = visual.ln_post(v.permute(1, 0, 2))[:, 1:]
    v = v.reshape(B, hw_shape[0], hw_shape[1], -1).permute(0, 3, 1, 2).contiguous()
    return F.conv2d(v, visual.proj.t()[:, :, None, None]), clip_inter


def official_weighted_pool(maskclip_feats, corrs):
    """clip_dinoiser.py DinoCLIP.compute_weighted_pool."""
    B = maskclip_feats.shape[0]
    h_m, w_m = maskclip_feats.shape[-2:]
    h_w, w_w = corrs.shape[-2:]
    if (h_m != h_w) or (w_m != w_w):
        maskclip_feats = F.interpolate(maskclip_feats, size=(h_w, w_w), mode="bilinear",
                                       align_corners=False)
        h_m, w_m = h_w, w_w
    maskclip_feats_ref = torch.einsum("bnij, bcij -> bcn", corrs, maskclip_feats)
    norm_factor = corrs.flatten(-2, -1).sum(dim=-1)[:, None]
    maskclip_feats_ref = maskclip_feats_ref / (norm_factor + 1e-6)
    return maskclip_feats_ref.reshape(B, -1, h_m, w_m)


def official_dino_corrs(vit, batch, gamma=0.2):
    """get_dino_features (FOUND's qkv hook, extract_feats 'v') and get_dino_corrs."""
    hook_features = {}
    hook = vit.blocks[-1].attn.qkv.register_forward_hook(
        lambda module, input, output: hook_features.__setitem__("qkv", output))
    x = official_prepare_tokens(vit, batch)
    for blk in vit.blocks:
        x = blk(x)
    hook.remove()
    h_featmap, w_featmap = (s // vit.patch_embed.patch_size[0] for s in batch.shape[-2:])
    nh = vit.blocks[-1].attn.num_heads
    nb_im, nb_tokens, C_qkv = hook_features["qkv"].shape
    qkv = hook_features["qkv"].reshape(nb_im, nb_tokens, 3, nh, C_qkv // nh // 3)
    feats = qkv.permute(2, 0, 3, 1, 4)[2].transpose(1, 2).float()
    feats = feats[:, 1:, :, :].flatten(-2, -1).permute(0, 2, 1)
    feats = feats / feats.norm(dim=1, keepdim=True)
    B = feats.shape[0]
    corrs = torch.matmul(feats.permute(0, 2, 1), feats).reshape(B, h_featmap, w_featmap, -1)
    assert (corrs < gamma).any() and (corrs >= gamma).any()  # the threshold is exercised
    corrs[corrs < gamma] = 0.0
    return corrs.permute(0, 3, 1, 2)


@torch.no_grad()
def test_maskclip_features_are_the_official_and_lposs_maskclip(clip4):
    windows = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    pixels = _normalised(clip4, windows)
    maskclip, inter = cd.maskclip_features(clip4.model.visual, pixels)
    expected, expected_inter = official_maskclip(clip4.model.visual, pixels)
    torch.testing.assert_close(maskclip, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(inter, _as_grid(expected_inter[:, 1:], 4, 6), atol=ATOL, rtol=0)
    encoder_features = clip4.dense_features(windows)  # lposs's MaskCLIP, L2-normalised
    torch.testing.assert_close(F.normalize(maskclip, dim=1), encoder_features, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dino_name", ["tiny_dino", "tiny_dino_p8"])
@torch.no_grad()
def test_training_free_form_is_official(clip4, dino_name, request):
    dino = request.getfixturevalue(dino_name)
    windows = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    dino_pixels = _normalised(dino, windows)
    maskclip, _ = cd.maskclip_features(clip4.model.visual, _normalised(clip4, windows))
    got = cd.training_free_features(
        maskclip, dino_value_features(dino.model, dino_pixels), gamma=0.2)
    feats, _ = official_maskclip(clip4.model.visual, _normalised(clip4, windows))
    expected = official_weighted_pool(feats, official_dino_corrs(dino.model, dino_pixels))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _heads_checkpoint(in_size=64, in_dim=16, bkg_bias=0.0):
    generator = torch.Generator().manual_seed(7)
    return {"obj_proj.weight": torch.randn(in_dim, in_size, 3, 3, generator=generator) * 0.1,
            "obj_proj.bias": torch.randn(in_dim, generator=generator) * 0.1,
            "bkg_decoder.weight": torch.randn(1, in_size, 1, 1, generator=generator),
            "bkg_decoder.bias": torch.tensor([bkg_bias])}


@torch.no_grad()
def test_trained_form_is_official(clip4, tmp_path):
    """CLIP_DINOiser.forward_pass / forward, cls_seg and apply_found, written out."""
    windows = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    pixels = _normalised(clip4, windows)
    clip_proj_feats, inter = official_maskclip(clip4.model.visual, pixels)
    B, c_dim, h, w = 1, 64, 4, 6
    clip_feats = inter[:, 1:].permute(0, 2, 1).reshape(B, c_dim, h, w)
    output = clip_feats / clip_feats.norm(dim=1, keepdim=True)
    checkpoint = _heads_checkpoint()
    bkg_decoder, obj_proj = nn.Conv2d(64, 1, (1, 1)), nn.Conv2d(64, 16, (3, 3), padding=1,
                                                                 padding_mode="replicate")
    bkg_decoder.load_state_dict({"weight": checkpoint["bkg_decoder.weight"],
                                 "bias": torch.zeros(1)})
    checkpoint["bkg_decoder.bias"] = -bkg_decoder(output).median().view(1)  # half are objects
    bkg_decoder.bias.copy_(checkpoint["bkg_decoder.bias"])
    obj_proj.load_state_dict({"weight": checkpoint["obj_proj.weight"],
                              "bias": checkpoint["obj_proj.bias"]})
    torch.save({"epoch": 99, "model_state_dict": checkpoint}, tmp_path / "last.pt")

    proj_feats = obj_proj(clip_feats).reshape(B, 16, -1)
    proj_feats = proj_feats / proj_feats.norm(dim=1, keepdim=True)
    corrs = torch.matmul(proj_feats.permute(0, 2, 1), proj_feats).reshape(B, h * w, h, w)
    preds = F.interpolate(bkg_decoder(output), (h, w), mode="bilinear", align_corners=False)
    corrs[corrs < 0.2] = 0.0
    out_feats = official_weighted_pool(clip_proj_feats, corrs)
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(9)), dim=1)
    probs = F.softmax(100 * F.conv2d(F.normalize(out_feats, dim=1), text[:, :, None, None]), dim=1)
    delta = float(probs.max(dim=1).values.median())  # half are uncertain
    expected = probs.clone()
    r_hard_found = (torch.sigmoid(preds).reshape(-1) > 0.5).float()
    uncertain = (expected.max(dim=1)[0] < delta).reshape(-1)
    expected.reshape(1, 3, -1)[:, 0, uncertain & (~r_hard_found.bool())] = 1.0

    heads = cd.load_dinoiser_weights(tmp_path / "last.pt")
    maskclip, intermediate = cd.maskclip_features(clip4.model.visual, pixels)
    pooled, background = cd.trained_features(maskclip, intermediate, heads, gamma=0.2)
    torch.testing.assert_close(pooled, out_feats, atol=ATOL, rtol=0)
    torch.testing.assert_close(background, preds, atol=ATOL, rtol=0)
    ours = F.softmax(100 * F.conv2d(F.normalize(pooled, dim=1), text[:, :, None, None]), dim=1)
    got = cd.apply_background(ours, background, delta=delta)
    changed = (got != ours).any(dim=1)
    assert 0 < int(changed.sum()) < h * w
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_load_dinoiser_weights_formats_and_errors(tmp_path):
    checkpoint = _heads_checkpoint(in_size=48, in_dim=8, bkg_bias=0.5)
    save_file(checkpoint, str(tmp_path / "heads.safetensors"))
    heads = cd.load_dinoiser_weights(tmp_path / "heads.safetensors")
    assert heads.obj_proj.padding_mode == "replicate" and heads.obj_proj.padding == (1, 1)
    for key, value in checkpoint.items():
        torch.testing.assert_close(heads.state_dict()[key], value, atol=0, rtol=0)
    partial = {k: v for k, v in checkpoint.items() if k != "bkg_decoder.bias"}
    torch.save({"epoch": 1, "model_state_dict": partial}, tmp_path / "partial.pt")
    with pytest.raises(WeightsNotFoundError, match=r"missing bkg_decoder\.bias"):
        cd.load_dinoiser_weights(tmp_path / "partial.pt")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        cd.load_dinoiser_weights(tmp_path / "absent.pt")
    torch.save({"model_state_dict": checkpoint, "args": argparse.Namespace(lr=1)},
               tmp_path / "pickled.pt")
    with pytest.raises(UnsafeCheckpointError):
        cd.load_dinoiser_weights(tmp_path / "pickled.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="not a readable checkpoint"):
        cd.load_dinoiser_weights(tmp_path / "junk.pt")


def test_protocol_datasets_are_lposs_benchmarks():
    from lposs.evaluation.datasets import DATASETS

    for protocol in (proxyclip.PROTOCOL, cd.PROTOCOL):
        assert set(protocol["datasets"]) == set(DATASETS)
