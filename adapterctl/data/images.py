"""Reading images for every dataset and for ``predict``: RGB on the 0-255 scale, 16-bit images scaled (not
clipped), unreadable files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adapterctl.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# Single-channel modes wider than 8 bits. Pillow's convert("RGB") clips these to 0-255 instead of scaling them
# (a 16-bit image turns almost all white), so load_image scales them itself. 16-bit RGB(A) PNGs need no such
# care: Pillow opens them as 8-bit RGB(A), keeping the high byte of each sample.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_rgb(arr: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A 16-bit (or 16-bit-valued 32-bit) grey image -> (H, W, 3) uint8, value * 255 / 65535 rounded."""
    if mode == "F":
        # floats have no agreed range (0-1, 0-255 and HDR radiance all occur): guessing would silently skew inputs
        raise DataError(
            f"{path}: floating-point image (mode F) has no defined 0-255 scale; save it as 8- or 16-bit instead"
        )
    values = arr.astype(np.int64)
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    if lo < 0 or hi > 65535:
        # mode I is how Pillow may open a 16-bit PNG; other values mean another scale that we cannot know
        raise DataError(
            f"{path}: 32-bit integer image (mode {mode}) has values {lo}..{hi}, outside the 16-bit range 0..65535"
        )
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # integer round-half-up of value * 255 / 65535
    return np.repeat(grey[..., None], 3, axis=2)


def load_image(path: Path) -> torch.Tensor:
    """RGB (3, H, W) float32 on the 0-255 scale; 16-bit images are scaled down, float images refused."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im) if mode in _WIDE_MODES else np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    if mode in _WIDE_MODES:
        arr = _wide_to_rgb(arr, mode, path)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
