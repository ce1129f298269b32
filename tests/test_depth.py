"""Tests for lposs.encoders.depth: Depth Anything through transformers, loaded safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_depth_config

from lposs.encoders.depth import depth_config, load_depth, resolve_depth_weights
from lposs.encoders.dino import IMAGENET_MEAN, IMAGENET_STD
from lposs.errors import UnsafeCheckpointError, WeightsNotFoundError


@pytest.mark.parametrize(("height", "width"), [(40, 60), (100, 460), (56, 56), (300, 90)])
def test_predict_follows_the_image_processor(tiny_depth, height, width):
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True,
                                  ensure_multiple_of=14, do_pad=False, resample=3,
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels = processor(rgb, return_tensors="pt").pixel_values
    seen = []
    hook = tiny_depth.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True)
    try:
        ours = tiny_depth.predict(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    finally:
        hook.remove()
    assert seen[0][-2:] == pixels.shape[-2:] and ours.shape == (height, width)
    with torch.inference_mode():
        theirs = tiny_depth.model(pixel_values=pixels).predicted_depth[:, None]
    theirs = F.interpolate(theirs, size=(height, width), mode="bilinear")[0, 0]
    # PIL's bicubic resize of the uint8 image against torch's of the float image
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.99


def test_weights_from_a_file_and_from_the_hub_cache(tiny_depth, tiny_depth_hub, tmp_path):
    repo, file = tiny_depth_hub
    image = torch.rand(3, 30, 44)
    expected = tiny_depth.predict(image)
    from_file = load_depth(repo, weights=file, config=tiny_depth_config())
    assert from_file.weights_info["source"] == "file"
    assert from_file.weights_id.startswith("sha256:")
    from_hub = load_depth(repo)  # config.json and weights from the cache
    assert from_hub.weights_info["source"] == "hub" and from_hub.weights_info["repo"] == repo
    assert from_hub.weights_info["revision"] == "0123abc"
    for encoder in (from_file, from_hub):
        assert torch.equal(encoder.predict(image), expected)


class _Payload:
    pass


def test_pickled_and_foreign_checkpoints_are_refused(tiny_depth, tmp_path, tiny_model_files):
    pickled = tmp_path / "depth.pt"
    torch.save({"state_dict": tiny_depth.model.state_dict(), "extra": _Payload()}, pickled)
    with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
        load_depth(weights=pickled, config=tiny_depth_config())
    _, dino_file = tiny_model_files
    with pytest.raises(WeightsNotFoundError, match="does not hold weights"):
        load_depth(weights=dino_file, config=tiny_depth_config())
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_depth(weights=tmp_path / "missing.safetensors", config=tiny_depth_config())


def test_no_weights_offline_says_how_to_give_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsNotFoundError, match="--depth-weights"):
        resolve_depth_weights("depth-anything/Depth-Anything-V2-Small-hf")


def test_the_builtin_small_config_is_depth_anything_v2_small(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import DepthAnythingForDepthEstimation

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no config.json cached
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(
            depth_config("depth-anything/Depth-Anything-V2-Small-hf"))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert 24.5 < millions < 25.2  # the paper of Depth Anything V2: 24.8M parameters
