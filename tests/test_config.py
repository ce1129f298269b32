import dataclasses

import pytest

import lposs
from lposs.config import PRESETS, LPOSSConfig, get_preset


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
    [{"alpha": 1.0}, {"alpha": 0.0}, {"k": 0}, {"r": 12}, {"r": 1}, {"tau": 0.0}, {"windows": ()},
     {"windows": ((224, 0),)}, {"max_iter": 0}],
)
def test_invalid_settings_raise_config_error(changes):
    with pytest.raises(lposs.ConfigError):
        LPOSSConfig().replace(**changes)


def test_unknown_names_raise_config_error():
    with pytest.raises(lposs.ConfigError, match="choose one of"):
        get_preset("nope")
    with pytest.raises(lposs.ConfigError, match="unknown setting"):
        LPOSSConfig().replace(kk=3)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LPOSSConfig().k = 3
