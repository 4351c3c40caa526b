"""Image quality metrics for dense-against-sparse A/B comparisons: PSNR, SSIM and a comparison image.

Shared by the "Sparse Attention A/B" node and the ``adacluster-ab`` command. Inputs are ComfyUI IMAGE
batches: float tensors (frames, height, width, channels) with values in [0, 1]. Only torch is needed;
PIL (which ComfyUI ships) is used for the labels of the comparison image when it is importable.

* PSNR uses a peak of 1.0. The whole-batch PSNR comes from the mean squared error over every pixel of
  every frame; identical batches give an infinite PSNR.
* SSIM is the structural similarity of Wang et al. (2004): an 11 x 11 Gaussian window (sigma 1.5),
  K1 = 0.01, K2 = 0.03, computed per channel over the valid window positions and averaged over channels,
  then over frames. Frames smaller than the window use the largest odd window that fits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MAX_AUTO_FRAMES = 4


class QualityError(ValueError):
    """Inputs that cannot be compared (shapes, frame choices); the message names the bad value."""


def describe(images: torch.Tensor) -> str:
    if images.ndim != 4:
        return f"a tensor of shape {tuple(images.shape)}"
    frames, height, width, channels = images.shape
    return f"{frames} frame{'s' if frames != 1 else ''} of {width}x{height} with {channels} channels"


def check_comparable(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("image_a", "image_b")) -> None:
    """Raises QualityError unless a and b are IMAGE batches of the same frame count, size and channels."""
    for name, images in zip(names, (a, b)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise QualityError(f"{name} must be an IMAGE batch (frames, height, width, channels), got {shape}")
        if images.shape[0] == 0:
            raise QualityError(f"{name} has no frames")
    if a.shape != b.shape:
        what = "frame counts" if a.shape[0] != b.shape[0] else "sizes" if a.shape[1:3] != b.shape[1:3] else "channels"
        raise QualityError(f"{names[0]} is {describe(a)} but {names[1]} is {describe(b)}: the {what} differ. "
                           "Compare two runs of the same workflow (same size, length and frame rate).")


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB; infinite for a zero error."""
    return math.inf if mse <= 0.0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid filtering of (C, 1, H, W) with the 1-D window g."""
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, g.view(1, 1, -1, 1))


def ssim_frame(x: torch.Tensor, y: torch.Tensor) -> float:
    """SSIM of two (H, W, C) frames with values in [0, 1]."""
    x = x.to(torch.float64).permute(2, 0, 1).unsqueeze(1)  # (C, 1, H, W)
    y = y.to(torch.float64).permute(2, 0, 1).unsqueeze(1)
    size = min(SSIM_WINDOW, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # largest odd window that fits
    g = _gaussian_window(size, SSIM_SIGMA, x.dtype, x.device)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    xx, yy, xy = _filter(x * x, g) - mu_x ** 2, _filter(y * y, g) - mu_y ** 2, _filter(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * xy + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (xx + yy + c2)
    return float((num / den).mean())


@dataclass
class Comparison:
    frames: int
    height: int
    width: int
    psnr: float  # dB over the whole batch; inf for identical batches
    ssim: float  # mean over frames
    frame_psnr: list
    frame_ssim: list
    max_abs_difference: float
    identical: bool

    @property
    def worst_frame(self) -> int:
        return min(range(self.frames), key=lambda i: (self.frame_psnr[i], i))

    def to_dict(self) -> dict:
        data = asdict(self)
        # JSON has no infinity: identical frames are written as null with "identical" saying why.
        data["psnr"] = None if math.isinf(self.psnr) else self.psnr
        data["frame_psnr"] = [None if math.isinf(v) else v for v in data["frame_psnr"]]
        data["worst_frame"] = self.worst_frame
        return data

    def to_text(self, label_a: str = "A", label_b: str = "B") -> str:
        worst = self.worst_frame
        lines = [f"Sparse Attention A/B: {label_a} against {label_b}, {self.frames} frame"
                 f"{'s' if self.frames != 1 else ''} of {self.width}x{self.height}"]
        if self.identical:
            lines.append("PSNR: inf dB - the two batches are identical (every pixel equal); SSIM 1.0000")
            return "\n".join(lines)
        lines.append(f"PSNR: {_db(self.psnr)} over all frames")
        lines.append(f"SSIM: {self.ssim:.4f} (mean over frames; 1 = identical)")
        lines.append(f"worst frame: {worst} at {_db(self.frame_psnr[worst])}, SSIM {self.frame_ssim[worst]:.4f}")
        lines.append(f"largest pixel difference: {self.max_abs_difference:.4f} (of 1.0)")
        identical_frames = sum(1 for v in self.frame_psnr if math.isinf(v))
        if identical_frames:
            lines.append(f"identical frames: {identical_frames} of {self.frames}")
        lines.append("per-frame PSNR (dB): " + ", ".join(_db(v, unit=False) for v in self.frame_psnr))
        return "\n".join(lines)


def _db(value: float, unit: bool = True) -> str:
    text = "inf" if math.isinf(value) else f"{value:.2f}"
    return f"{text} dB" if unit else text


def compare(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("image_a", "image_b")) -> Comparison:
    """PSNR, SSIM and per-frame values of two IMAGE batches of the same shape."""
    check_comparable(a, b, names)
    frame_mse, frame_ssim, max_abs = [], [], 0.0
    for i in range(a.shape[0]):
        x, y = a[i].to(torch.float64), b[i].to(torch.float64)
        diff = x - y
        frame_mse.append(float((diff * diff).mean()))
        max_abs = max(max_abs, float(diff.abs().max()))
        frame_ssim.append(1.0 if frame_mse[-1] == 0.0 else ssim_frame(x, y))
    mse = sum(frame_mse) / len(frame_mse)
    return Comparison(frames=a.shape[0], height=a.shape[1], width=a.shape[2], psnr=psnr_from_mse(mse),
                      ssim=sum(frame_ssim) / len(frame_ssim), frame_psnr=[psnr_from_mse(m) for m in frame_mse],
                      frame_ssim=frame_ssim, max_abs_difference=max_abs, identical=mse == 0.0)


def choose_frames(spec: str, comparison: Comparison) -> list:
    """Frame indices for the comparison image.

    ``spec`` is empty or "auto" (first, worst, middle and last frame) or a comma list of indices, where
    negative indices count from the end (-1 is the last frame)."""
    count = comparison.frames
    spec = (spec or "").strip().lower()
    if spec in ("", "auto"):
        picks = [0, comparison.worst_frame, count // 2, count - 1]
        return sorted(set(picks))[:MAX_AUTO_FRAMES]
    frames = []
    for part in spec.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            index = int(part)
        except ValueError:
            raise QualityError(f"frames = {spec!r}: {part!r} is not a frame index; use 'auto' or a list "
                               f"such as '0, 40, -1'") from None
        if not -count <= index < count:
            raise QualityError(f"frames = {spec!r}: frame {index} is out of range: the batches have {count} "
                               f"frames, so indices go from {-count} to {count - 1}")
        frames.append(index % count)
    if not frames:
        raise QualityError(f"frames = {spec!r} names no frame; use 'auto' or a list such as '0, 40, -1'")
    return list(dict.fromkeys(frames))


def _resize(frame: torch.Tensor, width: int) -> torch.Tensor:
    """(H, W, C) frame scaled to ``width`` (area averaging when shrinking)."""
    h, w = frame.shape[:2]
    if w == width:
        return frame
    height = max(1, round(h * width / w))
    x = frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    mode = "area" if width < w else "nearest"
    return torch.nn.functional.interpolate(x, size=(height, width), mode=mode)[0].permute(1, 2, 0)


def comparison_image(a: torch.Tensor, b: torch.Tensor, frames: list, gain: float = 4.0, tile_width: int = 480,
                     labels: Sequence[str] = ("A", "B"), comparison: Optional[Comparison] = None) -> torch.Tensor:
    """One IMAGE (1, H, W, 3): the chosen frames of A in the first row, of B in the second, and
    |A - B| x gain (clipped to 1) in a third strip, each tile labelled with its frame and PSNR."""
    check_comparable(a, b)
    if gain <= 0 or not math.isfinite(gain):
        raise QualityError(f"difference gain = {gain!r} is out of range: expected a number > 0")
    width = min(int(tile_width), a.shape[2])
    rows = [[], [], []]
    for i in frames:
        x, y = a[i, ..., :3].to(torch.float32).clamp(0, 1), b[i, ..., :3].to(torch.float32).clamp(0, 1)
        if x.shape[-1] == 1:
            x, y = x.expand(-1, -1, 3), y.expand(-1, -1, 3)
        diff = ((x - y).abs().mean(-1, keepdim=True) * gain).clamp(0, 1).expand(-1, -1, 3)
        for row, tile in zip(rows, (x, y, diff)):
            row.append(_resize(tile, width))
    gap = 4
    strips = []
    for row in rows:
        parts = []
        for j, tile in enumerate(row):
            parts.append(tile)
            if j + 1 < len(row):
                parts.append(torch.ones(tile.shape[0], gap, 3))
        strips.append(torch.cat(parts, dim=1))
    header = 18
    pieces = []
    for strip in strips:
        pieces += [torch.ones(header, strip.shape[1], 3), strip]
    image = torch.cat(pieces, dim=0)
    image = _label(image, frames, width + gap, header, strips[0].shape[0] + header, labels, gain, comparison)
    return image.unsqueeze(0)


def _label(image: torch.Tensor, frames: list, step: int, header: int, row_height: int, labels, gain: float,
           comparison: Optional[Comparison]) -> torch.Tensor:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return image
    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy()
    pil = Image.fromarray(data, "RGB")
    draw = ImageDraw.Draw(pil)
    names = (labels[0], labels[1], f"|{labels[0]} - {labels[1]}| x {gain:g}")
    for r, name in enumerate(names):
        for j, frame in enumerate(frames):
            text = f"{name}  frame {frame}"
            if r == 2 and comparison is not None:
                text += f"  PSNR {_db(comparison.frame_psnr[frame])}"
            draw.text((j * step + 3, r * row_height + 3), text, fill=(20, 20, 20))
    out = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(pil.height, pil.width, 3)
    return out.to(torch.float32) / 255.0
