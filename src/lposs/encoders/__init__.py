"""The two frozen ViTs of LPOSS: an OpenCLIP model (MaskCLIP features, text) and DINO (values).

``load_clip`` and ``load_dino`` build them by the names OpenCLIP and timm use, with weights
from a local file, the ``LPOSS_WEIGHTS`` folder or the Hugging Face Hub cache (see
:mod:`lposs.encoders.weights`).
"""

from .clip import CLIP_MEAN, CLIP_STD, ClipEncoder, imagenet_templates, load_clip
from .dino import DINO_MODELS, IMAGENET_MEAN, IMAGENET_STD, DinoEncoder, load_dino
from .weights import WEIGHTS_ENV, read_checkpoint

__all__ = [
    "load_clip",
    "load_dino",
    "ClipEncoder",
    "DinoEncoder",
    "DINO_MODELS",
    "WEIGHTS_ENV",
    "read_checkpoint",
    "imagenet_templates",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
