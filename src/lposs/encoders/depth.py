"""The depth model of the pixel graph (``pixel_features`` with depth): Depth Anything V2 through
``transformers`` (the optional extra ``lposs[depth]``), predicting relative depth of the
working image.

Input as its image processor makes it: the image resized (bicubic) so that the side whose
scale to 518 is nearer 1 becomes 518, both sides rounded to multiples of 14, clamped to
[0, 1], ImageNet mean/std; the predicted depth is resized bilinearly back to the image's size.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, WeightsNotFoundError
from .common import DenseEncoder
from .device import PRECISIONS, resolve_device, resolve_precision
from .dino import IMAGENET_MEAN, IMAGENET_STD
from .sources import WeightsSource, find_in_hub, weight_file
from .weights import build_with_weights, read_checkpoint

__all__ = ["DEPTH_MODELS", "DepthEncoder", "load_depth", "resolve_depth_weights"]

_INPUT_SIDE = 518  # Depth Anything's image processor: size 518, multiples of the patch (14)
# The Depth Anything V2 checkpoints on the Hub -> (DINOv2 width, depth, heads, out_indices,
# fusion width, neck widths), for a local file whose repository's config.json is not cached.
DEPTH_MODELS = {
    "depth-anything/Depth-Anything-V2-Small-hf": (384, 12, 6, [3, 6, 9, 12], 64,
                                                  [48, 96, 192, 384]),
    "depth-anything/Depth-Anything-V2-Base-hf": (768, 12, 12, [3, 6, 9, 12], 128,
                                                 [96, 192, 384, 768]),
    "depth-anything/Depth-Anything-V2-Large-hf": (1024, 24, 16, [5, 12, 18, 24], 256,
                                                  [256, 512, 1024, 1024]),
}


class DepthEncoder(DenseEncoder):
    """A frozen ``DepthAnythingForDepthEstimation`` (``load_depth``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD, next(model.parameters()).device)
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(model.config.patch_size)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def predict(self, image: Tensor) -> Tensor:
        """``(3, h, w)`` RGB in [0, 1] -> ``(h, w)`` float32 relative depth (Depth Anything's
        disparity: larger is nearer), on the model's device."""
        height, width = image.shape[-2:]
        scale_h, scale_w = _INPUT_SIDE / height, _INPUT_SIDE / width
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        size = [max(1, round(side * scale / self.patch_size)) * self.patch_size
                for side in (height, width)]
        x = F.interpolate(image[None].to(self.mean.device).float(), size=size, mode="bicubic",
                          align_corners=False).clamp_(0, 1)
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        depth = self.model(pixel_values=x.to(self._dtype())).predicted_depth.float()
        return F.interpolate(depth[:, None], size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0]


def resolve_depth_weights(name: str, *, weights: str | os.PathLike | None = None,
                          pretrained: bool = True,
                          cache_dir: str | os.PathLike | None = None) -> WeightsSource:
    """Where :func:`load_depth` takes the weights of ``name`` (a Hub repository) from:
    ``weights``, the Hub cache, a Hub download, or random weights. Loads nothing.

    Raises:
        WeightsNotFoundError: ``weights`` is not a file, or no weights were found.
    """
    if weights is not None:
        return WeightsSource("file", weight_file(weights, f"depth model {name!r}"))
    if not pretrained:
        return WeightsSource("random")
    source, reason = find_in_hub(name, ["model.safetensors"], cache_dir=cache_dir)
    if source is None:
        raise WeightsNotFoundError(
            f"no weights for depth model {name!r}: {reason}. Give --depth-weights PATH (in "
            f"Python: depth_weights=PATH), or download once while online: hf download {name} "
            "model.safetensors config.json")
    return source


def depth_config(name: str, *, cache_dir: str | os.PathLike | None = None):
    """The ``DepthAnythingConfig`` of ``name``: its repository's ``config.json`` (Hub cache or
    download), else the architecture of :data:`DEPTH_MODELS`.

    Raises:
        ConfigError: neither is known.
    """
    from transformers import DepthAnythingConfig, Dinov2Config

    found, _ = find_in_hub(name, ["config.json"], cache_dir=cache_dir)
    if found is not None:  # max_depth null (relative models): 1, the factor transformers uses
        record = json.loads(found.path.read_text())
        return DepthAnythingConfig.from_dict({**record, "max_depth": record.get("max_depth") or 1})
    if name not in DEPTH_MODELS:
        raise ConfigError(f"depth model {name!r}: no config.json in the Hugging Face Hub cache "
                          f"and not one of {', '.join(DEPTH_MODELS)}")
    width, depth, heads, out_indices, fusion, neck = DEPTH_MODELS[name]
    backbone = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                            image_size=_INPUT_SIDE, out_indices=out_indices,
                            reshape_hidden_states=False, apply_layernorm=True)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=width,
                               fusion_hidden_size=fusion, neck_hidden_sizes=neck)


def load_depth(name: str = "depth-anything/Depth-Anything-V2-Small-hf", *,
               weights: str | os.PathLike | WeightsSource | None = None,
               device: str | torch.device | None = None, precision: str = "fp32",
               pretrained: bool = True, cache_dir: str | os.PathLike | None = None,
               config=None) -> DepthEncoder:
    """Build a Depth Anything model from ``transformers`` as a frozen :class:`DepthEncoder`;
    ``weights_info`` says where its weights came from.

    Args:
        name: the Hub repository (``LPOSSConfig.depth_model``).
        weights: a local ``.safetensors`` / torch checkpoint, or a ``WeightsSource``.
        device, precision: as for ``load_dino``.
        pretrained: False (and no ``weights``): random weights.
        cache_dir: Hugging Face Hub cache folder (default: huggingface_hub's).
        config: a ``DepthAnythingConfig`` instead of the one of ``name`` (small tests).

    Raises:
        ImportError: transformers is not installed (``pip install lposs[depth]``).
        ConfigError: an unknown model, precision or device.
        WeightsNotFoundError: no weights, or a file that does not hold this model's.
        UnsafeCheckpointError: the checkpoint holds pickled objects.
    """
    from transformers import DepthAnythingForDepthEstimation

    device = resolve_device(device)
    dtype = PRECISIONS[resolve_precision(precision, device)]
    source = weights if isinstance(weights, WeightsSource) else resolve_depth_weights(
        name, weights=weights, pretrained=pretrained, cache_dir=cache_dir)
    config = config if config is not None else depth_config(name, cache_dir=cache_dir)

    def build(on: torch.device) -> nn.Module:
        with on:
            return DepthAnythingForDepthEstimation(config)

    if source.path is None:
        model = build(torch.device("cpu"))
    else:  # the file is read before the model is built: a bad file fails fast
        state_dict = read_checkpoint(source.path)
        model = build_with_weights(build, lambda model, checkpoint: checkpoint, state_dict,
                                   source.path, name)
        del state_dict
    encoder = DepthEncoder(model.to(device=device, dtype=dtype))
    encoder.weights_info = source.info()
    return encoder
