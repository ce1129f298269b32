import math

import pytest
import torch

from lposs.errors import ConfigError, ScoresError
from lposs.pipeline.checks import check_scores, check_unknown_threshold, same_aspect_ratio

_SIZES = [(40, 60), (448, 600), (2, 5000), (333, 500), (1080, 1920), (7, 3)]
_ROUNDINGS = [math.floor, math.ceil, lambda v: int(v + 0.5)]


@pytest.mark.parametrize("size", _SIZES)
@pytest.mark.parametrize("scale", [0.01, 0.1, 0.37, 0.5, 1.0, 1.5, 3.3])
def test_every_rounding_of_a_resize_has_the_same_aspect_ratio(size, scale):
    height, width = size
    for round_h in _ROUNDINGS:
        for round_w in _ROUNDINGS:
            resized = (max(round_h(height * scale), 1), max(round_w(width * scale), 1))
            assert same_aspect_ratio(resized, size)  # the map resized from the image
            assert same_aspect_ratio(size, resized)  # the image resized from the map


@pytest.mark.parametrize(("size", "reference"), [
    ((60, 40), (40, 60)), ((30, 60), (40, 60)), ((40, 80), (40, 60)), ((5000, 2), (2, 5000)),
    ((448, 448), (448, 600)), ((60, 3), (40, 60)),
])
def test_other_aspect_ratios_are_told_apart(size, reference):
    assert not same_aspect_ratio(size, reference)


def test_scores_of_the_image_at_any_size_pass():
    for shape in [(3, 40, 60), (1, 20, 30), (5, 7, 10), (2, 400, 600)]:
        check_scores(torch.zeros(shape), (40, 60))


@pytest.mark.parametrize(("scores", "message"), [
    (torch.zeros(40, 60, 3), "looks like (H, W, C); transpose to (C, H, W)"),
    (torch.zeros(40, 60), "scores[None]"),
    (torch.zeros(1, 3, 40, 60), "(C, H, W)"),
    (torch.zeros(0, 40, 60), "empty"),
    (torch.zeros(2, 0, 0), "empty"),
    (torch.zeros(2, 60, 40), "another aspect ratio"),
    (torch.tensor([[[0.0, float("nan")]]]).repeat(1, 40, 30), "NaN"),
])
def test_scores_that_cannot_be_this_images_are_refused(scores, message):
    with pytest.raises(ScoresError) as info:
        check_scores(scores, (40, 60))
    assert message in str(info.value)


def test_scores_must_be_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_scores([[[0.0]]], (1, 1))


@pytest.mark.parametrize("value", [None, 0, -0.5, 0.2, 1, -1.0])
def test_thresholds_on_the_cosine_scale_and_none_pass(value):
    check_unknown_threshold(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "0.2"])
def test_other_thresholds_are_config_errors(value):
    with pytest.raises(ConfigError, match="unknown_threshold"):
        check_unknown_threshold(value)


@pytest.mark.parametrize(("value", "every_pixel"), [(30, "unknown"), (1.01, "unknown"),
                                                    (-2, "labelled")])
def test_thresholds_off_the_cosine_scale_say_what_they_would_do(value, every_pixel):
    with pytest.raises(ConfigError, match=rf"-1\.\.1.*every pixel would be {every_pixel}"):
        check_unknown_threshold(value)
