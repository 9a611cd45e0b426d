"""Multi-scale deformable attention in pure PyTorch.

Zhu et al., "Deformable DETR", ICLR 2021, §4.1; the parameterisation (``deform_ratio``) follows the
ViT-Adapter code. Numerically the same as the compiled CUDA op: bilinear ``grid_sample`` with zero padding and
``align_corners=False``, one softmax over levels x points, offsets normalised by each level's (W, H).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

SpatialShapes = Sequence[tuple[int, int]]


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level at its locations and sum with the attention weights.

    value: (N, Len_in, M, D); sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], (x, y);
    attention_weights: (N, Lq, M, L, P). Returns (N, Lq, M * D).
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    # Accumulating level by level keeps the temporaries at one level's size (the stacked form of the
    # reference implementation allocates L x P x D x Lq at once and spends its time in page faults).
    out: Tensor | None = None
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        # N, H*W, M, D -> N*M, D, H, W
        value_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        start += h * w
        # N, Lq, M, P, 2 -> N*M, Lq, P, 2
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, n_points, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # N*M, D, Lq, P  x  N*M, 1, Lq, P  ->  N*M, D, Lq
        weights_l = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, lq, n_points)
        # multiply-and-sum rather than einsum: einsum's backward becomes Lq-batched (1 x P) bmm, 10x slower
        term = (sampled * weights_l).sum(-1)
        out = term if out is None else out + term
    assert out is not None, "spatial_shapes is empty"
    # N*M, D, Lq -> N, Lq, M*D
    return out.view(n, m, d, lq).permute(0, 3, 1, 2).reshape(n, lq, m * d)


PAD_LO, PAD_HI = 1, 2  # zero rows/columns before and after each level map (positions -1 .. H + 1)


def _padded_layout(spatial_shapes: SpatialShapes) -> tuple[list[int], int]:
    """Start of each level in the concatenated zero-padded maps, (H + 3) x (W + 3) each (positions -1 .. H + 1,
    -1 .. W + 1), and their total length."""
    starts, start = [], 0
    for h, w in spatial_shapes:
        starts.append(start)
        start += (h + PAD_LO + PAD_HI) * (w + PAD_LO + PAD_HI)
    return starts, start


def _pad_value(value: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
    """(N, Len_in, M, D) -> the (N * padded length * M, D) rows of the zero-padded level maps: every corner of a
    (clamped) sampling location reads a row, the ones outside a map read zeros (``padding_mode="zeros"``)."""
    n, _, m, d = value.shape
    pad_starts, pad_len = _padded_layout(spatial_shapes)
    padded = value.new_zeros(n, pad_len, m, d)
    start = 0
    for (h, w), pad_start in zip(spatial_shapes, pad_starts, strict=True):
        hp, wp = h + PAD_LO + PAD_HI, w + PAD_LO + PAD_HI
        grid = padded[:, pad_start : pad_start + hp * wp].view(n, hp, wp, m, d)
        grid[:, PAD_LO : PAD_LO + h, PAD_LO : PAD_LO + w] = value[:, start : start + h * w].view(n, h, w, m, d)
        start += h * w
    return padded.view(n * pad_len * m, d)


def _bilinear_corners(spatial_shapes: SpatialShapes, sampling_locations: Tensor, n: int, m: int):
    """Per (batch, query, head, level, point): where its 4 bilinear corners sit in :func:`_pad_value`'s rows.

    Pixel coordinates follow ``align_corners=False`` (``loc * size - 0.5``), clamped to [-1, size]: a location
    further out has all 4 corners in the zero padding either way, and a clamped one keeps them there (weight on
    the far corner 0). Returns ``keys`` (N, Lq, M, L, P) int32, the top-left corner's row (row
    ``(b * padded length + padded position) * M + head``), ``corner_offsets`` (L, 4) int32 to add for the 4
    corners ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1), the fractions ``fx``, ``fy`` and ``inside_x``,
    ``inside_y``: where the clamp left the coordinate as it was (elsewhere its gradient is 0).
    """
    device, dtype = sampling_locations.device, sampling_locations.dtype
    n_levels = len(spatial_shapes)
    pad_starts, pad_len = _padded_layout(spatial_shapes)
    if n * m * pad_len >= 2**31:
        raise ValueError(f"value has {n * m * pad_len} padded rows: too many for int32 gather indices")
    i32 = torch.int32
    # x and y together (few whole-tensor ops: each costs ~20-50 us at these sizes, whatever its work)
    sizes = torch.tensor([(w, h) for h, w in spatial_shapes], device=device, dtype=i32).view(n_levels, 1, 2)
    xy = sampling_locations * sizes.to(dtype) - 0.5
    xyc = torch.minimum(xy, sizes.to(dtype)).clamp_(min=-1)
    xy0f = xyc.floor()
    frac = xyc - xy0f
    # NaN locations (a diverged run) must still index inside the buffer: clamp the integers as well
    xy0 = torch.minimum(xy0f.to(i32), sizes).clamp_(min=-1)
    row_len = sizes[..., 0] + (PAD_LO + PAD_HI)  # (L, 1)
    # row of the padded position (PAD_LO, PAD_LO) of each (batch, head, level), i.e. of map position (0, 0)
    base = pad_len * torch.arange(n, device=device, dtype=i32).view(n, 1, 1, 1, 1) + torch.tensor(
        pad_starts, device=device, dtype=i32
    ).view(1, 1, 1, n_levels, 1)
    base = (base + PAD_LO * row_len.view(1, 1, 1, n_levels, 1) + PAD_LO) * m
    base = base + torch.arange(m, device=device, dtype=i32).view(1, 1, m, 1, 1)
    keys = torch.addcmul(xy0[..., 0], xy0[..., 1], row_len).mul_(m).add_(base)
    inside = xy == xyc
    one = torch.ones_like(row_len)
    corner_offsets = m * torch.cat([torch.zeros_like(row_len), one, row_len, row_len + 1], -1)  # (L, 4)
    return keys, corner_offsets, frac[..., 0], frac[..., 1], inside[..., 0], inside[..., 1]


def _corner_rows(keys: Tensor, corner_offsets: Tensor) -> Tensor:
    """The 4 corner rows of every sample, (N, Lq, M, L, P, 4) int32."""
    n_levels = corner_offsets.shape[0]
    return keys[..., None] + corner_offsets.view(1, 1, 1, n_levels, 1, 4)


def _corner_weights(fx: Tensor, fy: Tensor, attention_weights: Tensor) -> Tensor:
    """Bilinear x attention weight of each corner, (N, Lq, M, L, P, 4) (corners outside a map read zeros)."""
    top, bottom = (1 - fy) * attention_weights, fy * attention_weights
    gx = 1 - fx
    if torch.is_grad_enabled() and (top.requires_grad or fx.requires_grad):  # autograd through plain ops
        return torch.stack([top * gx, top * fx, bottom * gx, bottom * fx], -1)
    out = fx.new_empty(*fx.shape, 4)  # written corner by corner: broadcast products over a dim of 2 run 5x slower
    torch.mul(top, gx, out=out[..., 0])
    torch.mul(top, fx, out=out[..., 1])
    torch.mul(bottom, gx, out=out[..., 2])
    torch.mul(bottom, fx, out=out[..., 3])
    return out


def _corner_dots(grad: Tensor, value_rows: Tensor, rows: Tensor, n_bags: int, k: int) -> Tensor:
    """Per corner sample j of bag b = j // k: the dot of value row ``rows[j]`` with ``grad[b]`` (B * k,).

    On CPU as a sampled matmul on the CSR pattern of the gather (``sampled_addmm``, 2.5x faster than
    ``embedding_bag``'s per-sample-weights backward, which calls BLAS once per sample, and 6x faster in bf16):
    float32/64 as they are, half types upcast to float32 (the dots come back in float32). Elsewhere the latter.
    """
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        if grad.dtype not in (torch.float32, torch.float64):  # sampled_addmm has no half kernels on CPU
            grad, value_rows = grad.float(), value_rows.float()
        crow = torch.arange(0, n_bags * k + 1, k, dtype=rows.dtype, device=rows.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, rows, grad.new_zeros(n_bags * k), (n_bags, value_rows.shape[0]), check_invariants=False
            )
            return torch.sparse.sampled_addmm(pattern, grad, value_rows.t(), beta=0.0).values()
    idx = rows.long()
    offsets = torch.arange(0, n_bags * k, k, device=rows.device)
    offset2bag = torch.arange(n_bags, device=rows.device).repeat_interleave(k)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, value_rows, idx, offsets, offset2bag, 0)


def _transposed_gather(grad: Tensor, weights: Tensor, keys: Tensor, spatial_shapes: SpatialShapes, n: int, m: int):
    """The value gradient of the gather: every value row sums ``weight x grad[bag]`` over the corner samples
    that read it. (N, Len_in, M, D).

    Sorting all 4 corners of every sample would sort 4x more than needed: a sample's corners sit at fixed
    offsets from its top-left corner on the padded maps of :func:`_padded_layout`. So the samples are sorted
    once by top-left key, each corner's sums are one ``embedding_bag`` over the output gradients (one bag per
    padded position), and each level's gradient is the 4 corner grids added with their shifts (the padding
    drops out).
    """
    n_bags, d = grad.shape
    flat = keys.view(-1)
    n_samples = flat.numel()
    per_bag = n_samples // n_bags
    pad_starts, pad_len = _padded_layout(spatial_shapes)
    n_keys = n * pad_len * m
    order = torch.sort(flat).indices
    counts = torch.bincount(flat, minlength=n_keys)
    offsets = torch.zeros(n_keys, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    bags = torch.div(order, per_bag, rounding_mode="floor")
    # one embedding_bag for the 4 corners: corner c's bags follow corner c - 1's
    corner_weights = weights.view(n_samples, 4).t().index_select(1, order).view(-1)  # (4, samples) rows
    corner_offsets = (offsets + n_samples * torch.arange(4, device=flat.device).view(4, 1)).view(-1)
    grids = F.embedding_bag(bags.repeat(4), grad, corner_offsets, mode="sum", per_sample_weights=corner_weights)
    grids = grids.view(4, n, pad_len, m, d)
    grad_value = grad.new_empty(n, sum(h * w for h, w in spatial_shapes), m, d)
    start = 0
    for (h, w), pad_start in zip(spatial_shapes, pad_starts, strict=True):
        hp, wp = h + PAD_LO + PAD_HI, w + PAD_LO + PAD_HI
        g00, g01, g10, g11 = grids[:, :, pad_start : pad_start + hp * wp].view(4, n, hp, wp, m, d)
        level = grad_value[:, start : start + h * w].view(n, h, w, m, d)
        start += h * w
        # position p is corner (dy, dx) of the sample whose top-left is p - (dy, dx)
        y, x = slice(PAD_LO, PAD_LO + h), slice(PAD_LO, PAD_LO + w)
        ym, xm = slice(PAD_LO - 1, PAD_LO - 1 + h), slice(PAD_LO - 1, PAD_LO - 1 + w)
        torch.add(g00[:, y, x], g01[:, y, xm], out=level)
        level += g10[:, ym, x]
        level += g11[:, ym, xm]
    return grad_value


def _softmax_rows(x: Tensor) -> Tensor:
    """Softmax over the last dim, computed in float32 (float64 as it is) and returned in ``x``'s dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = (xf - xf.amax(-1, keepdim=True)).exp_()
    return y.div_(y.sum(-1, keepdim=True)).to(x.dtype)


class _ShortSoftmax(torch.autograd.Function):
    """:func:`_softmax_rows` with the softmax gradient ``y * (g - sum(g * y))``."""

    @staticmethod
    def forward(ctx, x):
        y = _softmax_rows(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, torch.float32)
        yf, gf = y.to(dtype), grad.to(dtype)
        return (yf * (gf - (gf * yf).sum(-1, keepdim=True))).to(grad.dtype)


def short_softmax(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` for a short last dim (the L x P attention weights of each head): torch's CPU kernel
    vectorises along that dim and takes 5x longer on 4-12 entries than these few whole-tensor ops. Same
    values (float32 math, as torch's kernel for half types); exported graphs get ``softmax`` itself."""
    if _exporting() or x.device.type != "cpu":
        return x.softmax(-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ShortSoftmax.apply(x)
    return _softmax_rows(x)


class _GatherSample(torch.autograd.Function):
    """The gather form with its own backward: the fused ``embedding_bag`` forward over the zero-padded value,
    and a backward that needs no scatter-add. The value gradient is the transposed gather
    (:func:`_transposed_gather`: samples sorted once, then ``embedding_bag`` over the output gradients; torch's
    own ``embedding_bag`` backward accumulates row by row, 5x slower). The corner-weight gradients are the
    per-sample dot products, chained through the bilinear weights by hand (``floor`` has zero gradient, as in
    ``grid_sample``)."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, spatial_shapes):
        n, len_in, m, d = value.shape
        lq, k = sampling_locations.shape[1], _rows_per_bag(sampling_locations)
        out, (value_rows, keys, rows, fx, fy, inside_x, inside_y, weights) = _gather(
            value, spatial_shapes, sampling_locations, attention_weights
        )
        ctx.save_for_backward(value_rows, keys, rows, fx, fy, inside_x, inside_y, attention_weights, weights)
        ctx.shapes = (n, len_in, m, d, lq, k)
        ctx.spatial_shapes = spatial_shapes
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable: say so, never return wrong
    def backward(ctx, grad_out):
        value_rows, keys, rows, fx, fy, inside_x, inside_y, attn, weights = ctx.saved_tensors
        n, len_in, m, d, lq, k = ctx.shapes
        n_bags = n * lq * m
        grad = grad_out.reshape(n_bags, d).to(value_rows.dtype).contiguous()
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[0]:
            grad_value = _transposed_gather(grad, weights, keys, ctx.spatial_shapes, n, m)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # padding rows are zeros: corners outside a map give 0 here without a mask
            grad_w = _corner_dots(grad, value_rows, rows.view(-1), n_bags, k)
            u0, u1, u2, u3 = grad_w.view(rows.shape).to(fx.dtype).unbind(-1)
            gx, gy = 1 - fx, 1 - fy
            if ctx.needs_input_grad[2]:  # sum over corners of dot x bilinear weight, factored by rows
                top = torch.addcmul(u0 * gx, u1, fx)
                grad_attn = torch.addcmul(top.mul_(gy), torch.addcmul(u2 * gx, u3, fx), fy)
            if ctx.needs_input_grad[1]:
                sizes = torch.tensor(ctx.spatial_shapes, dtype=fx.dtype, device=fx.device)  # (L, 2): H, W
                grad_x = torch.addcmul((u1 - u0).mul_(gy), u3 - u2, fy).mul_(attn).mul_(sizes[:, None, 1])
                grad_y = torch.addcmul((u2 - u0).mul_(gx), u3 - u1, fx).mul_(attn).mul_(sizes[:, None, 0])
                grad_loc = torch.stack([grad_x.mul_(inside_x), grad_y.mul_(inside_y)], -1)
        return grad_value, grad_loc, grad_attn, None


def ms_deform_attn_core_gather(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The same sampling as :func:`ms_deform_attn_core`, as one weighted gather-sum (``embedding_bag``).

    Each query reads, per head, level and point, the 4 bilinear corners of its location from the value maps
    padded with zeros (``padding_mode="zeros"``; locations clamped to the padding); the corner weights
    (bilinear x attention) and row indices feed one fused ``embedding_bag``. No per-level value copy beyond the
    padding and no (Lq, P, D) temporary: 3-4x faster than ``grid_sample`` on CPU in the forward, with the same
    gradients. Under autograd it runs as :class:`_GatherSample` (its own backward), while tracing or exporting
    as plain differentiable ops.
    """
    needs_grad = torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    )
    if needs_grad and not _exporting():
        return _GatherSample.apply(value, sampling_locations, attention_weights, spatial_shapes)
    # plain ops (autograd through them while exporting: the clamp already has zero gradient outside the maps)
    return _gather(value, spatial_shapes, sampling_locations, attention_weights)[0]


def _rows_per_bag(sampling_locations: Tensor) -> int:
    """Corner samples each (batch, query, head) sums: levels x points x 4."""
    return sampling_locations.shape[3] * sampling_locations.shape[4] * 4


def _gather(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor):
    """The gather forward: (N, Lq, M * D) and what its backward needs (padded value rows, top-left keys, corner
    rows, fractions, clamp masks, corner weights)."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    keys, corner_offsets, fx, fy, inside_x, inside_y = _bilinear_corners(spatial_shapes, sampling_locations, n, m)
    rows = _corner_rows(keys, corner_offsets)
    weights = _corner_weights(fx, fy, attention_weights).to(value.dtype)
    value_rows = _pad_value(value, spatial_shapes)  # one row per (batch, padded position, head)
    k = _rows_per_bag(sampling_locations)
    out = F.embedding_bag(
        rows.view(n * lq * m, k), value_rows, mode="sum", per_sample_weights=weights.view(n * lq * m, k)
    )
    # rows were (N, Lq, M): already in output order
    return out.view(n, lq, m * d), (value_rows, keys, rows, fx, fy, inside_x, inside_y, weights)


def ms_deform_attn_core_reference(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The official pure-PyTorch core (``ms_deform_attn_core_pytorch``): every level sampled, stacked, then
    weighted and summed in one go. Kept as the baseline of ``adapterctl bench``; slower than both forms above."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_core_triton(value, spatial_shapes, sampling_locations, attention_weights):
    """The Triton kernels (:mod:`adapterctl.layers.msda_triton`; CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    from adapterctl.layers.msda_triton import ms_deform_attn_core_triton as core

    return core(value, spatial_shapes, sampling_locations, attention_weights)


CORE_IMPLS = {
    "gather": ms_deform_attn_core_gather,
    "grid_sample": ms_deform_attn_core,
    "reference": ms_deform_attn_core_reference,
    "triton": ms_deform_attn_core_triton,
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or no working backend
        return False
    return True


def auto_impl(device_type: str, grad: bool) -> str:
    """What ``impl="auto"`` runs: the Triton kernels on CUDA (when Triton imports; not while exporting), else the
    gather form, with or without autograd (its own backward is 2-2.5x faster than ``grid_sample``'s)."""
    if device_type == "cuda" and triton_available() and not _exporting():
        return "triton"
    return "gather"


def _exporting() -> bool:
    """Tracing, exporting or compiling: the graph gets the pure-PyTorch core, never the Triton kernels."""
    checks = (
        torch.jit.is_tracing,
        getattr(torch.compiler, "is_exporting", lambda: False),
        getattr(torch.compiler, "is_compiling", lambda: False),
        getattr(torch.onnx, "is_in_onnx_export", lambda: False),
    )
    return any(check() for check in checks)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with ViT-Adapter's value/output ratio.

    Args:
        d_model: query and output channels.
        n_levels: number of value levels.
        n_heads: attention heads; each owns a contiguous slice of the value channels.
        n_points: sampling points per head and level.
        ratio: value/output projection width as a fraction of ``d_model``.
        impl: ``"auto"`` (default: ``"triton"`` on CUDA, ``"gather"`` on CPU; :func:`auto_impl`), ``"triton"``
            (the Triton kernels), ``"gather"`` (one fused weighted gather with its own backward: the fastest on
            CPU), ``"grid_sample"`` (level by level through ``grid_sample``) or ``"reference"`` (the official
            stacked form, for comparison). All compute the same function.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        ratio: float = 1.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in (*CORE_IMPLS, "auto"):
            raise ValueError(f"impl must be 'auto' or one of {sorted(CORE_IMPLS)}, got {impl!r}")
        self.impl = impl
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"int(d_model * ratio) = {value_dim} must be divisible by n_heads = {n_heads}")
        head_dim = value_dim // n_heads
        if head_dim & (head_dim - 1):
            warnings.warn(
                f"MSDeformAttn head dim {head_dim} is not a power of 2; harmless here (the CUDA kernel of the "
                "original implementation is merely less efficient)",
                stacklevel=2,
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.ratio = ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offsets weights, points fanned out on 8 compass directions."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
    ) -> Tensor:
        """query: (N, Lq, C); reference_points: (N or 1, Lq, 1 or L, 2) normalised (x, y);
        input_flatten: (N, sum H_l*W_l, C) with levels concatenated in ``spatial_shapes`` order."""
        n, lq, _ = query.shape
        len_in = input_flatten.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} spatial shapes, got {len(spatial_shapes)}")
        expected = sum(h * w for h, w in spatial_shapes)
        if expected != len_in:
            raise ValueError(f"spatial shapes {list(spatial_shapes)} cover {expected} tokens, value has {len_in}")
        value = self.value_proj(input_flatten).view(n, len_in, self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = short_softmax(weights).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # (W_l, H_l) per level, the normaliser of the offsets
        normalizer = query.new_tensor([[w, h] for h, w in spatial_shapes])
        # ref + offsets / normalizer in one op (the same division and sum)
        locations = torch.addcdiv(
            reference_points[:, :, None, :, None, :], offsets, normalizer[None, None, None, :, None, :]
        )
        impl = self.impl
        if impl == "auto":
            impl = auto_impl(value.device.type, torch.is_grad_enabled())
        out = CORE_IMPLS[impl](value, spatial_shapes, locations, weights)
        return self.output_proj(out)
