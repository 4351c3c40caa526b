"""The A/B metrics against independent numpy computations, on fresh random images of odd sizes."""
import math

import numpy as np
import pytest
import torch

from comfyui_adacluster.adacluster_core import quality


def _images(frames=3, height=29, width=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(frames, height, width, 3, generator=gen)


def _numpy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (H, W, C) frames: explicit 11 x 11 Gaussian window over every valid position."""
    coords = np.arange(11) - 5.0
    g = np.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    values = []
    for c in range(x.shape[2]):
        px = np.lib.stride_tricks.sliding_window_view(x[..., c], (11, 11))
        py = np.lib.stride_tricks.sliding_window_view(y[..., c], (11, 11))
        mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
        vx = (px * px * w).sum((-1, -2)) - mx ** 2
        vy = (py * py * w).sum((-1, -2)) - my ** 2
        cxy = (px * py * w).sum((-1, -2)) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        values.append(((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


def test_identical_batches_give_infinite_psnr_and_say_so():
    a = _images()
    result = quality.compare(a, a.clone())
    assert math.isinf(result.psnr) and result.identical and result.ssim == 1.0
    assert all(math.isinf(v) for v in result.frame_psnr)
    text = result.to_text()
    assert "inf dB" in text and "identical" in text
    assert result.to_dict()["psnr"] is None


def test_perturbed_batches_match_numpy():
    a = _images(seed=1)
    gen = torch.Generator().manual_seed(2)
    b = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    b[1] = a[1]  # one identical frame among perturbed ones
    result = quality.compare(a, b)
    x, y = a.double().numpy(), b.double().numpy()
    mse = ((x - y) ** 2).mean()
    assert result.psnr == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-9)
    for i in (0, 2):
        frame_mse = ((x[i] - y[i]) ** 2).mean()
        assert result.frame_psnr[i] == pytest.approx(10 * np.log10(1.0 / frame_mse), rel=1e-9)
        assert result.frame_ssim[i] == pytest.approx(_numpy_ssim(x[i], y[i]), rel=1e-9)
    assert math.isinf(result.frame_psnr[1]) and result.frame_ssim[1] == 1.0
    assert result.worst_frame == int(np.argmax([((x[i] - y[i]) ** 2).mean() for i in range(3)]))
    assert result.max_abs_difference == pytest.approx(np.abs(x - y).max())
    assert 0.0 < result.ssim < 1.0 and not result.identical
    text = result.to_text("dense", "sparse")
    assert f"{result.psnr:.2f} dB" in text and "worst frame" in text and "identical frames: 1 of 3" in text


def test_constant_offset_has_closed_form_psnr():
    a = torch.full((2, 13, 17, 3), 0.25)
    result = quality.compare(a, a + 0.1)
    assert result.psnr == pytest.approx(20.0, abs=1e-5)  # 10 log10(1 / 0.01), float32 inputs


@pytest.mark.parametrize("shape_b, what", [((4, 29, 37, 3), "frame counts"), ((3, 29, 36, 3), "sizes"),
                                           ((3, 29, 37, 4), "channels")])
def test_mismatched_batches_name_both_shapes(shape_b, what):
    a = _images()
    with pytest.raises(quality.QualityError) as info:
        quality.compare(a, torch.rand(shape_b))
    message = str(info.value)
    assert what in message and "image_a is 3 frames of 37x29" in message


def test_small_frames_use_a_smaller_window():
    a = _images(frames=1, height=7, width=9, seed=3)
    b = (a + 0.02).clamp(0, 1)
    value = quality.ssim_frame(a[0], b[0])
    assert 0.0 < value < 1.0


def test_frame_choice():
    a = _images(frames=9, seed=4)
    b = a.clone()
    b[5] += 0.2
    result = quality.compare(a, b)
    assert quality.choose_frames("auto", result) == [0, 4, 5, 8]
    assert quality.choose_frames("1, -1, 1", result) == [1, 8]
    with pytest.raises(quality.QualityError, match="frame 9 is out of range.*from -9 to 8"):
        quality.choose_frames("9", result)
    with pytest.raises(quality.QualityError, match="'x' is not a frame index"):
        quality.choose_frames("0, x", result)


def test_comparison_image_layout_and_difference_strip():
    a = _images(frames=5, height=31, width=41, seed=5)
    gen = torch.Generator().manual_seed(6)
    b = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    result = quality.compare(a, b)
    image = quality.comparison_image(a, b, [0, 3], gain=3.0, comparison=result)
    header, gap = 18, 4
    assert image.shape == (1, 3 * (31 + header), 2 * 41 + gap, 3)
    tile = image[0, 2 * (31 + header) + header:, 41 + gap:]  # difference tile of frame 3
    expected = ((a[3] - b[3]).abs().mean(-1, keepdim=True) * 3.0).clamp(0, 1).expand(-1, -1, 3)
    assert torch.allclose(tile, expected, atol=1 / 255 + 1e-6)
    assert torch.allclose(image[0, header:header + 31, :41], a[0], atol=1 / 255 + 1e-6)
    with pytest.raises(quality.QualityError, match="difference gain"):
        quality.comparison_image(a, b, [0], gain=0.0)
