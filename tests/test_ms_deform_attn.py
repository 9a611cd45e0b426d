"""Multi-scale deformable attention: both sampling forms against a plain reference of the official core."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterctl.layers import ms_deform_attn as msda
from adapterctl.layers.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core,
    ms_deform_attn_core_gather,
    ms_deform_attn_core_reference,
)


def _official_core(value, shapes, locations, weights):
    """ms_deform_attn_core_pytorch as the official repo writes it (stack over levels, then sum)."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    a = weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def _inputs(n=2, lq=30, m=3, d=8, shapes=((6, 5), (3, 4), (2, 2)), points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    len_in = sum(h * w for h, w in shapes)
    value = torch.randn(n, len_in, m, d, generator=g)
    # some locations fall outside [0, 1]: zero padding must apply
    loc = torch.rand(n, lq, m, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    w = torch.rand(n, lq, m, len(shapes), points, generator=g)
    return value, list(shapes), loc, w / w.sum((-1, -2), keepdim=True)


@pytest.mark.parametrize("core", [ms_deform_attn_core, ms_deform_attn_core_gather, ms_deform_attn_core_reference])
def test_cores_match_official_reference(core):
    value, shapes, loc, w = _inputs()
    torch.testing.assert_close(core(value, shapes, loc, w), _official_core(value, shapes, loc, w), atol=1e-5, rtol=1e-5)


def test_gather_gradients_match_grid_sample():
    value, shapes, loc, w = _inputs(seed=1)
    grads = []
    for core in (ms_deform_attn_core, ms_deform_attn_core_gather):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, w)]
        core(ins[0], shapes, ins[1], ins[2]).square().sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gather_backward_is_its_own_and_exact_in_float64():
    """The gather form's hand-written backward (sorted transposed gather, chained corner weights) against
    finite differences, with corners outside the maps, and when only some inputs need gradients."""
    value, shapes, loc, w = _inputs(n=1, lq=7, m=2, d=3, shapes=((4, 3), (2, 2)), points=2, seed=2)
    ins = [t.double().requires_grad_(True) for t in (value, loc, w)]
    out = ms_deform_attn_core_gather(ins[0], shapes, ins[1], ins[2])
    assert type(out.grad_fn).__name__ == "_GatherSampleBackward"
    assert torch.autograd.gradcheck(lambda v, lo, a: ms_deform_attn_core_gather(v, shapes, lo, a), ins)
    only_value = ms_deform_attn_core_gather(ins[0], shapes, loc.double(), w.double())
    (g,) = torch.autograd.grad(only_value.sum(), ins[0])
    (g_ref,) = torch.autograd.grad(ms_deform_attn_core(ins[0], shapes, loc.double(), w.double()).sum(), ins[0])
    torch.testing.assert_close(g, g_ref)
    # second derivatives are refused, never silently wrong
    (g2,) = torch.autograd.grad(ms_deform_attn_core_gather(*ins[:1], shapes, *ins[1:]).sum(), ins[1], create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|twice"):
        g2.sum().backward()


def test_module_impls_agree_and_auto_switches():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, ratio=0.5)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    shapes = [(4, 6), (2, 3)]
    q = torch.randn(2, 10, 32)
    ref = torch.rand(1, 10, 1, 2)
    feat = torch.randn(2, 30, 32)
    outs = {}
    for impl in ("grid_sample", "gather"):
        attn.impl = impl
        outs[impl] = attn(q, ref, feat, shapes)
    torch.testing.assert_close(outs["gather"], outs["grid_sample"], atol=1e-5, rtol=1e-5)
    assert outs["gather"].shape == (2, 10, 32)


def test_bad_spatial_shapes_are_named():
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    with pytest.raises(ValueError, match=r"cover 12 tokens, value has 13"):
        attn(torch.randn(1, 4, 16), torch.rand(1, 4, 1, 2), torch.randn(1, 13, 16), [(3, 4)])


def test_reset_parameters_fans_points_out_like_deformable_detr():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 points along +x, head 1 along +y; point k at distance k + 1
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def test_gather_backward_in_bfloat16_follows_float32():
    """bf16 values (autocast's value_proj output): corner dots upcast to a float32 sampled matmul, value
    gradient in bf16."""
    value, shapes, loc, w = _inputs(seed=3)
    low = [value.bfloat16().requires_grad_(), loc.clone().requires_grad_(), w.bfloat16().requires_grad_()]
    ms_deform_attn_core_gather(low[0], shapes, low[1], low[2]).float().square().sum().backward()
    ref = [t.clone().requires_grad_() for t in (value, loc, w)]
    ms_deform_attn_core(ref[0], shapes, ref[1], ref[2]).square().sum().backward()
    for a, b in zip(low, ref, strict=True):
        assert a.grad.dtype == a.dtype
        assert (a.grad.float() - b.grad).abs().max() <= 2e-2 * b.grad.abs().max()


@pytest.mark.parametrize("shape", [(2, 7, 3, 4), (1, 5, 2, 12), (3, 1)])
def test_short_softmax_is_softmax_with_its_gradient(shape):
    g = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(*shape, generator=g)).double().requires_grad_()
    torch.testing.assert_close(msda.short_softmax(x), x.softmax(-1))
    assert type(msda.short_softmax(x).grad_fn).__name__ == "_ShortSoftmaxBackward"
    assert torch.autograd.gradcheck(msda.short_softmax, (x,))
    # half types: float32 math, one rounding, as torch's own kernel
    xb = x.detach().bfloat16()
    got = msda.short_softmax(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), xb.float().softmax(-1), atol=4e-3, rtol=0)
    with torch.no_grad():  # the no-autograd path computes the same
        torch.testing.assert_close(msda.short_softmax(x), x.softmax(-1))


def test_short_softmax_saved_output_survives_two_backwards():
    x = torch.randn(4, 6, requires_grad=True)
    y = msda.short_softmax(x)
    g = torch.randn(4, 6)
    (a,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (b,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(a, b)
    (want,) = torch.autograd.grad(x.softmax(-1), x, g)
    torch.testing.assert_close(a, want)


def test_transposed_gather_sums_each_corner_into_its_value_row():
    """The value gradient against a dense scatter-add of every corner sample into the padded maps, cropped, on
    several levels with samples on the padding and far outside the maps."""
    value, shapes, loc, w = _inputs(n=2, lq=9, m=2, d=3, shapes=((5, 4), (3, 2), (1, 1)), points=3, seed=5)
    loc = 2 * loc - 0.3  # in [-0.7, 2.1]: some corners on the padding, some samples wholly outside
    n, len_in, m, d = value.shape
    keys, corner_offsets, fx, fy, _, _ = msda._bilinear_corners(shapes, loc, n, m)
    rows = msda._corner_rows(keys, corner_offsets)
    weights = msda._corner_weights(fx, fy, w).double()
    grad = torch.randn(n * loc.shape[1] * m, d, dtype=torch.float64)
    got = msda._transposed_gather(grad, weights, keys, shapes, n, m)
    k = rows.shape[-3] * rows.shape[-2] * 4
    bag = torch.arange(grad.shape[0]).repeat_interleave(k)
    pad_starts, pad_len = msda._padded_layout(shapes)
    dense = torch.zeros(n * pad_len * m, d, dtype=torch.float64)
    dense.index_add_(0, rows.reshape(-1).long(), grad[bag] * weights.reshape(-1, 1)).view(n, pad_len, m, d)
    dense = dense.view(n, pad_len, m, d)
    want = []
    for (h, wd), start in zip(shapes, pad_starts, strict=True):
        grid = dense[:, start : start + (h + 3) * (wd + 3)].view(n, h + 3, wd + 3, m, d)
        want.append(grid[:, 1 : h + 1, 1 : wd + 1].reshape(n, h * wd, m, d))
    torch.testing.assert_close(got, torch.cat(want, 1))
    assert (loc < -0.5).any() and (loc > 1.5).any()


def test_padded_value_reads_zeros_around_each_map():
    value, shapes, _, _ = _inputs(n=2, m=3, d=4, shapes=((3, 2), (1, 4)))
    rows = msda._pad_value(value, shapes)
    pad_starts, pad_len = msda._padded_layout(shapes)
    grids = rows.view(2, pad_len, 3, 4)
    start = 0
    for (h, w), pad_start in zip(shapes, pad_starts, strict=True):
        grid = grids[:, pad_start : pad_start + (h + 3) * (w + 3)].view(2, h + 3, w + 3, 3, 4)
        torch.testing.assert_close(
            grid[:, 1 : h + 1, 1 : w + 1].reshape(2, h * w, 3, 4), value[:, start : start + h * w]
        )
        border = grid.clone()
        border[:, 1 : h + 1, 1 : w + 1] = 0
        assert (border == 0).all()  # the rest is zeros
        start += h * w


def test_gather_handles_nan_and_far_locations_without_indexing_out_of_the_buffer():
    value, shapes, loc, w = _inputs(seed=6)
    loc = loc.clone()
    loc[0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 0, 0, 0] = torch.tensor([-1e6, 1e6])
    out = ms_deform_attn_core_gather(value, shapes, loc, w)
    ref = ms_deform_attn_core(value, shapes, loc, w)
    finite = torch.isfinite(ref).all(-1)
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-5, rtol=1e-5)
    assert out[0, 1].isfinite().all()


def test_plain_gather_ops_have_the_hand_written_gradients(monkeypatch):
    """While exporting/compiling the gather runs as plain differentiable ops: autograd through them (the clamp
    included) gives what _GatherSample's backward gives, with locations in and far outside the maps."""
    value, shapes, loc, w = _inputs(n=1, lq=6, m=2, d=3, shapes=((4, 3), (2, 2)), points=2, seed=7)
    loc = 2 * loc - 0.4
    grads = []
    for exporting in (False, True):
        monkeypatch.setattr(msda, "_exporting", lambda exporting=exporting: exporting)
        ins = [t.double().requires_grad_(True) for t in (value, loc, w)]
        out = ms_deform_attn_core_gather(ins[0], shapes, ins[1], ins[2])
        assert (type(out.grad_fn).__name__ == "_GatherSampleBackward") is not exporting
        out.square().sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
