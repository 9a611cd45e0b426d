"""The Triton MSDA kernels, run on CPU by Triton's interpreter, against the pure-PyTorch reference core."""

from __future__ import annotations

import os

import pytest
import torch

from adapterctl.layers.ms_deform_attn import (
    MSDeformAttn,
    auto_impl,
    ms_deform_attn_core_reference,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (it comes with torch)")


@pytest.fixture(scope="module")
def triton_core():
    """The kernels under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 before any import)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1: these checks run the kernels on CPU tensors")
    from adapterctl.layers.msda_triton import ms_deform_attn_core_triton

    return ms_deform_attn_core_triton


def _inputs(n, lq, m, d, shapes, points, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels, len_in = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(n, len_in, m, d, dtype=dtype, generator=g).requires_grad_(True)
    # locations beyond [0, 1] exercise the zero padding
    loc = (torch.rand(n, lq, m, levels, points, 2, dtype=dtype, generator=g) * 1.4 - 0.2).requires_grad_(True)
    attn = torch.rand(n, lq, m, levels, points, dtype=dtype, generator=g).softmax(-1).requires_grad_(True)
    return value, loc, attn


@pytest.mark.parametrize("d", [8, 6])  # 6: a head width that is not a power of two (masked channels)
def test_forward_and_backward_equal_the_reference(triton_core, d):
    shapes = [(6, 5), (3, 3), (2, 1)]
    value, loc, attn = _inputs(2, 7, 2, d, shapes, 3, torch.float32)
    out = triton_core(value, shapes, loc, attn)
    ref = ms_deform_attn_core_reference(value, shapes, loc, attn)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (value, loc, attn), grad)
    want = torch.autograd.grad(ref, (value, loc, attn), grad)
    for a, b, what in zip(ours, want, ("value", "locations", "weights"), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=what)


def test_gradcheck_in_float64(triton_core):
    shapes = [(3, 2), (1, 2)]
    value, loc, attn = _inputs(1, 1, 1, 2, shapes, 1, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda v, p, a: triton_core(v, shapes, p, a), (value, loc, attn))


def test_the_module_gives_the_same_with_the_triton_core(triton_core):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, ratio=0.5, impl="grid_sample")
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.2)
    shapes = [(4, 4), (2, 2)]
    query = torch.randn(1, 5, 16)
    ref = torch.rand(1, 5, 2, 2)
    feats = torch.randn(1, 20, 16)
    want = attn(query, ref, feats, shapes)
    attn.impl = "triton"
    torch.testing.assert_close(attn(query, ref, feats, shapes), want, atol=2e-6, rtol=1e-5)


def test_auto_picks_triton_on_cuda_only():
    assert auto_impl("cuda", grad=True) == "triton" and auto_impl("cuda", grad=False) == "triton"
    assert auto_impl("cpu", grad=True) == "gather" and auto_impl("cpu", grad=False) == "gather"
