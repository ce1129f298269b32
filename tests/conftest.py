"""Shared fixtures: small random-weight configs of the real encoder architectures, on CPU.

The models are the real OpenCLIP / timm classes (built by ``load_clip`` / ``load_dino``
with architecture overrides), only narrower and shallower so that tests stay fast.
Every parameter gets a little seeded noise so that biases are non-zero (the libraries
initialise many of them to 0, which would hide bias bugs).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

# No test may reach the Hugging Face Hub: set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Text embeddings cached across runs go to a throw-away folder, not the user's cache.
os.environ["LPOSS_CACHE"] = tempfile.mkdtemp(prefix="lposs-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# OpenCLIP ViT-B-16 narrowed: 2 layers of width 64 (2 heads), patch 16, 32-d embedding.
TINY_CLIP_KWARGS = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# timm DINO ViT narrowed: 2 blocks of width 64 (2 heads); the patch size comes from the name.
TINY_DINO_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter in place (makes zero-init biases non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param))
    return module


@pytest.fixture(scope="session")
def tiny_clip_kwargs() -> dict:
    """Architecture overrides that make ``load_clip("ViT-B-16", ...)`` tiny."""
    return copy.deepcopy(TINY_CLIP_KWARGS)


@pytest.fixture(scope="session")
def tiny_dino_kwargs() -> dict:
    """Architecture overrides that make ``load_dino(...)`` tiny."""
    return dict(TINY_DINO_KWARGS)


def _tiny_clip(seed: int):
    from lposs.encoders import load_clip

    torch.manual_seed(seed)
    encoder = load_clip("ViT-B-16", pretrained=None, **copy.deepcopy(TINY_CLIP_KWARGS))
    perturb_(encoder.model, seed)
    return encoder


def _tiny_dino(name: str, seed: int):
    from lposs.encoders import load_dino

    torch.manual_seed(seed)
    encoder = load_dino(name, pretrained=False, **TINY_DINO_KWARGS)
    perturb_(encoder.model, seed)
    return encoder


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-weight OpenCLIP ViT (patch 16, 32-d embedding) in a ClipEncoder, CPU."""
    return _tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_dino():
    """A random-weight timm DINO ViT (patch 16, 64-d values) in a DinoEncoder, CPU."""
    return _tiny_dino("dino_vitb16", seed=1)


@pytest.fixture(scope="session")
def tiny_dino_p8():
    """Like ``tiny_dino`` with 8-pixel patches (the DINO ViT-B/8 architecture)."""
    return _tiny_dino("dino_vitb8", seed=2)


@pytest.fixture(scope="session")
def tiny_dinov2():
    """Like ``tiny_dino`` with 14-pixel patches and LayerScale (the DINOv2 ViT-B/14 design)."""
    return _tiny_dino("dinov2_vitb14", seed=3)


# The same tiny CLIP as an OpenCLIP local folder (open_clip_config.json + weights).
TINY_CLIP_FOLDER_CONFIG = {
    "model_cfg": copy.deepcopy(TINY_CLIP_KWARGS),
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """``(OpenCLIP folder, timm ViT-Tiny safetensors file)`` with random weights: what the
    command line loads with ``--clip-model local-dir:FOLDER --dino-model
    vit_tiny_patch16_224 --dino-weights FILE``, through the real loading code."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("models")
    clip_dir = folder / "tiny-clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_FOLDER_CONFIG))
    torch.manual_seed(0)
    cfg = TINY_CLIP_FOLDER_CONFIG["model_cfg"]
    clip = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(clip_dir / "open_clip_model.safetensors"))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    dino_file = folder / "vit_tiny.safetensors"
    save_file(vit.state_dict(), str(dino_file))
    return clip_dir, dino_file


def tiny_depth_config():
    """Depth Anything (transformers) narrowed: a 4-layer DINOv2 of width 32, patch 14."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, image_size=28, patch_size=14,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                               fusion_hidden_size=8, neck_hidden_sizes=[4, 8, 16, 16],
                               head_hidden_size=4)


@pytest.fixture(scope="session")
def tiny_depth():
    """A random-weight Depth Anything model in a DepthEncoder, CPU."""
    from lposs.encoders.depth import load_depth

    torch.manual_seed(4)
    encoder = load_depth(pretrained=False, config=tiny_depth_config())
    perturb_(encoder.model, 4)
    return encoder


@pytest.fixture
def tiny_depth_hub(tmp_path, monkeypatch, tiny_depth):
    """``(repository, safetensors file)``: ``tiny_depth`` in a Hugging Face Hub cache of its own
    (config.json and model.safetensors of the repository ``test/tiny-depth``), offline."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    snapshot = tmp_path / "hub" / "models--test--tiny-depth" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    (snapshot / "config.json").write_text(tiny_depth.model.config.to_json_string())
    save_file({k: v.contiguous() for k, v in tiny_depth.model.state_dict().items()},
              str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "test/tiny-depth", snapshot / "model.safetensors"
