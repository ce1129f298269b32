"""The vision model of the graph: a timm DINO / DINOv2 ViT giving last-block value features.

Features (METHOD.md, Encoders): the value vectors of the last block's attention, taken
from its ``qkv`` projection after that block's ``norm1``, all heads concatenated, with
the class and register tokens dropped. Only ``blocks[:-1]`` and the last block's
``norm1`` + ``qkv`` are run.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsNotFoundError
from .common import DenseEncoder
from .device import PRECISIONS, resolve_device, resolve_precision
from .sources import WeightsSource, resolve_dino_weights, timm_name_and_config
from .weights import build_with_weights, read_checkpoint

__all__ = ["DinoEncoder", "load_dino", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageNet pixel mean (RGB)
IMAGENET_STD = (0.229, 0.224, 0.225)  # ImageNet pixel std (RGB)


class DinoEncoder(DenseEncoder):
    """A frozen timm VisionTransformer giving the value features of its last block.

    Args:
        model: a timm ``VisionTransformer`` created with ``dynamic_img_size=True`` (any
            window size; positional embeddings are resampled by timm).
        mean: pixel mean (RGB); default: the model's pretrained config, else ImageNet's.
        std: pixel std (RGB); default: the model's pretrained config, else ImageNet's.

    Attributes:
        model: the wrapped timm model.
        patch_size: P, the patch size in pixels (16, 8 or 14).
        embed_dim: D, the size of the concatenated value vectors (768 for ViT-B).
    """

    def __init__(self, model: nn.Module, *, mean=None, std=None) -> None:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "_pos_embed"):
            raise TypeError("model must be a timm VisionTransformer")
        qkv = getattr(blocks[-1].attn, "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
            raise ValueError("the last block's attention must have a fused qkv nn.Linear")
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError("create the timm model with dynamic_img_size=True (any window size)")
        patch = tuple(model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"square patches required, got {patch}")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = mean if mean is not None else cfg.get("mean") or IMAGENET_MEAN
        std = std if std is not None else cfg.get("std") or IMAGENET_STD
        super().__init__(mean, std, qkv.weight.device)
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(patch[0])
        self.embed_dim = qkv.out_features // 3

    def _dtype(self) -> torch.dtype:
        return self.model.blocks[-1].attn.qkv.weight.dtype

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block values: ``(B, 3, H, W)`` normalised pixels -> ``(B, D, H/P, W/P)``."""
        model = self.model
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = model.patch_embed(x)  # (B, gh, gw, width) in dynamic-size mode
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        for block in model.blocks[:-1]:
            x = block(x)
        last = model.blocks[-1]
        qkv, v = last.attn.qkv, slice(2 * self.embed_dim, None)  # only v of the fused qkv
        bias = qkv.bias[v] if qkv.bias is not None else None
        values = F.linear(last.norm1(x), qkv.weight[v], bias)
        values = values[:, model.num_prefix_tokens :]  # drop class and register tokens
        return values.transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)


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
    ``<name><ext>``, ``<timm name><ext>`` or the original release's file name, e.g.
    ``dino_vitb16.safetensors``, ``vit_base_patch16_224.dino.safetensors`` or
    ``dino_vitbase16_pretrain.pth``. The original facebookresearch DINO / DINOv2 key
    layout is mapped by timm's checkpoint filter.

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
