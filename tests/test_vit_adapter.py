"""The backbone against the official implementation's numbers, and its contract."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterctl.layers.attention import WindowedAttention
from adapterctl.models.official import from_official
from adapterctl.models.vit_adapter import ViTAdapter
from adapterctl.models.zoo import ENTRY_POINTS, build_vit_adapter, variant_kwargs


@pytest.mark.parametrize(
    ("variant", "inp", "out"),
    [
        ("segmentation", "input", "outputs"),
        ("segmentation", "input_nonsquare", "outputs_nonsquare"),
        ("detection", "input", "outputs_detection_variant"),
    ],
)
def test_matches_official_fixture(official_tiny, variant, inp, out):
    model = from_official(official_tiny["config"], official_tiny["state_dict"], variant=variant).eval()
    with torch.no_grad():
        ours = model(official_tiny[inp])
    assert len(ours) == 4
    for got, want in zip(ours, official_tiny[out], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fixture_also_matches_with_grad_enabled(official_tiny):
    """Training-time code paths (grid_sample sampling, NCHW stem) compute the same function."""
    model = from_official(official_tiny["config"], official_tiny["state_dict"]).eval()
    ours = model(official_tiny["input_nonsquare"])
    for got, want in zip(ours, official_tiny["outputs_nonsquare"], strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)


def test_official_wrapped_checkpoint_loads(official_tiny):
    """A full mmseg checkpoint: state_dict/meta wrappers, backbone. prefix and head keys."""
    sd = {f"backbone.{k}": v for k, v in official_tiny["state_dict"].items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, 4, 1, 1)
    ckpt = {"meta": {"CLASSES": ("a", "b")}, "state_dict": sd}
    model = from_official(official_tiny["config"], ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(official_tiny["input"])[2], official_tiny["outputs"][2], atol=1e-4, rtol=1e-4)


def test_official_state_dict_with_missing_key_is_an_error(official_tiny):
    sd = dict(official_tiny["state_dict"])
    sd.pop("level_embed")
    with pytest.raises(KeyError, match="level_embed"):
        from_official(official_tiny["config"], sd)


def test_official_keys_of_real_t_map_onto_ours():
    """All 410 keys of the real ViT-Adapter-T checkpoint have a place, with the same shapes."""
    from pathlib import Path

    from adapterctl.models.official import convert_official_backbone

    lines = (Path(__file__).parent / "fixtures" / "official_vit_adapter_t_keys.txt").read_text().splitlines()
    shapes = {}
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert len(shapes) == 410
    with torch.device("meta"):
        model = ENTRY_POINTS["vit_adapter_t"]()
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    conv = convert_official_backbone(fake, model)
    assert conv.unconverted == []
    assert set(conv.state_dict) == set(model.state_dict())


@pytest.mark.parametrize(
    ("name", "adapter", "vit"),
    [
        ("vit_adapter_t", 2_438_192, 5_528_448),
        ("vit_adapter_s", 5_830_160, 21_673_728),
        ("vit_adapter_b", 13_680_608, 85_814_784),
        ("vit_adapter_l", 23_236_800, 303_347_712),
    ],
)
def test_parameter_counts_equal_official_code(name, adapter, vit):
    with torch.device("meta"):
        model = ENTRY_POINTS[name]()
    assert sum(p.numel() for _, p in model.adapter_parameters()) == adapter
    assert sum(p.numel() for _, p in model.vit_parameters()) == vit


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_detection_and_segmentation_share_keys(task):
    with torch.device("meta"):
        model = ENTRY_POINTS["vit_adapter_t"](task=task)
    assert len(model.state_dict()) == 410 + 0  # layer scales renamed, same count
    windowed = [isinstance(b.attn, WindowedAttention) for b in model.vit.blocks]
    if task == "detection":
        assert windowed == [True, True, False] * 4
        assert model.vit_feature_mode == "final"
    else:
        assert not any(windowed)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 96), (128, 64)])
def test_output_shapes_and_feature_info(tiny_kwargs, h, w):
    model = build_vit_adapter(**tiny_kwargs).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    for out, info in zip(outs, model.feature_info, strict=True):
        assert out.shape == (2, info["num_chs"], h // info["reduction"], w // info["reduction"])
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(("h", "w"), [(48, 64), (64, 80), (100, 64)])
def test_size_not_multiple_of_32_is_a_clear_error(tiny_kwargs, h, w):
    model = build_vit_adapter(**tiny_kwargs)
    with pytest.raises(ValueError, match=f"multiples of 32, got {h}x{w}"):
        model(torch.randn(1, 3, h, w))


@pytest.mark.parametrize("with_cp", [False, True])
def test_every_parameter_gets_a_gradient(tiny_kwargs, with_cp):
    torch.manual_seed(0)
    model = build_vit_adapter(**tiny_kwargs, with_cp=with_cp).train()
    loss = sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # at the official init the zero offset/attention weights and gamma = 0 leave some gradients at exactly 0;
    # once those paths are open every parameter must receive a non-zero gradient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.zero_grad()
    sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_spatial_prior_layout_follows_the_cpu_and_changes_no_number(tiny_kwargs, monkeypatch, capability):
    """Training runs the spatial prior module channels-last only where oneDNN's backward is faster (AVX512);
    inference always. Outputs and gradients are those of the NCHW run either way."""
    from adapterctl.models import vit_adapter as va

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    assert va._channels_last_convs(cpu) is (capability == "AVX512")
    with torch.no_grad():
        assert va._channels_last_convs(cpu)
    assert not va._channels_last_convs(torch.device("meta"))
    runs = []
    for layout in (capability, "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda layout=layout: layout)
        torch.manual_seed(0)
        model = build_vit_adapter(**{**tiny_kwargs, "drop_path_rate": 0.0}, init_values=0.1).train()
        outs = model(torch.randn(1, 3, 64, 64))
        cl = outs[0].is_contiguous(memory_format=torch.channels_last) and not outs[0].is_contiguous()
        assert cl is (layout == "AVX512")  # the outputs keep the spatial prior module's layout
        # a fixed random projection: sum(o ** 2) and sum(o) are constant under a training-mode BatchNorm
        probes = torch.randn(sum(o.numel() for o in outs), generator=torch.Generator().manual_seed(1))
        (torch.cat([o.reshape(-1) for o in outs]) * probes).sum().backward()
        runs.append(([o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, g in runs[0][1].items():
        torch.testing.assert_close(g, runs[1][1][name], atol=3e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_kwargs):
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        kwargs = {**tiny_kwargs, "drop_path_rate": 0.0}
        model = build_vit_adapter(**kwargs, init_values=0.1, with_cp=with_cp).train()
        torch.manual_seed(1)
        sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _official_windowed_attention(attn: WindowedAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The official unfold/fold formulation, written out independently."""
    b, n, c = x.shape
    ws = attn.window_size
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    qkv = attn.qkv(x).transpose(1, 2).reshape(b, 3 * c, h, w)
    qkv = F.pad(qkv, [0, wp - w, 0, hp - h], mode="constant")
    qkv = F.unfold(qkv, kernel_size=(ws, ws), stride=(ws, ws))
    n_win = qkv.shape[-1]
    qkv = qkv.reshape(b, 3 * c, ws * ws, n_win).permute(0, 3, 2, 1)
    qkv = qkv.reshape(b, n_win, ws * ws, 3, attn.num_heads, c // attn.num_heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)
    a = ((q @ k.transpose(-2, -1)) * (c // attn.num_heads) ** -0.5).softmax(-1)
    out = (a @ v).permute(0, 2, 4, 3, 1).reshape(b, c * ws * ws, n_win)
    out = F.fold(out, output_size=(hp, wp), kernel_size=(ws, ws), stride=(ws, ws))
    out = out[:, :, :h, :w].reshape(b, c, n).transpose(-1, -2)
    return attn.proj(out)


@pytest.mark.parametrize(("h", "w", "ws"), [(6, 4, 3), (7, 5, 4), (8, 8, 4)])
def test_window_attention_matches_official_unpadded_masking(h, w, ws):
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = WindowedAttention(Attention(32, num_heads=4, qkv_bias=True), window_size=ws).eval()
    x = torch.randn(2, h * w, 32)
    torch.testing.assert_close(attn(x, (h, w)), _official_windowed_attention(attn, x, h, w), atol=1e-5, rtol=1e-5)


def test_window_attention_refuses_attention_it_would_compute_differently():
    from functools import partial

    from timm.models.beit import Attention as BeitAttention
    from timm.models.vision_transformer import Attention

    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    with pytest.raises(TypeError, match="Attention only; got timm.models.beit.Attention"):
        WindowedAttention(BeitAttention(32, num_heads=4, qkv_bias=True, window_size=(4, 4)), window_size=2)
    with pytest.raises(TypeError, match="it has q_norm, k_norm"):
        WindowedAttention(Attention(32, num_heads=4, qk_norm=True, norm_layer=norm), window_size=2)
    with pytest.raises(TypeError, match="it has norm"):
        WindowedAttention(Attention(32, num_heads=4, scale_norm=True, norm_layer=norm), window_size=2)
    WindowedAttention(Attention(32, num_heads=4, qkv_bias=True), window_size=2)  # the plain one is accepted


def test_variants_keep_released_hyperparameters():
    l_kwargs = variant_kwargs("l", "detection")
    assert l_kwargs["interaction_indexes"] == [[0, 5], [6, 11], [12, 17], [18, 23]]
    assert [i for i, on in enumerate(l_kwargs["window_attn"]) if not on] == [5, 11, 17, 23]
    assert variant_kwargs("b")["deform_ratio"] == 0.5 and variant_kwargs("b")["deform_num_heads"] == 12


def test_wraps_any_timm_vit_and_rejects_overlapping_patches(tiny_kwargs):
    import timm

    model = build_vit_adapter(
        vit="vit_small_patch16_224",
        img_size=64,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        conv_inplane=8,
    )
    assert model.embed_dim == 384
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 384, 16, 16)
    dinov2 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28)
    assert ViTAdapter(dinov2, interaction_indexes=[[0, 11]], vit_feature_mode="final").trunk.patch_size == 14
    overlapping = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28)
    overlapping.patch_embed.proj.stride = (7, 7)
    with pytest.raises(ValueError, match="non-overlapping patches"):
        ViTAdapter(overlapping, interaction_indexes=[[0, 11]], vit_feature_mode="final")


def test_per_interaction_mode_needs_four_interactions(tiny_kwargs):
    kwargs = {**tiny_kwargs, "interaction_indexes": [[0, 3]]}
    with pytest.raises(ValueError, match="exactly 4 interactions"):
        build_vit_adapter(**kwargs)
    model = build_vit_adapter(**kwargs, vit_feature_mode="final").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[3].shape == (1, 64, 2, 2)


def test_gflops_count_matches_official_at_512():
    """The official code's ViT-Adapter-T measures 41 GFLOPs forward at 512 with torch.utils.flop_counter."""
    from adapterctl.models.summary import count_gflops

    assert 40.5 < count_gflops(ENTRY_POINTS["vit_adapter_t"](), 512) < 42.0


def test_bench_prints_both_models_and_ratio_and_writes_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from adapterctl.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "--size", "t", "--input", "64", "--runs", "1", "--warmup", "0", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    for needle in ("timm ViT", "ViT-Adapter-T", "ratio"):
        assert needle in result.output
    for needle in ("by component", "spatial prior module", "injectors", "extractors", "activations MiB"):
        assert needle in result.output
    record = json.loads(out.read_text())
    r = record["results"]
    assert record["benchmark"] == "backbone" and record["input"] == 64 and isinstance(record["cpu_fast_bf16"], bool)
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert r["forward_ratio"] == pytest.approx(r["adapter_forward_s"] / r["plain_forward_s"])
    assert r["adapter_activations_mib"] > r["plain_activations_mib"] > 0
    if sys.platform != "win32":  # the kernel's share of each fwd+bwd, per model
        assert "in the kernel per fwd+bwd" in result.output
        for who in ("plain", "adapter", "reference"):
            assert r[f"{who}_forward_backward_page_faults"] >= 0 and r[f"{who}_forward_backward_sys_s"] >= 0
    assert all(
        r[f"{k}_forward_backward_s"] > 0
        for k in ("spatial_prior_module", "injectors", "vit_blocks", "extractors", "output_maps")
    )


@pytest.mark.skipif(sys.platform == "win32", reason="getrusage is POSIX")
def test_kernel_counters_see_a_fresh_large_tensor_faulted_in():
    """64 MiB is above glibc's largest mmap threshold: a fresh tensor that size is mapped anew and every page of it
    faults in when written (at least one fault per 2 MiB, were transparent huge pages on)."""
    from adapterctl.bench import kernel_counters, time_models_interleaved

    before = kernel_counters()
    t = torch.ones(16 * 2**20)
    after = kernel_counters()
    assert t.sum().item() == 16 * 2**20
    assert after[0] - before[0] >= 32 and after[1] >= before[1]
    kernel: list = []
    times = time_models_interleaved([nn.Linear(4, 4), nn.Linear(4, 2)], torch.randn(3, 4), 2, 0, "float32", kernel)
    assert len(times) == len(kernel) == 2
    assert all(k["page_faults"] >= 0 and k["sys_s"] >= 0 and k["fault_mib"] >= 0 for k in kernel)


def test_bench_both_dtypes_prints_the_ratios_side_by_side(tmp_path):
    import json

    from typer.testing import CliRunner

    from adapterctl.cli import app

    out = tmp_path / "both.json"
    args = ["bench", "--size", "t", "--input", "64", "--runs", "1", "--warmup", "0", "--no-components"]
    result = CliRunner().invoke(app, [*args, "--dtype", "both", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "by dtype" in result.output and "bf16 over fp32" in result.output
    record = json.loads(out.read_text())
    r = record["results"]
    assert record["dtype"] == "both"
    for dtype in ("float32", "bfloat16"):
        assert r[dtype]["forward_backward_ratio"] == pytest.approx(
            r[dtype]["adapter_forward_backward_s"] / r[dtype]["plain_forward_backward_s"]
        )
    assert r["goal_ratio"] == pytest.approx(r["float32"]["adapter_gflops"] / r["float32"]["plain_gflops"] / 0.9)
    fp, bf = r["float32"], r["bfloat16"]
    assert r["bf16_speedup"]["adapter_forward"] == pytest.approx(fp["adapter_forward_s"] / bf["adapter_forward_s"])
    bad = CliRunner().invoke(app, [*args, "--dtype", "both", "--ckpt", str(out)])
    assert bad.exit_code == 2 and "--dtype both is for the backbone benchmark" in bad.output
    assert "Traceback" not in bad.output


def test_bench_components_replay_each_call_on_its_recorded_inputs():
    """The breakdown times what the adapter really runs: 1 spatial prior module, 4 injectors, 4 block groups,
    4 + 2 extractors for ViT-Adapter-T, each replayed on copies of its inputs giving its outputs again."""
    from contextlib import nullcontext

    from adapterctl.bench import _capture_component_calls

    torch.manual_seed(0)
    model = ENTRY_POINTS["vit_adapter_t"](drop_path_rate=0.0)
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    hook = model.interactions[3].extra_extractors[1].register_forward_hook(lambda m, a, o: outputs.append(o))
    calls = _capture_component_calls(model, x, nullcontext())
    hook.remove()
    assert {k: len(v) for k, v in calls.items()} == {
        "spatial prior module": 1, "injectors": 4, "ViT blocks": 4, "extractors": 6, "output maps": 1,
    }  # fmt: skip
    assert "forward" not in vars(model.spm) and "run_blocks" not in vars(model.trunk)  # the methods are restored
    fn, args, kwargs = calls["extractors"][-1]
    again = fn(*args, **kwargs)  # with autograd, as recorded (the sampling core differs without it)
    torch.testing.assert_close(again.detach(), outputs[0].detach(), atol=0, rtol=0)
    assert calls["injectors"][1][1][0].requires_grad  # the ViT tokens entering an injector carry gradients


def test_bench_train_step_compares_the_loop_with_its_parts(synth_seg, tmp_path):
    import json

    from typer.testing import CliRunner

    from adapterctl.cli import app

    out = tmp_path / "step.json"
    args = ["bench", "--train-step", "synthetic_upernet_vit_adapter_t_demo", f"data.root={synth_seg}",
            "trainer.batch_size=2", "trainer.num_workers=0", "trainer.amp=none", "trainer.device=cpu",
            "data.train.crop_size=[64,64]", "--runs", "2", "--warmup", "1", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for needle in ("data wait", "forward + loss", "backward", "optimizer", "sum of the parts", "peak memory"):
        assert needle in result.output
    assert "mIoU" not in result.output  # the loop's final evaluation is skipped (trainer.final_eval=false)
    r = json.loads(out.read_text())["results"]
    parts = r["data_wait_s"] + r["forward_loss_s"] + r["backward_s"] + r["optimizer_s"]
    assert r["parts_s"] == pytest.approx(parts) and r["loop_step_s"] > 0 and r["images_per_s"] > 0
    bad = CliRunner().invoke(app, ["bench", "--size", "t", "data.root=/x"])
    assert bad.exit_code == 2 and "--train-step" in bad.output


def test_the_adapter_drives_its_vit_only_through_a_trunk():
    from timm.models.vision_transformer import VisionTransformer

    from adapterctl.models.trunks import TimmViTTrunk, trunk_for

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    vit.eval()
    trunk = trunk_for(vit)
    assert isinstance(trunk, TimmViTTrunk) and (trunk.embed_dim, trunk.depth) == (32, 3)
    x = torch.randn(2, 3, 64, 48)
    tokens, prefix, hw = trunk.embed(x)
    assert hw == (4, 3) and tokens.shape == (2, 12, 32) and prefix is None
    out, kept = trunk.run_blocks(tokens, None, 0, 2, hw, checkpoint=False)
    want = tokens
    for blk in vit.blocks:
        want = blk(want)
    torch.testing.assert_close(out, want)
    assert kept is None
    part, _ = trunk.run_blocks(tokens, None, 1, 1, hw, checkpoint=False)  # one group: block 1 alone
    torch.testing.assert_close(part, vit.blocks[1](tokens))
    with pytest.raises(TypeError, match=r"no trunk drives a torch.nn.modules.linear.Linear; known: .*Eva"):
        trunk_for(torch.nn.Linear(2, 2))  # a family without a trunk is refused by name


@pytest.mark.parametrize("x_cl", [False, True])
@pytest.mark.parametrize("skip_cl", [False, True])
def test_upsample_add_is_the_transposed_convolution_plus_skip_in_every_layout(x_cl, skip_cl):
    """The stride-4 up-projection as matmul (+ pixel shuffle, or straight into the sum for channels-last maps):
    the values and gradients of ``up(x) + skip``, in ``skip``'s layout."""
    from adapterctl.models.vit_adapter import _upsample_2x2_add

    torch.manual_seed(0)
    up = torch.nn.ConvTranspose2d(8, 6, 2, 2).double()
    cl = torch.channels_last
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    skip = torch.randn(2, 6, 6, 10, dtype=torch.float64)
    x = (x.contiguous(memory_format=cl) if x_cl else x).requires_grad_()
    skip = (skip.contiguous(memory_format=cl) if skip_cl else skip).requires_grad_()
    got = _upsample_2x2_add(up, x, skip)
    assert got.is_contiguous(memory_format=cl if skip_cl else torch.contiguous_format)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, skip, up.weight, up.bias), grad)
    want = up(x) + skip
    want_grads = torch.autograd.grad(want, (x, skip, up.weight, up.bias), grad)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
