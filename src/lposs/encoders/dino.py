"""The vision model of the graph: a timm DINO / DINOv2 ViT giving last-block value features.

Features (METHOD.md, Encoders): the value vectors of the last block's attention, taken
from its ``qkv`` projection after that block's ``norm1``, all heads concatenated, with
the class and register tokens dropped. Positional embeddings are resampled as
facebookresearch/dino ``vision_transformer.py`` does (:func:`interpolate_pos_encoding`),
which the paper's pipeline (through torch.hub) and FOUND / ProxyCLIP use, not as timm does.
"""

from __future__ import annotations

import math
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsNotFoundError
from .common import DenseEncoder
from .device import PRECISIONS, resolve_device, resolve_precision
from .sources import WeightsSource, resolve_dino_weights, timm_name_and_config
from .weights import build_with_weights, read_checkpoint

__all__ = ["DinoEncoder", "load_dino", "interpolate_pos_encoding", "dino_tokens",
           "dino_value_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageNet pixel mean (RGB)
IMAGENET_STD = (0.229, 0.224, 0.225)  # ImageNet pixel std (RGB)


def interpolate_pos_encoding(pos_embed: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """facebookresearch/dino ``interpolate_pos_encoding``: the square grid resized bicubically
    by ``scale_factor = (g + 0.1) / sqrt(N)`` (not to a size, as timm does), unchanged when
    ``gh == gw`` and ``gh * gw == N``; computed in float32.

    Args:
        pos_embed: ``(1 + N, D)``, the class token's row first, N a square.
        grid_h: gh, patch rows of the input; grid_w: gw, its patch columns.

    Returns:
        ``(1 + gh * gw, D)`` in ``pos_embed``'s dtype.
    """
    n = pos_embed.shape[0] - 1
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    side = math.sqrt(n)
    grid = pos_embed[1:].float().reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], grid])


def dino_tokens(model: nn.Module, pixels: Tensor) -> Tensor:
    """facebookresearch/dino ``prepare_tokens`` on a timm ViT built with
    ``dynamic_img_size=True``: ``(B, 3, H, W)`` normalised pixels, H and W multiples of P ->
    ``(B, 1 + gh * gw, D)`` tokens, class token first. A model with register tokens (or no
    class row in ``pos_embed``) gets timm's own ``_pos_embed`` instead."""
    x = model.patch_embed(pixels)  # (B, gh, gw, D)
    if model.num_prefix_tokens != 1 or not model.has_class_token or model.no_embed_class:
        return model._pos_embed(x)
    batch, grid_h, grid_w, _ = x.shape
    x = torch.cat([model.cls_token.expand(batch, -1, -1).to(x.dtype), x.flatten(1, 2)], dim=1)
    return x + interpolate_pos_encoding(model.pos_embed[0], grid_h, grid_w).to(x.dtype)


def dino_value_features(model: nn.Module, pixels: Tensor) -> Tensor:
    """The last block's value vectors, all heads (FOUND's hook on ``blocks[-1].attn.qkv``).

    Args:
        model: a timm DINO ViT (see :func:`dino_tokens`).
        pixels: ``(B, 3, H, W)`` ImageNet-normalised, H and W multiples of the patch size P.

    Returns:
        ``(B, D, H/P, W/P)`` unnormalised, class and register tokens dropped.
    """
    x = model.norm_pre(dino_tokens(model, pixels))
    for block in model.blocks[:-1]:
        x = block(x)
    last = model.blocks[-1]
    qkv, dim = last.attn.qkv, last.attn.qkv.out_features // 3
    bias = qkv.bias[2 * dim :] if qkv.bias is not None else None
    values = F.linear(last.norm1(x), qkv.weight[2 * dim :], bias)[:, model.num_prefix_tokens :]
    patch = model.patch_embed.patch_size[0]
    return values.transpose(1, 2).reshape(x.shape[0], dim, pixels.shape[-2] // patch, -1)


class DinoEncoder(DenseEncoder):
    """A frozen timm VisionTransformer giving the value features of its last block.

    Args:
        model: a timm ``VisionTransformer`` created with ``dynamic_img_size=True``.
        mean, std: pixel mean and std (RGB); default: the model's pretrained config, else
            ImageNet's.

    Attributes:
        model: the wrapped timm model.
        patch_size: P, the patch size in pixels (16, 8 or 14).
        embed_dim: D, the size of the concatenated value vectors (768 for ViT-B).
    """

    def __init__(self, model: nn.Module, *, mean=None, std=None) -> None:
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError("model must be a timm VisionTransformer")
        qkv = getattr(model.blocks[-1].attn, "qkv", None)
        if not isinstance(qkv, nn.Linear) or not getattr(model, "dynamic_img_size", False):
            raise ValueError("a timm ViT with a fused qkv nn.Linear, created with "
                             "dynamic_img_size=True, is needed")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(mean or cfg.get("mean") or IMAGENET_MEAN,
                         std or cfg.get("std") or IMAGENET_STD, qkv.weight.device)
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = qkv.out_features // 3

    def _dtype(self) -> torch.dtype:
        return self.model.blocks[-1].attn.qkv.weight.dtype

    def _features(self, x: Tensor) -> Tensor:
        return dino_value_features(self.model, x)


def load_dino(
    name: str = "dino_vitb16",
    *,
    weights: str | os.PathLike | WeightsSource | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs,
) -> DinoEncoder:
    """Build a DINO / DINOv2 ViT from timm as a frozen :class:`DinoEncoder`; ``weights_info``
    says where its weights came from.

    Weights are searched as :mod:`lposs.encoders.sources` says; ``$LPOSS_WEIGHTS`` may hold
    ``<name><ext>``, ``<timm name><ext>`` or the original release's file name (e.g.
    ``dino_vitbase16_pretrain.pth``), whose key layout timm's checkpoint filter maps.

    Args:
        name: ``dino_vitb16``, ``dino_vitb8``, ``dinov2_vitb14`` (``DINO_MODELS``), or a timm
            ViT name with its pretrained tag, e.g. ``vit_base_patch14_reg4_dinov2.lvd142m``.
        weights: a local checkpoint, or a ``WeightsSource``.
        device: where the model runs (default: CPU).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (GPU only) or ``"auto"``
            (:func:`lposs.encoders.resolve_precision`); features are returned as float32.
        pretrained: False (and no ``weights``): random weights.
        cache_dir: Hugging Face Hub cache folder (default: huggingface_hub's).
        **model_kwargs: architecture overrides for ``timm.create_model`` (small tests).

    Raises:
        ConfigError: unknown model name, precision or device.
        WeightsNotFoundError: no weights found, or a file that is not a checkpoint of
            this model; the message names the file or says how to provide them.
        UnsafeCheckpointError: the checkpoint holds pickled objects.
    """
    import timm

    timm_name, _ = timm_name_and_config(name)
    device = resolve_device(device)
    dtype = PRECISIONS[resolve_precision(precision, device)]
    source = weights if isinstance(weights, WeightsSource) else resolve_dino_weights(
        name, weights=weights, pretrained=pretrained, cache_dir=cache_dir)
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **model_kwargs}

    def build(on: torch.device) -> nn.Module:
        with on:
            return timm.create_model(timm_name, pretrained=False, **kwargs)

    if source.path is None:
        model = build(torch.device("cpu"))
    else:  # the file is read before the model is built: a bad file fails fast
        state_dict = read_checkpoint(source.path, strip_prefixes=("module.", "backbone."))
        convert = partial(_convert_dino_keys, f"{source.path} does not hold weights of "
                          f"{name!r} (timm {timm_name})")
        model = build_with_weights(build, convert, state_dict, source.path, name)
        del state_dict  # its tensors are the parameters now: a cast must not keep both
    encoder = DinoEncoder(model.to(device=device, dtype=dtype))
    encoder.weights_info = source.info()
    return encoder


def _convert_dino_keys(mismatch: str, model: nn.Module, checkpoint: dict) -> dict:
    """timm's mapping of the original DINO / DINOv2 keys to its own, without the head;
    ``mismatch`` begins the error when the keys do not map."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        mapped = checkpoint_filter_fn(checkpoint, model)
    except Exception as err:  # noqa: BLE001 - timm's key mapping fails on foreign files
        raise WeightsNotFoundError(f"{mismatch}: the checkpoint keys do not map to a ViT "
                                   f"({type(err).__name__}: {str(err)[:200]}); check the "
                                   "model name and the file") from err
    return {k: v for k, v in mapped.items() if not k.startswith("head.")}
