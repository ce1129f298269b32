"""CLIP-DINOiser (Wysoczańska et al., ECCV 2024): MaskCLIP features pooled over patch correlations.

A transcription of wysoczanska/clip_dinoiser ``models/clip_dinoiser/clip_dinoiser.py`` with
``configs/clip_dinoiser.yaml`` and ``models/maskclip/maskclip.py``:

- training-free (``DinoCLIP``; the paper's eq. 6 and footnote 3): the cosine correlations of
  DINO ViT-B/16's last-block value features (FOUND's ``qkv`` hook, ``enc_type_feats="v"``),
  entries below ``gamma`` set to 0, weight an average of the MaskCLIP features;
- trained (``CLIP_DINOiser``): the same pooling over the correlations of its learned
  ``obj_proj`` (a 3x3 convolution) of the ``ln_2`` output of CLIP block ``-3``, and its
  background head ``bkg_decoder`` (a 1x1 convolution on the same features, L2-normalised).
  DINO is not run at all.

Left out: the training-free form's background, FOUND (valeoai/FOUND, another model with
its own decoder weights). The official code divides by feature norms without a floor;
here ``F.normalize`` keeps a zero vector at 0 instead of NaN.

DINO's value features are :func:`lposs.encoders.dino.dino_value_features` (positional
embeddings resampled the facebookresearch/dino way, as FOUND and ProxyCLIP do).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsafeCheckpointError, WeightsNotFoundError
from .common import blocks_batch_first
from .maskclip import dense_features as maskclip_dense_features

__all__ = [
    "PROTOCOL",
    "maskclip_features",
    "dino_correlations",
    "weighted_pool",
    "training_free_features",
    "DinoiserHeads",
    "load_dinoiser_weights",
    "trained_features",
    "apply_background",
]

# img_scale=(2048, 448), test_cfg slide crop 448, stride 224: the same in every dataset file.
_SLIDE = {"short_side": 448, "long_side": 2048, "window": 448, "stride": 224}
# The official defaults for PASCAL Context-59, each with the file it comes from
# ("datasets/" is segmentation/configs/_base_/datasets/).
PROTOCOL = {
    "clip": "ViT-B-16",  # configs/maskclip.yaml model.clip_model
    "clip_pretrained": "laion2b_s34b_b88k",  # configs/maskclip.yaml decode_head.pretrained
    "dino": "dino_vitb16",  # configs/clip_dinoiser.yaml vit_arch=vit_base, vit_patch_size=16
    "templates": "imagenet_templates",  # configs/maskclip.yaml use_templates: True (80)
    "short_side": 448,  # datasets/pascal_context59.py img_scale=(2048, 448), keep_ratio
    "long_side": 2048,  # datasets/pascal_context59.py img_scale=(2048, 448)
    "window": 448,  # datasets/pascal_context59.py test_cfg crop_size=(448, 448)
    "stride": 224,  # datasets/pascal_context59.py test_cfg stride=(224, 224)
    "pad": "bottom/right to a multiple of 16, black",  # clip_dinoiser.py make_input_divisible
    "logit_scale": 100.0,  # models/maskclip/maskclip.py cls_seg: softmax(output * 100)
    "average": "probabilities",  # mmseg 0.x slide_inference averages encode_decode's softmax
    "gamma": 0.2,  # configs/clip_dinoiser.yaml model.gamma (correlation threshold)
    "delta": 0.99,  # configs/clip_dinoiser.yaml model.delta (background: max prob < delta)
    "feats_idx": -3,  # configs/clip_dinoiser.yaml model.feats_idx (trained: ln_2 of block -3)
    "in_dim": 256,  # configs/clip_dinoiser.yaml model.in_dim (obj_proj output channels)
    "conv_kernel": 3,  # clip_dinoiser.py CLIP_DINOiser default conv_kernel
    "enc_type_feats": "v",  # configs/clip_dinoiser.yaml (DINO's last-block values)
    "background": False,  # main_eval.py: apply_found only for voc and coco_object
    "checkpoint": "checkpoints/last.pt",  # main_eval.py check_path; key model_state_dict
    # Per dataset: segmentation/configs/_base_/datasets/<file> (the same resize and windows
    # in each) and main_eval.py, which turns the background on for voc and coco_object
    # (trained: bkg_decoder; training-free: FOUND, left out here).
    "datasets": {
        "voc": {**_SLIDE, "background": True},  # pascal_voc12.py; main_eval.py
        "voc20": {**_SLIDE, "background": False},  # pascal_voc12_20.py
        "context": {**_SLIDE, "background": False},  # pascal_context.py
        "context59": {**_SLIDE, "background": False},  # pascal_context59.py
        "coco_object": {**_SLIDE, "background": True},  # coco.py; main_eval.py
        "coco_stuff": {**_SLIDE, "background": False},  # stuff.py
        "cityscapes": {**_SLIDE, "background": False},  # cityscapes.py
        "ade20k": {**_SLIDE, "background": False},  # ade20k.py
    },
}
# The keys of the published checkpoint's model_state_dict (train.py get_model_dict).
CHECKPOINT_KEYS = ("obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias")


def maskclip_features(visual: nn.Module, pixels: Tensor, *,
                      layer: int = -3) -> tuple[Tensor, Tensor]:
    """MaskCLIP's dense features and the ``ln_2`` output of block ``layer``, in one pass.

    ``models/maskclip/maskclip.py`` (:func:`lposs.predictors.maskclip.dense_features`) and
    ``clip_dinoiser.py``'s hook on ``resblocks[feats_idx].ln_2``.

    Args:
        visual: an OpenCLIP ``VisionTransformer`` (the ``visual`` of a CLIP model).
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size P.
        layer: the block whose ``ln_2`` output is also returned (the trained form's -3).

    Returns:
        ``(maskclip, intermediate)``: ``(B, E, H/P, W/P)`` unnormalised MaskCLIP features
        and ``(B, width, H/P, W/P)``, both without the class token.
    """
    captured: list[Tensor] = []
    ln_2 = visual.transformer.resblocks[layer].ln_2
    hook = ln_2.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        maskclip = maskclip_dense_features(visual, pixels)
    finally:
        hook.remove()
    inter = captured[0] if blocks_batch_first(visual.transformer) else captured[0].transpose(0, 1)
    return maskclip, inter[:, 1:].transpose(1, 2).reshape(*maskclip.shape[:1], -1,
                                                          *maskclip.shape[2:])


def dino_correlations(features: Tensor, gamma: float | None) -> Tensor:
    """``get_dino_corrs``: cosine correlations of patch features, entries < ``gamma`` set to 0.

    Args:
        features: ``(B, D, h, w)``.
        gamma: the threshold; None keeps every entry.

    Returns:
        ``(B, h * w, h, w)``: channel n holds patch n's correlation with every patch.
    """
    batch, _, h, w = features.shape
    feats = F.normalize(features.flatten(2), dim=1)
    corrs = (feats.transpose(1, 2) @ feats).reshape(batch, h, w, h * w)
    if gamma is not None:
        corrs = corrs.masked_fill(corrs < gamma, 0.0)
    return corrs.permute(0, 3, 1, 2)


def weighted_pool(maskclip: Tensor, corrs: Tensor) -> Tensor:
    """``compute_weighted_pool``: each patch's features averaged with its correlation weights.

    Args:
        maskclip: ``(B, E, h', w')`` MaskCLIP features, resized bilinearly to (h, w) if needed.
        corrs: ``(B, h * w, h, w)`` non-negative weights (:func:`dino_correlations`).

    Returns:
        ``(B, E, h, w)``: ``sum_m corrs[n, m] f_m / (sum_m corrs[n, m] + 1e-6)``.
    """
    h, w = corrs.shape[-2:]
    if maskclip.shape[-2:] != (h, w):
        maskclip = F.interpolate(maskclip, size=(h, w), mode="bilinear", align_corners=False)
    pooled = torch.einsum("bnij,bcij->bcn", corrs, maskclip)
    pooled = pooled / (corrs.flatten(2).sum(dim=-1)[:, None] + 1e-6)
    return pooled.reshape(maskclip.shape[0], -1, h, w)


def training_free_features(maskclip: Tensor, dino_values: Tensor, *, gamma: float = 0.2) -> Tensor:
    """``DinoCLIP.forward`` up to ``cls_seg``: MaskCLIP pooled over DINO's value correlations.

    Args:
        maskclip: ``(B, E, h', w')`` unnormalised MaskCLIP features (:func:`maskclip_features`).
        dino_values: ``(B, D, h, w)`` DINO values of the same window
            (:func:`lposs.encoders.dino.dino_value_features`).
        gamma: correlation threshold (``PROTOCOL["gamma"]``).

    Returns:
        ``(B, E, h, w)`` pooled features (unnormalised).
    """
    return weighted_pool(maskclip, dino_correlations(dino_values, gamma))


class DinoiserHeads(nn.Module):
    """CLIP-DINOiser's two trained convolutions, named as in its checkpoint.

    Args:
        in_size: channels of the CLIP features they read (768 for ViT-B).
        in_dim: ``obj_proj`` output channels (256).
        conv_kernel: ``obj_proj`` kernel size (3, replicate padding).
    """

    def __init__(self, in_size: int = 768, in_dim: int = 256, conv_kernel: int = 3) -> None:
        super().__init__()
        self.bkg_decoder = nn.Conv2d(in_size, 1, (1, 1))
        self.obj_proj = nn.Conv2d(in_size, in_dim, (conv_kernel, conv_kernel),
                                  padding=conv_kernel // 2, padding_mode="replicate")


def load_dinoiser_weights(path: str | os.PathLike) -> DinoiserHeads:
    """Load the published CLIP-DINOiser checkpoint (``checkpoints/last.pt``) without unpickling.

    Args:
        path: a torch file holding ``{"model_state_dict": {...}}`` (or the state dict
            itself), read with ``weights_only=True``, or a ``.safetensors`` file; the keys
            are the official ``obj_proj.weight``, ``obj_proj.bias``, ``bkg_decoder.weight``,
            ``bkg_decoder.bias``.

    Returns:
        The heads on the CPU, in eval mode, sizes taken from the weights.

    Raises:
        WeightsNotFoundError: no such file, unreadable, or keys missing (named).
        UnsafeCheckpointError: the file holds pickled Python objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"CLIP-DINOiser weights file {str(path)!r} does not exist; "
                                   "pass the checkpoint of wysoczanska/clip_dinoiser "
                                   "(checkpoints/last.pt)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err) and "Unsupported class" not in str(err):  # not a pickle
            raise WeightsNotFoundError(f"{path} is not a readable checkpoint") from err
        raise UnsafeCheckpointError(f"{path} holds pickled Python objects, which lposs never "
                                    f"unpickles ({str(err)[:200]})") from err
    except Exception as err:  # noqa: BLE001 - any reader failure is an unreadable file
        raise WeightsNotFoundError(f"{path} is not a readable checkpoint "
                                   f"({type(err).__name__}: {str(err)[:200]})") from err
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    state = state if isinstance(state, dict) else {}
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state.get(k), Tensor)]
    if missing:
        raise WeightsNotFoundError(f"{path} is not a CLIP-DINOiser checkpoint: missing "
                                   f"{', '.join(missing)} (in model_state_dict)")
    in_dim, in_size, kernel, _ = state["obj_proj.weight"].shape
    heads = DinoiserHeads(in_size, in_dim, kernel)
    try:
        heads.load_state_dict({k: state[k] for k in CHECKPOINT_KEYS})
    except RuntimeError as err:
        raise WeightsNotFoundError(f"{path}: CLIP-DINOiser weights of inconsistent shapes "
                                   f"({' '.join(str(err).split())[:300]})") from err
    return heads.eval().requires_grad_(False)


def trained_features(maskclip: Tensor, intermediate: Tensor, heads: DinoiserHeads, *,
                     gamma: float = 0.2) -> tuple[Tensor, Tensor]:
    """``CLIP_DINOiser.forward_pass`` and ``forward`` up to ``cls_seg``.

    Args:
        maskclip: ``(B, E, h, w)`` unnormalised MaskCLIP features.
        intermediate: ``(B, width, h, w)`` block ``-3``'s ``ln_2`` output
            (:func:`maskclip_features`).
        heads: the trained heads (:func:`load_dinoiser_weights`).
        gamma: correlation threshold; 0 or None keeps every entry (the official ``if``).

    Returns:
        ``(pooled, background)``: ``(B, E, h, w)`` pooled features and ``(B, 1, h, w)``
        background-head logits (``sigmoid > 0.5``: an object, FOUND's convention).
    """
    batch, _, h, w = maskclip.shape
    proj = F.normalize(heads.obj_proj(intermediate).flatten(2), dim=1)
    corrs = (proj.transpose(1, 2) @ proj).reshape(batch, h * w, h, w)
    if gamma:
        corrs = corrs.masked_fill(corrs < gamma, 0.0)
    background = heads.bkg_decoder(F.normalize(intermediate, dim=1))
    return weighted_pool(maskclip, corrs), background


def apply_background(probs: Tensor, background: Tensor, *, delta: float = 0.99) -> Tensor:
    """The ``apply_found`` rule: class 0 gets probability 1 where no class reaches ``delta``
    and the background head sees no object (``sigmoid(background) <= 0.5``).

    Args:
        probs: ``(B, C, h, w)`` class probabilities, ``softmax(100 cos)`` (class 0 = background).
        background: ``(B, 1, h, w)`` logits from :func:`trained_features`.
        delta: confidence below which a patch is uncertain.

    Returns:
        ``(B, C, h, w)``, a copy with class 0 set to 1.0 at those patches.
    """
    uncertain = probs.max(dim=1).values < delta
    out = probs.clone()
    out[:, 0] = out[:, 0].masked_fill(uncertain & ~(torch.sigmoid(background[:, 0]) > 0.5), 1.0)
    return out
