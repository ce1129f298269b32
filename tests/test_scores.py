import pytest
import torch
import torch.nn.functional as F

from lposs.pipeline.scores import BandResize


@pytest.mark.parametrize(("source", "target"), [
    ((448, 597), (375, 500)),    # a VOC photo's working size back to the photo (down)
    ((448, 672), (2000, 3000)),  # up, by a non-integer factor
    ((33, 71), (1000, 333)),     # up in rows, down in columns
    ((1, 5), (7, 3)),            # a single source row
])
def test_band_resize_is_interpolate_a_band_at_a_time(source, target):
    planes = torch.randn(3, *source, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(planes[None], size=target, mode="bilinear", align_corners=False)[0]
    resize = BandResize(source, target)
    for rows in (1, 7, 64, target[0]):
        bands = [resize.band(planes, top, bottom) for top, bottom in resize.bands(rows)]
        assert [b.shape[-2] for b in bands] == [min(rows, target[0] - t)
                                                for t in range(0, target[0], rows)]
        out = torch.cat(bands, dim=-2)
        torch.testing.assert_close(out, expected, rtol=0, atol=4e-7)  # a float32 rounding
        assert torch.equal(out.argmax(0), expected.argmax(0))
