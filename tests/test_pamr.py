"""PAMR against a transcription of visinf/1-stage-wseg models/mods/pamr.py (its conv kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lposs.propagation.pamr import pamr

TOL = {"atol": 1e-5, "rtol": 1e-5}
# (row, col) of the -1 / +1 tap in each of the 8 shift kernels, in the official order.
_TAPS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]


def _kernel(taps, centre):
    weight = torch.zeros(len(taps), 1, 3, 3)
    for i, (r, c) in enumerate(taps):
        weight[i, 0, 1, 1] = centre
        weight[i, 0, r, c] += -1 if centre else 1
    return weight


def _local(x, kernel, dilations):
    """LocalAffinity.forward: one loop over dilations, one conv over the neighbour kernels."""
    b, k, h, w = x.size()
    x = x.view(b * k, 1, h, w)
    affs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(affs, 1).view(b, k, -1, h, w)


def official_pamr(x, mask, num_iter, dilations):
    """PAMR.forward with LocalAffinityAbs, LocalAffinityCopy and LocalStDev."""
    aff_kernel = _kernel(_TAPS, centre=1)  # centre 1, neighbour -1
    copy_kernel = _kernel(_TAPS, centre=0)  # neighbour 1
    std_kernel = _kernel([(r, c) for r in range(3) for c in range(3)], centre=0)
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = _local(x, std_kernel, dilations).std(2, keepdim=True)
    x = -torch.abs(_local(x, aff_kernel, dilations)) / (1e-8 + 0.1 * x_std)
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = _local(mask, copy_kernel, dilations)
        mask = (m * x).sum(2)
    return mask


@pytest.mark.parametrize("iterations, dilations", [(5, (8, 16)), (10, (8, 16)), (2, (1,))])
def test_matches_official(iterations, dilations):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 40, 52)
    masks = torch.randn(2, 4, 20, 26)
    got = pamr(image, masks, iterations=iterations, dilations=dilations)
    want = official_pamr(image, masks, iterations, dilations)
    assert got.shape == (2, 4, 40, 52)
    torch.testing.assert_close(got, want, **TOL)


def test_constant_image_averages_neighbours_uniformly():
    """A constant image has no edges: every affinity is 1/(8 * dilations), one step is the mean
    of the 8 replicate-padded neighbours at each distance."""
    torch.manual_seed(1)
    image = torch.full((1, 3, 9, 11), 0.3)
    masks = torch.randn(1, 2, 9, 11)
    got = pamr(image, masks, iterations=1, dilations=(1, 2))
    want = torch.zeros_like(masks)
    for d in (1, 2):
        padded = F.pad(masks, [d] * 4, mode="replicate")
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    want += padded[..., d + d * dy:d + d * dy + 9, d + d * dx:d + d * dx + 11]
    torch.testing.assert_close(got, want / 16, **TOL)


def test_constant_masks_and_class_sums_are_kept():
    """The affinities of every pixel sum to 1: constant masks stay, class sums are preserved."""
    torch.manual_seed(2)
    image = torch.rand(1, 3, 30, 30)
    flat = pamr(image, torch.full((1, 3, 30, 30), 0.7), iterations=5, dilations=(8, 16))
    torch.testing.assert_close(flat, torch.full_like(flat, 0.7), **TOL)
    probs = torch.rand(1, 5, 30, 30).softmax(1)
    out = pamr(image, probs, iterations=5, dilations=(8, 16))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 30, 30), **TOL)
    assert not torch.allclose(out, probs, atol=1e-3)


def test_zero_iterations_only_resize():
    image, masks = torch.rand(1, 3, 16, 16), torch.rand(1, 2, 8, 8)
    want = F.interpolate(masks, size=(16, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(pamr(image, masks, iterations=0, dilations=(1,)), want)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="masks"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(2, 2, 8, 8), iterations=1, dilations=(1,))
