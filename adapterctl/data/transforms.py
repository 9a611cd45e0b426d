"""The mmseg 0.20 ADE20K pipelines on numpy/torch: resize with ratio, cat_max_ratio crop, flip, photometric
distortion, pad; test resize + ResizeToMultiple. Each train transform draws from the ``np.random.Generator``
it is handed, so a sample's augmentation is a function of its seed (resumable, worker-count independent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: fit the long side in max(scale) and the short in min(scale)."""
    long_t, short_t = max(scale), min(scale)
    f = min(long_t / max(h, w), short_t / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float 0-255 -> bilinear (cv2 INTER_LINEAR semantics), rounded back to the uint8 grid."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) uint8 -> nearest (floor of dst * scale, cv2 INTER_NEAREST)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)


def random_crop_box(
    label: np.ndarray, crop: Sequence[int], cat_max_ratio: float, rng: np.random.Generator, ignore_index: int = IGNORE
) -> tuple[int, int, int, int]:
    """mmseg RandomCrop: up to 10 tries for a box where no class covers >= cat_max_ratio of the labelled pixels;
    the 11th box drawn is used unchecked."""
    h, w = label.shape
    ch, cw = crop

    def draw() -> tuple[int, int, int, int]:
        y1 = int(rng.integers(0, max(h - ch, 0) + 1))
        x1 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y1, min(y1 + ch, h), x1, min(x1 + cw, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB 0-255 -> H in degrees [0, 360), S and V in [0, 1]."""
    r, g, b = img / 255.0
    maxc, _ = img.max(0)
    maxc = maxc / 255.0
    minc = img.min(0)[0] / 255.0
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, (h * 60.0) % 360.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    c = v * s
    hp = h / 60.0
    x = c * (1 - (hp % 2 - 1).abs())
    zero = torch.zeros_like(h)
    sector = hp.floor().long() % 6
    r = torch.stack([c, x, zero, zero, x, c])
    g = torch.stack([x, c, c, x, zero, zero])
    b = torch.stack([zero, zero, x, c, c, x])
    idx = sector[None]
    rgb = torch.stack([r.gather(0, idx)[0], g.gather(0, idx)[0], b.gather(0, idx)[0]]) + (v - c)
    return (rgb * 255.0).clamp_(0, 255)


def photometric_distortion(
    img: torch.Tensor,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmseg PhotoMetricDistortion: each step with p=0.5, contrast first or last; results truncated to uint8.

    Hue and saturation work in HSV as OpenCV does (hue in 2-degree units), in float rather than OpenCV's 8-bit
    HSV, so pixel values can differ by rounding from mmseg; the distribution of the augmentation is the same.
    """

    def convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (x * alpha + beta).clamp_(0, 255).floor_()

    if rng.integers(2):
        img = convert(img, beta=float(rng.uniform(-brightness_delta, brightness_delta)))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=float(rng.uniform(*contrast_range)))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[1] = (hsv[1] * float(rng.uniform(*saturation_range))).clamp_(0, 1)
        img = _hsv_to_rgb(hsv).floor_()
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[0] = (hsv[0] + 2.0 * int(rng.integers(-hue_delta, hue_delta))) % 360.0
        img = _hsv_to_rgb(hsv).floor_()
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=float(rng.uniform(*contrast_range)))
    return img


def pad_to(
    img: torch.Tensor, label: torch.Tensor, size: Sequence[int], mean: Sequence[float], ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to ``size``: image with the mean colour (0 once normalised, as mmseg pads after
    Normalize), label with ``ignore_index``."""
    h, w = img.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if not (ph or pw):
        return img, label
    out = torch.empty((3, h + ph, w + pw), dtype=img.dtype)
    out[:] = torch.tensor(mean, dtype=img.dtype).view(3, 1, 1)
    out[:, :h, :w] = img
    lab = torch.full((h + ph, w + pw), ignore_index, dtype=label.dtype)
    lab[:h, :w] = label
    return out, lab


class TrainTransform:
    """Resize (ratio range) -> RandomCrop (cat_max_ratio) -> flip -> photometric distortion -> pad."""

    def __init__(
        self,
        scale: Sequence[int],
        ratio_range: Sequence[float],
        crop_size: Sequence[int],
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        ignore_index: int = IGNORE,
    ) -> None:
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.mean = tuple(mean)
        self.ignore_index = ignore_index

    def __call__(
        self, img: torch.Tensor, label: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.ratio_range
        ratio = float(rng.random()) * (hi - lo) + lo
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(*img.shape[-2:], scale)
        img, label = resize_image(img, size), resize_label(label, size)
        y1, y2, x1, x2 = random_crop_box(label.numpy(), self.crop_size, self.cat_max_ratio, rng, self.ignore_index)
        img, label = img[:, y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            img, label = img.flip(-1), label.flip(-1)
        if self.photometric:
            img = photometric_distortion(img, rng)
        return pad_to(img, label, self.crop_size, self.mean, self.ignore_index)


class EvalTransform:
    """Resize keeping the ratio into ``scale``, then up to a multiple of ``size_divisor`` (ResizeToMultiple)."""

    def __init__(self, scale: Sequence[int], size_divisor: int = 32) -> None:
        self.scale = tuple(scale)
        self.size_divisor = size_divisor

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = rescale_size(*img.shape[-2:], self.scale)
        d = self.size_divisor
        h, w = math.ceil(h / d) * d, math.ceil(w / d) * d
        return resize_image(img, (h, w))
