"""The Table 4 ablations through the Segmenter and the CLI, against step-by-step computations
from the public steps: CLIP graph features, one graph per window, depth in the pixel graph."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lposs
from lposs.cli import main
from lposs.config import LPOSSConfig
from lposs.pipeline.encoded import EncodedImage
from lposs.pipeline.segmenter import Segmenter
from lposs.pipeline.windows import patch_positions, stitch_windows, window_grid
from lposs.propagation import pixel_graph

FAST = LPOSSConfig(k=30, short_side=224)


def _image(height=150, width=260, seed=4):
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = (200, 40, 30)
    img[:, width // 2 :] = (30, 160, 60)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _expected_labels(image, classes, cfg, clip, dino, depth=None):
    """The LPOSS+ chain from the public steps, with the ablations' changes written out."""
    h, w = 224, int(image.shape[1] * 224 / image.shape[0] + 0.5)
    working = torch.from_numpy(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    working = working.permute(2, 0, 1).float() / 255
    boxes = window_grid(h, w)
    crops = torch.stack([working[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes.tolist()])
    clip_features = clip.dense_features(crops)  # (n, E, 14, 14)
    graph_features = clip_features if cfg.graph_features == "clip" else dino.dense_features(crops)
    text, class_index = clip.encode_classes(classes)
    initial = torch.einsum("nehw,ce->nhwc", clip_features, text)  # (n, 14, 14, C')
    positions = patch_positions(boxes, (14, 14), 16).view(len(boxes), 196, 2)
    features = graph_features.permute(0, 2, 3, 1).reshape(len(boxes), 196, -1)
    if cfg.joint:
        propagated = lposs.patch_propagation(features.flatten(0, 1), positions.flatten(0, 1),
                                             initial.reshape(-1, len(text)), k=cfg.k)
    else:  # one propagation per window over its own patches, k <= 195
        propagated = torch.cat([lposs.patch_propagation(f, p, s.reshape(196, -1), k=195)
                                for f, p, s in zip(features, positions, initial)])
    stitched = stitch_windows(propagated.reshape(len(boxes), 14, 14, -1).permute(0, 3, 1, 2),
                              boxes, h, w, patch_size=16)
    if depth is None:
        refined = lposs.pixel_propagation(working, stitched)
    else:
        refined = pixel_graph(working, depth=depth.predict(working),
                              lab="lab" in cfg.pixel_features,
                              depth_scale=cfg.depth_scale).propagate(stitched)
    reduced = torch.stack([refined[class_index == c].amax(0) for c in range(len(classes))])
    return F.interpolate(reduced[None], size=image.shape[:2], mode="bilinear",
                         align_corners=False)[0].argmax(0)


@pytest.mark.parametrize("changes", [{"graph_features": "clip"}, {"joint": False},
                                     {"graph_features": "clip", "joint": False}])
def test_clip_graph_and_per_window_graphs_equal_the_steps(tiny_clip, tiny_dino, changes):
    cfg = FAST.replace(**changes)
    image, classes = _image(), ["cat;kitten", "dog", "grass;lawn"]
    dino = None if cfg.graph_features == "clip" else tiny_dino  # no DINO needed
    result = Segmenter(tiny_clip, dino, cfg)(image, classes)
    expected = _expected_labels(image, classes, cfg, tiny_clip, tiny_dino)
    agree = (result.labels == expected).float().mean().item()
    assert agree >= 0.999, agree
    default = Segmenter(tiny_clip, tiny_dino, FAST)(image, classes).scores.full()
    assert not torch.allclose(result.scores.full(), default)


@pytest.mark.parametrize("features", ["depth", "lab+depth"])
def test_depth_in_the_pixel_graph_equals_the_steps(tiny_clip, tiny_dino, tiny_depth, features):
    cfg = FAST.replace(pixel_features=features, depth_scale=3.0)
    image, classes = _image(seed=5), ["sky", "tree;bush", "road"]
    segmenter = Segmenter(tiny_clip, tiny_dino, cfg, tiny_depth)
    result = segmenter(image, classes)
    expected = _expected_labels(image, classes, cfg, tiny_clip, tiny_dino, tiny_depth)
    assert (result.labels == expected).float().mean().item() >= 0.999
    assert result.provenance["weights"]["depth"]["source"] == "random"
    with pytest.raises(lposs.ConfigError, match="needs a depth model"):
        Segmenter(tiny_clip, tiny_dino, cfg).set_image(image)


def test_an_encoded_image_keeps_its_depth_and_depth_scale_rebuilds_only_the_graph(
        tiny_clip, tiny_dino, tiny_depth, tmp_path):
    cfg = FAST.replace(pixel_features="lab+depth")
    segmenter = Segmenter(tiny_clip, tiny_dino, cfg, tiny_depth)
    encoded = segmenter.set_image(_image(seed=6))
    assert encoded.depth.shape == encoded.working.shape[-2:]
    before = segmenter.predict(["a", "b"]).scores.full()
    encoded.save(tmp_path / "e.pt")
    loaded = EncodedImage.load(tmp_path / "e.pt")
    torch.testing.assert_close(loaded.depth, encoded.depth, rtol=0, atol=0)
    again = Segmenter(tiny_clip, tiny_dino, cfg, tiny_depth)
    again.set_encoded(loaded)
    torch.testing.assert_close(again.predict(["a", "b"]).scores.full(), before)
    again.config = cfg.replace(depth_scale=0.2)  # a sweep: same encoding, another graph
    assert not torch.allclose(again.predict(["a", "b"]).scores.full(), before)
    with pytest.raises(lposs.ConfigError, match="other encoders"):
        Segmenter(tiny_clip, tiny_dino, FAST).set_encoded(loaded)


def test_from_pretrained_loads_no_dino_for_clip_graph_features(tiny_model_files):
    clip_dir, _ = tiny_model_files  # no DINO weights anywhere (offline)
    segmenter = Segmenter.from_pretrained("lposs+", clip=f"local-dir:{clip_dir}", k=30,
                                          graph_features="clip")
    assert segmenter.dino is None
    result = segmenter(_image(60, 90), ["a", "b"])
    assert result.provenance["weights"]["dino"] is None and result.labels.shape == (60, 90)


def test_from_pretrained_loads_the_depth_model(tiny_model_files, tiny_depth_hub):
    clip_dir, dino_file = tiny_model_files
    repo, depth_file = tiny_depth_hub
    segmenter = Segmenter.from_pretrained("lposs+", clip=f"local-dir:{clip_dir}",
                                          dino="vit_tiny_patch16_224", dino_weights=dino_file,
                                          depth_weights=depth_file, depth_model=repo, k=30,
                                          pixel_features="depth")
    assert segmenter.depth.weights_info["source"] == "file"
    assert "depth" in segmenter.encoder_identity()


# --------------------------------------------------------------------------- the CLI


def _photo(path):
    Image.fromarray(_image(40, 60)).save(path)
    return path


@pytest.mark.parametrize(("flag", "value", "choices"), [
    ("--graph-features", "vit", "dino, clip"),
    ("--pixel-features", "rgb", "lab, depth, lab+depth"),
    ("--depth-scale", "0", "> 0"),
])
def test_an_unknown_ablation_value_is_one_line_listing_the_choices(tmp_path, capsys, flag,
                                                                   value, choices):
    out = tmp_path / "out"
    code = main(["segment", str(_photo(tmp_path / "x.png")), "--classes", "a,b", "--out",
                 str(out), flag, value])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lposs: error:") and choices in lines[0] and value in lines[0]
    assert not out.exists()


def test_segment_with_clip_graph_features_per_window_needs_no_dino(tmp_path, capsys,
                                                                     tiny_model_files):
    clip_dir, _ = tiny_model_files
    out = tmp_path / "out"
    code = main(["segment", str(_photo(tmp_path / "x.png")), "--classes", "a,b", "--out",
                 str(out), "--clip-model", f"local-dir:{clip_dir}", "--k", "30", "--r", "5",
                 "--graph-features", "clip", "--no-joint", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "x.png").is_file()
