import dataclasses

import numpy as np
import pytest
import torch

import lposs
from lposs.config import LPOSSConfig
from lposs.methods import METHODS, PRESETS, get_preset, method_of, with_method


def test_defaults_are_the_papers():
    cfg = LPOSSConfig()
    assert (cfg.k, cfg.gamma, cfg.sigma, cfg.distance_power) == (400, 3.0, 0.01, 1.0)
    assert (cfg.alpha, cfg.tol, cfg.max_iter) == (0.95, 1e-6, 10)
    assert (cfg.r, cfg.tau, cfg.short_side, cfg.windows) == (13, 0.01, 448, ((224, 112),))
    assert (cfg.clip, cfg.clip_pretrained) == ("ViT-B-16", "laion2b_s34b_b88k")
    assert cfg.dino == "dino_vitb16"
    assert cfg.patch_stage and cfg.pixel_stage


def test_presets_change_only_what_they_document():
    base = dataclasses.asdict(LPOSSConfig())

    def diff(name):
        cfg = dataclasses.asdict(get_preset(name))
        return {k: v for k, v in cfg.items() if base[k] != v}

    assert diff("lposs+") == {} and diff("dino-b16") == {}
    assert diff("lposs") == {"pixel_stage": False}
    assert diff("maskclip") == {"patch_stage": False, "pixel_stage": False}
    assert diff("ensemble") == {"windows": ((224, 112), (448, 224))}
    assert diff("dino-b8") == {"dino": "dino_vitb8", "k": 800}
    assert diff("dinov2-b14") == {"dino": "dinov2_vitb14", "gamma": 7.0}
    assert set(PRESETS) >= {"lposs", "lposs+", "ensemble", "dino-b16", "dino-b8", "dinov2-b14"}


@pytest.mark.parametrize(
    "changes",
    [{"alpha": 1.0}, {"alpha": 0.0}, {"k": 0}, {"r": 12}, {"r": 1}, {"r": 33}, {"tau": 0.0},
     {"windows": ()}, {"windows": ((224, 0),)}, {"max_iter": 0}],
)
def test_invalid_settings_raise_config_error(changes):
    with pytest.raises(lposs.ConfigError):
        LPOSSConfig().replace(**changes)


def test_no_windows_is_a_setting():
    assert LPOSSConfig(windows=None).windows is None
    assert LPOSSConfig(windows=None).replace(k=5).encoder_key() != LPOSSConfig().encoder_key()


def test_unknown_names_raise_config_error():
    with pytest.raises(lposs.ConfigError, match="choose one of"):
        get_preset("nope")
    with pytest.raises(lposs.ConfigError, match="unknown setting"):
        LPOSSConfig().replace(kk=3)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LPOSSConfig().k = 3


def test_methods_set_their_stages_and_are_read_back():
    assert {name: m.refiners for name, m in METHODS.items() if not m.protocol} == {
        "lposs+": ("lposs", "lposs+"), "lposs": ("lposs",), "maskclip": ()}
    dino_b8 = get_preset("dino-b8")
    for name in ("lposs+", "lposs", "maskclip"):
        cfg = with_method(dino_b8, name)
        assert method_of(cfg) == name and (cfg.dino, cfg.k) == ("dino_vitb8", 800)
    assert method_of(get_preset("lposs")) == "lposs"
    assert method_of(LPOSSConfig(patch_stage=False, pixel_stage=True)) is None
    with pytest.raises(lposs.ConfigError, match="unknown method"):
        with_method(LPOSSConfig(), "oracle")


def test_every_preset_is_a_row_of_the_method_table_or_its_alias():
    assert set(PRESETS) == {*METHODS, "dino-b16"}
    for name, method in METHODS.items():
        cfg = PRESETS[name]
        assert (cfg.patch_stage, cfg.pixel_stage) == ("lposs" in method.refiners,
                                                      "lposs+" in method.refiners)
        assert all(getattr(cfg, field) == value for field, value in method.protocol)


@pytest.mark.parametrize("changes,field", [
    ({"windows": ((224, 500),)}, "stride <= size"), ({"windows": ((224.0, 112),)}, "ints"),
    ({"tau": -1.0}, "tau must be > 0, got -1.0"), ({"sigma": -0.5}, "sigma must be >= 0"),
    ({"k": True}, "k must be int"), ({"clip": 3}, "clip must be str"),
    ({"patch_stage": 1}, "patch_stage must be bool"),
])
def test_a_bad_setting_is_named_with_its_value(changes, field):
    with pytest.raises(lposs.ConfigError, match=field.replace("(", r"\(")):
        LPOSSConfig().replace(**changes)


# A value other than the default for every field a sweep may vary (depth_scale, which acts
# only with depth features: test_depth.py).
_OTHER_VALUES = {"k": 5, "gamma": 2.0, "sigma": 0.05, "distance_power": 2.0, "joint": False,
                 "r": 3, "tau": 0.05, "alpha": 0.5, "tol": 1e-2, "max_iter": 2}


def test_sweepable_fields_are_the_propagation_settings():
    assert LPOSSConfig.sweepable_fields() == (*list(_OTHER_VALUES)[:7], "depth_scale",
                                              *list(_OTHER_VALUES)[7:])
    encoder_fields = {name for name, _ in LPOSSConfig().encoder_key()}
    assert encoder_fields == {"clip", "clip_pretrained", "dino", "short_side", "long_side",
                              "windows", "patch_stage", "graph_features", "pixel_features",
                              "depth_model"}


def _blocks(height=48, width=64):
    """A uint8 RGB image (H, W, 3): two coloured halves with seeded noise."""
    rng = np.random.default_rng(0)
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = (200, 40, 30)
    img[:, width // 2 :] = (30, 160, 60)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _assert_same_encoding(a, b):
    torch.testing.assert_close(a.working, b.working, rtol=0, atol=0)
    for x, y in zip(a.setups, b.setups, strict=True):
        for name in ("boxes", "clip", "dino", "positions"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=0, atol=0)


@pytest.mark.parametrize("field", list(_OTHER_VALUES))
def test_a_sweepable_field_keeps_the_encoding_and_rebuilds_the_graphs(field, tiny_clip,
                                                                      tiny_dino):
    from lposs.pipeline.segmenter import Segmenter

    base = LPOSSConfig(k=10, r=5, short_side=64, windows=((64, 32),))
    changed = base.replace(**{field: _OTHER_VALUES[field]})
    assert changed.encoder_key() == base.encoder_key()
    image = _blocks()
    segmenter = Segmenter(tiny_clip, tiny_dino, base)
    encoded = segmenter.set_image(image)
    before = segmenter.predict(["a", "b"]).scores.full()
    fresh = Segmenter(tiny_clip, tiny_dino, changed)
    _assert_same_encoding(encoded, fresh.set_image(image))  # the encoding does not depend on it
    segmenter.config = changed  # keeps the encoding; the graphs follow graph_key
    after = segmenter.predict(["a", "b"]).scores.full()
    torch.testing.assert_close(after, fresh.predict(["a", "b"]).scores.full())
    assert not torch.equal(after, before)


@pytest.mark.parametrize("changes", [{"short_side": 48}, {"long_side": 48},
                                     {"windows": ((48, 32),)}, {"patch_stage": False}])
def test_an_encoder_field_changes_the_encoding_and_its_key(changes, tiny_clip, tiny_dino):
    from lposs.pipeline.segmenter import Segmenter

    base = LPOSSConfig(k=10, r=5, short_side=64, windows=((64, 32),))
    changed = base.replace(**changes)
    assert changed.encoder_key() != base.encoder_key()
    assert changed.sweepable_fields() == base.sweepable_fields()
    first = Segmenter(tiny_clip, tiny_dino, base).set_image(_blocks())
    second = Segmenter(tiny_clip, tiny_dino, changed).set_image(_blocks())
    with pytest.raises(AssertionError):
        _assert_same_encoding(first, second)
