"""Multi-scale deformable attention as Triton kernels (forward and backward), for CUDA.

The same function as :func:`adapterctl.layers.ms_deform_attn.ms_deform_attn_core` (bilinear sampling with zero
padding, ``align_corners=False``, weighted sum over levels x points), one program per (batch, query, head) over
the head's channels. The backward recomputes the four corners: the value gradient is scattered with atomic adds,
the location and attention-weight gradients are written per (level, point). ``MSDeformAttn`` selects it on CUDA
when Triton is importable; the pure-PyTorch cores stay the CPU path and the reference. With
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors: that is how the test
suite checks them against the reference and with ``gradcheck`` in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _corner(value_ptr, row_base, x, y, w, h, d, dmask, M: tl.constexpr, D: tl.constexpr):
    valid = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    row = (row_base + (y * w + x).to(tl.int64)) * M * D
    return tl.load(value_ptr + row + d, mask=dmask & valid, other=0.0), row, valid


@triton.jit
def _point(loc_ptr, attn_ptr, shapes_ptr, starts_ptr, n, idx, lvl, LEN_IN, ACC: tl.constexpr):
    """Level ``lvl``'s size and first value row, and point ``idx``'s weight, top-left corner and fractions."""
    h = tl.load(shapes_ptr + 2 * lvl)
    w = tl.load(shapes_ptr + 2 * lvl + 1)
    row_base = n * LEN_IN + tl.load(starts_ptr + lvl).to(tl.int64)
    x = tl.load(loc_ptr + 2 * idx).to(ACC) * w - 0.5
    y = tl.load(loc_ptr + 2 * idx + 1).to(ACC) * h - 0.5
    a = tl.load(attn_ptr + idx).to(ACC)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return h, w, row_base, a, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, LEN_IN, LQ,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # (n * LQ + q) * M + m
    m = pid % M
    n = pid // (M * LQ)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for lvl in tl.static_range(L):
        for pt in tl.static_range(P):
            idx = pid * (L * P) + lvl * P + pt
            h, w, row_base, a, x0, y0, fx, fy = _point(
                loc_ptr, attn_ptr, shapes_ptr, starts_ptr, n, idx, lvl, LEN_IN, ACC
            )
            v00, _, _ = _corner(value_ptr + m * D, row_base, x0, y0, w, h, d, dmask, M, D)
            v01, _, _ = _corner(value_ptr + m * D, row_base, x0 + 1, y0, w, h, d, dmask, M, D)
            v10, _, _ = _corner(value_ptr + m * D, row_base, x0, y0 + 1, w, h, d, dmask, M, D)
            v11, _, _ = _corner(value_ptr + m * D, row_base, x0 + 1, y0 + 1, w, h, d, dmask, M, D)
            sampled = (
                (1 - fx) * (1 - fy) * v00.to(ACC)
                + fx * (1 - fy) * v01.to(ACC)
                + (1 - fx) * fy * v10.to(ACC)
                + fx * fy * v11.to(ACC)
            )
            acc += a * sampled
    tl.store(out_ptr + pid * D + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr,
    grad_attn_ptr, LEN_IN, LQ,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    n = pid // (M * LQ)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    g = tl.load(grad_out_ptr + pid * D + d, mask=dmask, other=0.0).to(ACC)
    vbase = value_ptr + m * D
    gbase = grad_value_ptr + m * D
    for lvl in tl.static_range(L):
        for pt in tl.static_range(P):
            idx = pid * (L * P) + lvl * P + pt
            h, w, row_base, a, x0, y0, fx, fy = _point(
                loc_ptr, attn_ptr, shapes_ptr, starts_ptr, n, idx, lvl, LEN_IN, ACC
            )
            v00, r00, k00 = _corner(vbase, row_base, x0, y0, w, h, d, dmask, M, D)
            v01, r01, k01 = _corner(vbase, row_base, x0 + 1, y0, w, h, d, dmask, M, D)
            v10, r10, k10 = _corner(vbase, row_base, x0, y0 + 1, w, h, d, dmask, M, D)
            v11, r11, k11 = _corner(vbase, row_base, x0 + 1, y0 + 1, w, h, d, dmask, M, D)
            v00 = v00.to(ACC)
            v01 = v01.to(ACC)
            v10 = v10.to(ACC)
            v11 = v11.to(ACC)
            w00 = (1 - fx) * (1 - fy)
            w01 = fx * (1 - fy)
            w10 = (1 - fx) * fy
            w11 = fx * fy
            sampled = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            tl.store(grad_attn_ptr + idx, tl.sum(g * sampled, 0).to(grad_attn_ptr.dtype.element_ty))
            ag = a * g
            tl.atomic_add(gbase + r00 + d, (ag * w00).to(grad_value_ptr.dtype.element_ty), mask=dmask & k00)
            tl.atomic_add(gbase + r01 + d, (ag * w01).to(grad_value_ptr.dtype.element_ty), mask=dmask & k01)
            tl.atomic_add(gbase + r10 + d, (ag * w10).to(grad_value_ptr.dtype.element_ty), mask=dmask & k10)
            tl.atomic_add(gbase + r11 + d, (ag * w11).to(grad_value_ptr.dtype.element_ty), mask=dmask & k11)
            # d sampled / d x = (v01 - v00)(1 - fy) + (v11 - v10) fy, and x = loc_x * w - 0.5
            dx = tl.sum(ag * ((v01 - v00) * (1 - fy) + (v11 - v10) * fy), 0) * w
            dy = tl.sum(ag * ((v10 - v00) * (1 - fx) + (v11 - v01) * fx), 0) * h
            tl.store(grad_loc_ptr + 2 * idx, dx.to(grad_loc_ptr.dtype.element_ty))
            tl.store(grad_loc_ptr + 2 * idx + 1, dy.to(grad_loc_ptr.dtype.element_ty))


def _meta(value: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    shapes = torch.tensor([list(s) for s in spatial_shapes], dtype=torch.int32, device=value.device)
    starts = torch.zeros(len(spatial_shapes), dtype=torch.int32, device=value.device)
    if len(spatial_shapes) > 1:
        starts[1:] = (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1].to(torch.int32)
    return shapes.contiguous(), starts


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights):
        n, len_in, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = sampling_locations.shape
        value = value.contiguous()
        loc = sampling_locations.contiguous()
        attn = attention_weights.contiguous()
        shapes, starts = _meta(value, spatial_shapes)
        out = value.new_empty(n, lq, m, d)
        grid = (n * lq * m,)
        _msda_fwd_kernel[grid](
            value, shapes, starts, loc, attn, out, len_in, lq,
            M=m, D=d, L=n_levels, P=n_points, BLOCK_D=triton.next_power_of_2(d), ACC=_acc(value.dtype),
        )  # fmt: skip
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        n, len_in, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = loc.shape
        acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics in fp32 at least
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        _msda_bwd_kernel[(n * lq * m,)](
            value, shapes, starts, loc, attn, grad_out.contiguous(), grad_value, grad_loc, grad_attn, len_in, lq,
            M=m, D=d, L=n_levels, P=n_points, BLOCK_D=triton.next_power_of_2(d), ACC=_acc(value.dtype),
        )  # fmt: skip
        return grad_value.to(value.dtype), None, grad_loc, grad_attn


def ms_deform_attn_core_triton(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`~adapterctl.layers.ms_deform_attn.ms_deform_attn_core` as Triton kernels (same arguments)."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    return _MSDeformAttnTriton.apply(value, shapes, sampling_locations, attention_weights)
