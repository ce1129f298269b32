"""The two frozen ViTs of LPOSS: an OpenCLIP model (MaskCLIP features, text) and DINO (values),
built by ``load_clip`` / ``load_dino`` with weights found by :mod:`lposs.encoders.sources`;
each exposes ``weights_info``, ``weights_id`` and ``precision``."""

from .clip import ClipEncoder, imagenet_templates, load_clip
from .device import resolve_device, resolve_precision
from .dino import DinoEncoder, load_dino
from .sources import DINO_MODELS, WEIGHTS_ENV, WeightsSource, resolve_weights, weights_id

__all__ = ["load_clip", "load_dino", "ClipEncoder", "DinoEncoder", "DINO_MODELS", "WEIGHTS_ENV",
           "WeightsSource", "weights_id", "resolve_weights", "resolve_device",
           "resolve_precision", "imagenet_templates"]
