"""BEiT / BEiTv2 weights from local files (the released ``.pth`` layouts and timm's), resized to the window the
BEiT-Adapter is built for, as the official loader (``mmcv_custom/checkpoint.py``) resizes them.

The relative-position tables of a 224 pretraining (window 14, table 27x27 + 3 rows) are resampled to the fine-tune
window (40 at 640, 56 at 896) on a geometric grid: the source offsets are placed at ``±(1, 1+q, 1+q+q², ...)`` with
``q`` found by bisection so that the outermost one lands near the target's half-width, then a bicubic spline is
evaluated at the integer target offsets. The three cls rows are kept as they are (the detection copy, which has no
cls token, drops them, as its loader does). The official code calls
``scipy.interpolate.interp2d(kind='cubic')``, which current SciPy no longer has; ``RectBivariateSpline`` with
``kx=ky=3, s=0`` gives the same numbers bit for bit (beit_README.md §4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from adapterctl.errors import CheckpointError
from adapterctl.models.pretrained import LoadReport, read_state_dict

_EXTRA_ROWS = 3  # cls -> token, token -> cls, cls -> cls
# pretraining / classification parts a dense-prediction BEiT does not use
_UNUSED = ("head.", "fc_norm.", "norm.", "lm_head.", "mask_token", "pos_embed")


def _geometric_offsets(src_side: int, dst_side: int) -> list[float]:
    """Source offsets ``[-d_n .. -d_1, 0, d_1 .. d_n]``, ``d_i = 1 + q + ... + q^(i-1)``, with ``q`` in
    [1.01, 1.5] chosen by bisection (to 1e-6) so that ``d_n`` is close to ``dst_side // 2``."""
    half = src_side // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**half) / (1.0 - q) > dst_side // 2:
            hi = q
        else:
            lo = q
    dist, total = [], 1.0
    for i in range(half):
        dist.append(total)
        total += q ** (i + 1)
    return [-d for d in reversed(dist)] + [0.0] + dist


def resize_rel_pos_table(table: Tensor, dst_window: tuple[int, int]) -> Tensor:
    """A ``((2S-1)^2 + 3, heads)`` relative-position table resized to ``dst_window`` (square windows only, as the
    official loader: a non-square window raises NotImplementedError)."""
    from scipy.interpolate import RectBivariateSpline

    if dst_window[0] != dst_window[1]:
        raise NotImplementedError(
            f"the official relative-position resize supports square windows only; got {dst_window[0]}x{dst_window[1]}"
        )
    src_side = int(round((table.shape[0] - _EXTRA_ROWS) ** 0.5))
    dst_side = 2 * int(dst_window[0]) - 1
    if src_side == dst_side:
        return table
    body, extra = table[:-_EXTRA_ROWS], table[-_EXTRA_ROWS:]
    x = _geometric_offsets(src_side, dst_side)
    t = dst_side // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    heads = []
    for h in range(table.shape[1]):
        z = body[:, h].view(src_side, src_side).float().numpy()
        spline = RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)
        heads.append(torch.Tensor(spline(dx, dx)).contiguous().view(-1, 1))
    return torch.cat([torch.cat(heads, dim=-1), extra.float()], dim=0).to(table.dtype)


def load_beit_weights(beit: nn.Module, path: str | Path) -> LoadReport:
    """Load a BEiT / BEiTv2 file (``model`` wrapper or bare; a shared ``rel_pos_bias`` table is copied into every
    block) into a timm ``Beit``, resizing each block's table to its window; unused keys are reported."""
    sd = read_state_dict(path)
    sd = {k[len("encoder.") :] if k.startswith("encoder.") else k: v for k, v in sd.items()}  # BEiTv2 pt files
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    sd.pop("rel_pos_bias.relative_position_index", None)
    target = beit.state_dict()
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for i, block in enumerate(beit.blocks):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        table = sd.pop(key, shared)
        if table is not None and key in target:
            window = tuple(block.attn.window_size)
            try:
                resized = resize_rel_pos_table(table, window)
            except NotImplementedError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            if target[key].shape[0] == resized.shape[0] - _EXTRA_ROWS:  # the detection copy's table: no cls rows
                resized = resized[:-_EXTRA_ROWS]
            out[key] = resized
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue  # structural: the model builds its own for its window
        if key in target and target[key].shape == value.shape:
            out[key] = value
        elif not key.startswith(_UNUSED):
            unexpected.append(key)
    for key, value in out.items():
        if target[key].shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(target[key].shape)}")
    missing = sorted(k for k in target if k not in out and not k.endswith("relative_position_index"))
    beit.load_state_dict(out, strict=False)
    unused = sorted(k for k in sd if k.startswith(_UNUSED))
    return LoadReport(str(path), len(out), missing, unexpected + unused)
