import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lposs
from lposs.config import UNKNOWN, LPOSSConfig
from lposs.pipeline.encoded import EncodedImage
from lposs.pipeline.refine import refine_scores
from lposs.pipeline.segmenter import Segmenter

# Small graphs keep these tests fast; the math is the same at the paper's k.
FAST = LPOSSConfig(k=30, short_side=224)


def _image(height=150, width=200, seed=0):
    """A blocky RGB test image, uint8 (H, W, 3): two halves of different colours plus noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = (200, 40, 30)
    img[:, width // 2 :] = (30, 160, 60)
    noise = rng.integers(-20, 20, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def segmenter(tiny_clip, tiny_dino):
    return Segmenter(tiny_clip, tiny_dino, FAST)


def test_output_shapes_types_and_labels_are_argmax(segmenter):
    result = segmenter(_image(), ["cat", "dog;puppy", "grass"])
    assert result.labels.shape == (150, 200) and result.labels.dtype == torch.uint8
    scores = result.scores.full()
    assert scores.shape == (3, 150, 200) and scores.dtype == torch.float32
    assert result.classes == ["cat", "dog;puppy", "grass"]
    assert torch.equal(result.labels, result.scores.full().argmax(dim=0))
    assert torch.isfinite(result.scores.full()).all()
    assert set(result.timings) >= {"encode", "graphs", "patch_lp", "pixel_lp"}


def test_encode_once_predict_many_equals_full_runs(segmenter, tiny_clip, tiny_dino):
    image = _image(seed=1)
    segmenter.set_image(image)
    first = segmenter.predict(["sky", "tree"])
    second = segmenter.predict("car, road;street, person")
    fresh = Segmenter(tiny_clip, tiny_dino, FAST)
    torch.testing.assert_close(first.scores.full(), fresh(image, ["sky", "tree"]).scores.full())
    torch.testing.assert_close(second.scores.full(),
                               fresh(image, ["car", "road;street", "person"]).scores.full())


def test_graph_settings_changed_after_set_image_take_effect(segmenter, tiny_clip, tiny_dino):
    image = _image(seed=8)
    segmenter.set_image(image)
    before = segmenter.predict(["a", "b"])
    changed = FAST.replace(k=10, tau=0.05)
    segmenter.config = changed  # the image's graphs are built again for these settings
    after = segmenter.predict(["a", "b"])
    fresh = Segmenter(tiny_clip, tiny_dino, changed)(image, ["a", "b"])
    torch.testing.assert_close(after.scores.full(), fresh.scores.full())
    assert not torch.allclose(before.scores.full(), after.scores.full())


def test_switching_between_encoded_images_answers_for_the_image_set(segmenter, tiny_clip,
                                                                     tiny_dino):
    first, second = _image(seed=9), _image(seed=10)[::-1].copy()
    encoded_first = segmenter.set_image(first)
    encoded_second = Segmenter(tiny_clip, tiny_dino, FAST).set_image(second)
    fresh = Segmenter(tiny_clip, tiny_dino, FAST)
    for image, encoded in ((second, encoded_second), (first, encoded_first),
                           (first, encoded_first)):  # the same image again keeps its graphs
        segmenter.set_encoded(encoded)
        torch.testing.assert_close(segmenter.predict(["a", "b"]).scores.full(),
                                   fresh(image, ["a", "b"]).scores.full())


def test_synonyms_take_the_max_at_working_size_then_resize(segmenter):
    segmenter.set_image(_image(seed=2))
    joined = segmenter.predict(["cat;kitten", "dog"])
    separate = segmenter.predict(["cat", "kitten", "dog"]).scores
    # METHOD.md, Output: max over synonyms of the raw propagated scores at working size,
    # then resize; the reported scores divide by the resized propagated ones column
    raw = torch.stack([torch.maximum(separate.raw[0], separate.raw[1]), separate.raw[2]])
    resized = F.interpolate(raw[None], size=(150, 200), mode="bilinear", align_corners=False)[0]
    weight = F.interpolate(separate.ones[None, None], size=(150, 200), mode="bilinear",
                           align_corners=False)[0, 0]
    torch.testing.assert_close(joined.scores.full(), resized / weight)
    assert torch.equal(joined.labels, resized.argmax(dim=0))


def test_pipeline_equals_the_papers_order_step_by_step(tiny_clip, tiny_dino):
    """The whole LPOSS+ chain rebuilt from the public steps, in the paper's order: OpenCV
    resize of the uint8 image, windows, both encoders, patch LP, stitching, pixel LP, max
    over synonyms at working size, one bilinear resize of the raw scores, argmax."""
    import cv2

    from lposs.pipeline.windows import patch_positions, stitch_windows, window_grid

    image = _image(height=150, width=260, seed=4)
    classes, cfg = ["cat;kitten", "dog", "grass;lawn;field"], FAST
    result = Segmenter(tiny_clip, tiny_dino, cfg)(image, classes)

    h, w = 224, int(260 * 224 / 150 + 0.5)  # short side 224 (FAST), rounded as mmcv
    working = torch.from_numpy(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    working = working.permute(2, 0, 1).float() / 255
    boxes = window_grid(h, w)
    crops = torch.stack([working[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes.tolist()])
    clip = tiny_clip.dense_features(crops)  # (n, E, 14, 14)
    dino = tiny_dino.dense_features(crops)  # (n, D, 14, 14)
    text, class_index = tiny_clip.encode_classes(classes)
    initial = torch.einsum("nehw,ce->nhwc", clip, text).reshape(-1, len(text))
    features = dino.permute(0, 2, 3, 1).reshape(-1, dino.shape[1])
    propagated = lposs.patch_propagation(features, patch_positions(boxes, (14, 14), 16), initial,
                                         k=cfg.k)
    stitched = stitch_windows(propagated.reshape(len(boxes), 14, 14, -1).permute(0, 3, 1, 2),
                              boxes, h, w, patch_size=16)
    refined = lposs.pixel_propagation(working, stitched)
    reduced = torch.stack([refined[class_index == c].amax(0) for c in range(len(classes))])
    expected = F.interpolate(reduced[None], size=(150, 260), mode="bilinear",
                             align_corners=False)[0].argmax(0)
    agree = (result.labels == expected).float().mean().item()
    assert agree >= 0.999, agree  # float round-off may flip a near-tie, nothing more


def test_no_windows_is_one_pass_over_the_padded_working_image(tiny_clip, tiny_dino):
    """windows=None: each encoder sees the whole 224 x 388 working image, padded to 224 x 400
    (a 14 x 25 grid, positions resampled by MaskCLIP's and DINO's own rules), the patch grid
    resized straight back to 224 x 388: the same as one window covering the image."""
    from test_encoders import dino_reference, maskclip_reference

    image, classes = _image(height=150, width=260, seed=5), ["cat", "dog;puppy"]
    segmenter = Segmenter(tiny_clip, tiny_dino, FAST.replace(windows=None))
    encoded = segmenter.set_image(image)
    (setup,) = encoded.setups
    assert setup.boxes.tolist() == [[0, 0, 224, 388]]
    torch.testing.assert_close(setup.clip[0], maskclip_reference(tiny_clip.model, encoded.working),
                               atol=2e-5, rtol=1e-4)
    dino = dino_reference(tiny_dino.model, encoded.working)  # (D, 14, 25)
    torch.testing.assert_close(setup.dino, dino.flatten(1).T, atol=2e-5, rtol=1e-4)
    one_window = Segmenter(tiny_clip, tiny_dino, FAST.replace(windows=((400, 400),)))
    torch.testing.assert_close(segmenter.predict(classes).scores.full(),
                               one_window(image, classes).scores.full())


def test_maskclip_preset_is_the_upsampled_cosine_similarity(tiny_clip):
    # One 224 window: working size 224 x 224, no propagation at all.
    image = torch.rand(3, 224, 224)
    config = LPOSSConfig(short_side=224, patch_stage=False, pixel_stage=False)
    result = Segmenter(tiny_clip, None, config)(image, ["cat", "dog"])
    text, _ = tiny_clip.encode_classes(["cat", "dog"])
    feats = tiny_clip.dense_features(image[None])  # (1, E, 14, 14)
    cosine = torch.einsum("behw,ce->bchw", feats, text)
    expected = F.interpolate(cosine, size=(224, 224), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(result.scores.full(), expected, atol=1e-5, rtol=1e-4)


def test_identical_window_setups_average_to_one_setup(tiny_clip, tiny_dino):
    image = _image(seed=3)
    single = Segmenter(tiny_clip, tiny_dino, FAST)(image, ["a", "b"])
    doubled = FAST.replace(windows=((224, 112), (224, 112)))
    double = Segmenter(tiny_clip, tiny_dino, doubled)(image, ["a", "b"])
    torch.testing.assert_close(single.scores.full(), double.scores.full(), atol=1e-5, rtol=1e-4)


def test_input_kinds_give_the_same_result(segmenter, tmp_path):
    array = _image(seed=4)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    as_uint8 = torch.from_numpy(array).permute(2, 0, 1)
    # every 8-bit source takes the paper's OpenCV uint8 resize: identical results
    results = [segmenter(src, ["x", "y"]).scores.full()
               for src in (array, path, str(path), Image.fromarray(array), as_uint8)]
    for other in results[1:]:
        assert torch.equal(results[0], other)
    # float sources (array or tensor) take the float resize: equal to each other
    as_float = [segmenter(src, ["x", "y"]).scores.full()
                for src in (as_uint8.float() / 255, array.astype(np.float32) / 255)]
    torch.testing.assert_close(as_float[0], as_float[1])


def test_unknown_threshold_abstains_only_below_it(segmenter):
    segmenter.set_image(_image(seed=5))
    plain = segmenter.predict(["x", "y"])
    best = plain.scores.full().max(dim=0).values
    threshold = float(best.median())
    abstained = segmenter.predict(["x", "y"], unknown_threshold=threshold)
    assert torch.equal(abstained.labels == UNKNOWN, best < threshold)
    keep = best >= threshold
    assert torch.equal(abstained.labels[keep], plain.labels[keep])
    assert 0 < abstained.class_shares()["unknown"] < 1


@pytest.mark.parametrize("size", [(1, 1), (12, 50), (100, 40)])
def test_tiny_and_thin_images_work(segmenter, size):
    image = torch.rand(3, *size)
    result = segmenter(image, ["a", "b", "c"])
    assert result.labels.shape == size and torch.isfinite(result.scores.full()).all()


def test_other_vision_grid_is_used_for_the_graph(tiny_clip, tiny_dino_p8):
    # DINO with 8-pixel patches: CLIP features are resized to the 28 x 28 VM grid.
    result = Segmenter(tiny_clip, tiny_dino_p8, FAST)(_image(seed=6), ["a", "b"])
    scores = result.scores.full()
    assert scores.shape == (2, 150, 200) and torch.isfinite(scores).all()


def test_pixel_stage_refines_the_lposs_scores(tiny_clip, tiny_dino):
    image = _image(seed=7)
    lposs_only = Segmenter(tiny_clip, tiny_dino, FAST.replace(pixel_stage=False))
    plus = Segmenter(tiny_clip, tiny_dino, FAST)
    base = lposs_only(image, ["a", "b"])
    refined = plus(image, ["a", "b"])
    assert not torch.allclose(base.scores.full(), refined.scores.full())


def test_predict_before_set_image_is_an_error(segmenter):
    with pytest.raises(RuntimeError, match="set_image"):
        segmenter.predict(["a"])


def test_convergence_of_each_stage_that_ran_is_reported(tiny_clip, tiny_dino):
    image = _image(seed=3)
    result = Segmenter(tiny_clip, tiny_dino, FAST.replace(max_iter=2))(image, ["a", "b"])
    assert set(result.convergence) == {"patch", "pixel"}
    for report in result.convergence.values():
        assert report["iterations"] == 2  # truncated at max_iter, as the paper's solve
        assert 0 < report["max_relative_residual"] < 1
    assert result.summary()["convergence"] == result.convergence
    lposs_only = Segmenter(tiny_clip, tiny_dino, FAST.replace(pixel_stage=False))(image, ["a"])
    assert set(lposs_only.convergence) == {"patch"}
    maskclip = Segmenter(tiny_clip, None, FAST.replace(patch_stage=False, pixel_stage=False))
    assert maskclip(image, ["a"]).convergence == {}


def test_save_draws_the_image_in_memory(segmenter, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(_image(seed=4)).save(path)
    result = segmenter(path, ["a", "b"])
    from_file = result.save(tmp_path / "file", "x", path)
    path.unlink()  # the in-memory image needs no file
    in_memory = result.save(tmp_path / "mem", "x", segmenter.image)
    assert [p.name for p in from_file] == [p.name for p in in_memory]
    for a, b in zip(from_file, in_memory):
        assert a.read_bytes() == b.read_bytes()
    summary = json.loads((tmp_path / "mem" / "x.json").read_text())
    assert summary["convergence"] == result.convergence
    assert summary["unknown"]["index"] == UNKNOWN == lposs.UNKNOWN == 255


def test_refine_scores_sharpens_a_blocky_label_map():
    # The image has a sharp vertical edge at column 100; the scores place it blockily.
    image = torch.zeros(3, 120, 200)
    image[:, :, 100:] = 1.0
    coarse = torch.zeros(2, 120 // 20, 200 // 20)
    coarse[0, :, :5] = 1.0
    coarse[1, :, 5:] = 1.0
    coarse[0, :, 4:6] = coarse[1, :, 4:6] = 0.5  # the boundary cells are undecided
    truth = torch.zeros(120, 200, dtype=torch.long)
    truth[:, 100:] = 1
    upsampled = F.interpolate(coarse[None], size=(120, 200), mode="nearest")[0]
    refined = refine_scores(image, upsampled, LPOSSConfig(short_side=120))
    before = (upsampled.argmax(0) == truth).float().mean()
    after = (refined.argmax(0) == truth).float().mean()
    assert refined.shape == (2, 120, 200)
    assert after > before and after > 0.99


@pytest.mark.slow
def test_real_vit_b16_architectures_end_to_end():
    from lposs.encoders import load_clip, load_dino

    clip = load_clip("ViT-B-16", pretrained=None)
    dino = load_dino("dino_vitb16", pretrained=False)
    result = Segmenter(clip, dino)(_image(60, 80, seed=8), ["cat", "grass;lawn", "sky"])
    assert result.labels.shape == (60, 80) and result.scores.full().shape == (3, 60, 80)
    assert torch.equal(result.labels, result.scores.full().argmax(0))
    assert result.settings["k"] == 400


@pytest.mark.parametrize("stem", ["../x", "a/b", "/tmp/x", "..", ".", "", " ", "a\\b",
                                  "x\0y"])
def test_save_refuses_stems_that_leave_the_folder(tmp_path, stem):
    result = lposs.Segmentation(torch.zeros(4, 6, dtype=torch.int64), torch.zeros(2, 4, 6),
                                ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(lposs.OutputError, match="plain name"):
        result.save(out, stem)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_save_takes_a_plain_stem_with_dots(tmp_path):
    result = lposs.Segmentation(torch.zeros(4, 6, dtype=torch.int64), torch.zeros(2, 4, 6),
                                ["a", "b"])
    written = result.save(tmp_path, "photo.v2..final")
    assert [p.parent for p in written] == [tmp_path] * len(written)
    assert (tmp_path / "photo.v2..final.png").is_file()


@pytest.mark.parametrize(("scores", "message"), [
    (torch.zeros(150, 200, 3), "looks like (H, W, C)"),
    (torch.full((2, 75, 100), float("nan")), "NaN"),
    (torch.zeros(0, 150, 200), "empty"),
    (torch.zeros(2, 200, 150), "aspect ratio"),
])
def test_refine_scores_refuses_scores_that_are_not_the_images(scores, message):
    with pytest.raises(lposs.ScoresError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refine_scores(_image(), scores, LPOSSConfig(short_side=32))


def test_progress_reports_every_stage_and_changes_no_number(tiny_clip, tiny_dino):
    image = _image(seed=9)  # 150 x 200 -> 224 x 299 working: two 224-px windows (stride 112)
    reports = []
    one_by_one = Segmenter(tiny_clip, tiny_dino, FAST.replace(batch_size=1))
    result = one_by_one(image, ["a", "b;c"],
                        progress=lambda stage, done, total: reports.append((stage, done, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in reports))
    assert stages == ["encoding windows", "building graphs", "encoding classes",
                      "propagating over patches", "propagating over pixels", "labelling"]
    # two windows, each through CLIP then DINO, one per forward pass (batch_size=1)
    assert [(d, t) for s, d, t in reports if s == "encoding windows"] == \
        [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert [(d, t) for s, d, t in reports if s == "building graphs"] == [(0, 2), (1, 2), (2, 2)]
    for stage in stages[2:]:
        assert [(d, t) for s, d, t in reports if s == stage] == [(0, 1), (1, 1)]
    quiet = Segmenter(tiny_clip, tiny_dino, FAST)(image, ["a", "b;c"])  # 16 windows a pass
    torch.testing.assert_close(result.scores.full(), quiet.scores.full(), atol=1e-4,
                               rtol=1e-4)  # batching rounds
    assert torch.equal(result.labels, quiet.labels)


def test_score_maps_in_bands_equal_the_whole_image_resize(monkeypatch, tmp_path):
    """A large image is resized a band of rows at a time: the labels, the unknown mask, the
    scores and the saved .npy equal the paper's one resize of the whole (C, H, W) stack."""
    import numpy as np

    import lposs.pipeline.scores as scores_module
    from lposs.output.files import save_scores

    gen = torch.Generator().manual_seed(3)
    raw = torch.rand(4, 60, 90, generator=gen)
    weight = torch.rand(60, 90, generator=gen) + 0.5
    resized = F.interpolate(raw[None], size=(250, 371), mode="bilinear", align_corners=False)[0]
    ones = F.interpolate(weight[None, None], size=(250, 371), mode="bilinear",
                         align_corners=False)[0, 0]
    expected_scores = resized / ones
    best = expected_scores.max(dim=0).values
    threshold = float(best.median())
    monkeypatch.setattr(scores_module, "BAND_PIXELS", 371 * 16)  # 16 rows a band
    maps = scores_module.ScoreMaps(raw, weight, (250, 371))
    labels = maps.labels(threshold, dtype=torch.uint8)
    expected = resized.argmax(dim=0)
    above, below = best > threshold + 1e-5, best < threshold - 1e-5  # clear of round-off
    assert torch.equal(labels[above].long(), expected[above])
    assert bool((labels[below] == UNKNOWN).all()) and int(below.sum()) > 1000
    torch.testing.assert_close(maps.full(), expected_scores, rtol=1e-6, atol=1e-6)
    save_scores(tmp_path / "s.npy", maps)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected_scores.numpy(), rtol=1e-6,
                               atol=1e-6)


def test_images_encoded_together_equal_each_encoded_alone(segmenter):
    """Windows of several images share the encoders' batches (what segment_files does on
    CUDA); each image's features and result are those of set_image alone, also for an image
    whose windows are smaller than the others' (a 100-px working size: grouped apart)."""
    from lposs.config import LPOSSConfig as Config

    segmenter.config = Config(k=30, short_side=224, windows=((224, 112), (160, 80)))
    images = [_image(seed=5), _image(height=120, width=260, seed=6)]
    prepared = [segmenter.prepare_image(image) for image in images]
    small = Segmenter(segmenter.clip, segmenter.dino, segmenter.config.replace(short_side=100))
    prepared.append(small.prepare_image(_image(height=50, width=80, seed=7)))
    together = segmenter.encode_images(prepared)
    for prep, encoded in zip(prepared, together):
        alone = segmenter.set_image(prep)
        assert len(encoded.setups) == 2
        for a, b in zip(encoded.setups, alone.setups):
            assert torch.equal(a.boxes, b.boxes) and torch.equal(a.positions, b.positions)
            torch.testing.assert_close(a.clip, b.clip, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.dino, b.dino, rtol=1e-5, atol=1e-5)
        expected = segmenter.predict(["cat", "dog"])
        segmenter.set_encoded(encoded)
        result = segmenter.predict(["cat", "dog"])
        assert (result.labels == expected.labels).float().mean() > 0.999


def test_an_encoded_image_answers_only_for_the_encoders_that_made_it(
        segmenter, tiny_clip, tiny_dino, tiny_clip_kwargs, tmp_path):
    from safetensors.torch import save_file

    from lposs.encoders import load_clip
    from lposs.errors import ConfigError

    encoded = segmenter.set_image(_image(seed=8))
    encoded.save(tmp_path / "e.pt")
    again = Segmenter(tiny_clip, tiny_dino, FAST)
    again.set_encoded(EncodedImage.load(tmp_path / "e.pt"))  # the same encoders: fine
    assert again.predict(["a", "b"]).labels.shape == (150, 200)
    with pytest.raises(ConfigError, match="encode the image again"):
        Segmenter(tiny_clip, tiny_dino, FAST.replace(windows=((160, 80),))).set_encoded(encoded)

    state = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    save_file(state, tmp_path / "a.safetensors")
    save_file({k: v + 0.01 for k, v in state.items()}, tmp_path / "b.safetensors")
    clip_a, clip_b = (load_clip("ViT-B-16", weights=tmp_path / f"{n}.safetensors",
                                **tiny_clip_kwargs) for n in "ab")
    from_a = Segmenter(clip_a, tiny_dino, FAST).set_image(_image(seed=8))
    Segmenter(clip_a, tiny_dino, FAST).set_encoded(from_a)
    with pytest.raises(ConfigError, match="other encoders, weights"):
        Segmenter(clip_b, tiny_dino, FAST).set_encoded(from_a)  # same shapes, other weights
    from_a.encoders = None  # as saved before identities were recorded: shapes still checked
    with pytest.raises(ConfigError, match="other encoders, weights, precision or window"):
        Segmenter(clip_a, tiny_dino, FAST.replace(windows=((160, 80),))).set_encoded(from_a)


@pytest.mark.parametrize("bad", [-5, 0, 2.5, True])
def test_a_pixel_cap_that_is_not_positive_is_refused(tiny_clip, tiny_dino, bad):
    with pytest.raises(lposs.ConfigError, match="max_pixels must be a positive int or None"):
        Segmenter(tiny_clip, tiny_dino, FAST).set_image(_image(), max_pixels=bad)


def test_text_time_is_what_the_vocabulary_took_even_when_encoded_before(tiny_clip, tiny_dino):
    segmenter = Segmenter(tiny_clip, tiny_dino, FAST)
    tiny_clip.text_cache.clear()
    vocab = segmenter.encode_vocabulary(["tiger", "zebra;horse"])  # as a batch does first
    assert vocab.rows == ("tiger", "zebra", "horse")
    segmenter.set_image(_image())
    first = segmenter.predict(["tiger", "zebra;horse"])
    second = segmenter.predict(vocab)
    assert first.timings["text"] == second.timings["text"] > 0
    assert torch.equal(first.labels, second.labels)
