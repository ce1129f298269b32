"""The two frozen ViTs of LPOSS: an OpenCLIP model (MaskCLIP features, text) and DINO (values).

``load_clip`` and ``load_dino`` build them by the names OpenCLIP and timm use, with weights
from a local file, the ``LPOSS_WEIGHTS`` folder or the Hugging Face Hub cache
(:mod:`lposs.encoders.sources`, which also finds both models' weights before either is
loaded). Each encoder exposes ``weights_info`` (where its weights came from), ``weights_id``
(their identity, for every cache key) and ``precision`` (:mod:`lposs.encoders.device`).
"""

from .clip import ClipEncoder, imagenet_templates, load_clip
from .device import resolve_device, resolve_precision
from .dino import DinoEncoder, load_dino
from .sources import DINO_MODELS, WEIGHTS_ENV, WeightsSource, resolve_weights, weights_id

__all__ = ["load_clip", "load_dino", "ClipEncoder", "DinoEncoder", "DINO_MODELS", "WEIGHTS_ENV",
           "WeightsSource", "weights_id", "resolve_weights", "resolve_device",
           "resolve_precision", "imagenet_templates"]
