"""The two frozen ViTs of LPOSS: an OpenCLIP model (MaskCLIP features, text) and DINO (values).

``load_clip`` and ``load_dino`` build them by the names OpenCLIP and timm use, with weights
from a local file, the ``LPOSS_WEIGHTS`` folder or the Hugging Face Hub cache (see
:mod:`lposs.encoders.weights`); ``resolve_weights`` finds both models' weights before
either is loaded (:mod:`lposs.encoders.sources`). Each encoder exposes ``weights_info``
(where its weights came from) and ``precision`` (what it computes in; see
:mod:`lposs.encoders.device`).
"""

from .cache import file_sha256
from .clip import CLIP_MEAN, CLIP_STD, ClipEncoder, imagenet_templates, load_clip
from .device import resolve_device, resolve_precision
from .dino import IMAGENET_MEAN, IMAGENET_STD, DinoEncoder, load_dino
from .sources import DINO_MODELS, resolve_clip_weights, resolve_dino_weights, resolve_weights
from .weights import WEIGHTS_ENV, WeightsSource, read_checkpoint

__all__ = [
    "load_clip",
    "load_dino",
    "ClipEncoder",
    "DinoEncoder",
    "DINO_MODELS",
    "WEIGHTS_ENV",
    "WeightsSource",
    "read_checkpoint",
    "resolve_weights",
    "resolve_clip_weights",
    "resolve_dino_weights",
    "resolve_device",
    "resolve_precision",
    "file_sha256",
    "imagenet_templates",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
