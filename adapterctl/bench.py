"""``adapterctl bench``: ViT-Adapter against its plain timm ViT, measured in the same run."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn


def _median_time(fn: Callable[[], None], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _outputs(out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return out if isinstance(out, list | tuple) else [out]


def time_model(model: nn.Module, x: torch.Tensor, runs: int, warmup: int, dtype: str) -> tuple[float, float]:
    """Median forward (eval, no grad) and forward+backward (train, loss = sum of output means) seconds."""
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(x)

    def forward_backward() -> None:
        with autocast:
            loss = sum(o.float().mean() for o in _outputs(model(x)))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = _median_time(forward, runs, warmup)
    model.train()
    fwd_bwd = _median_time(forward_backward, runs, warmup)
    return fwd, fwd_bwd


def run_bench(
    size: str = "t",
    input_size: int = 512,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 0,
    dtype: str = "float32",
) -> dict[str, float]:
    """Print and return forward / forward+backward times, their ratio to the plain ViT, and GFLOP/s."""
    from rich.console import Console
    from rich.table import Table
    from timm.models.vision_transformer import VisionTransformer

    from adapterctl.layers.ms_deform_attn import MSDeformAttn
    from adapterctl.models.summary import count_gflops
    from adapterctl.models.zoo import ENTRY_POINTS, variant_kwargs

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapter = ENTRY_POINTS[f"vit_adapter_{size}"]()
    kw = variant_kwargs(size)
    plain = VisionTransformer(
        img_size=input_size,
        patch_size=16,
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        drop_path_rate=kw["drop_path_rate"],
        init_values=1.0,
    )
    plain.forward = plain.forward_features  # tokens out, like a dense-prediction trunk
    x = torch.randn(1, 3, input_size, input_size)
    # the same network with the official pure-PyTorch sampling core: the baseline of the adapter's own cost
    reference = copy.deepcopy(adapter)
    for m in reference.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = "reference"
    models = (
        ("timm ViT", plain),
        (f"ViT-Adapter-{size.upper()}", adapter),
        (f"ViT-Adapter-{size.upper()}, official core", reference),
    )
    rows = []
    for name, model in models:
        gflops = count_gflops(model, input_size)
        fwd, fwd_bwd = time_model(model, x, runs, warmup, dtype)
        rows.append((name, gflops, fwd, fwd_bwd))
    (_, pg, pf, pfb), (_, ag, af, afb), (_, _, rf, rfb) = rows
    results = {
        "reference_forward_s": rf,
        "reference_forward_backward_s": rfb,
        "plain_forward_s": pf,
        "plain_forward_backward_s": pfb,
        "adapter_forward_s": af,
        "adapter_forward_backward_s": afb,
        "forward_ratio": af / pf,
        "forward_backward_ratio": afb / pfb,
        "adapter_gflops": ag,
        "plain_gflops": pg,
    }
    table = Table(
        title=f"{input_size}x{input_size}, batch 1, {torch.get_num_threads()} threads, {dtype}, median of {runs}"
    )
    for col in ("model", "GFLOPs (fwd)", "forward s", "fwd+bwd s", "fwd GFLOP/s", "fwd+bwd GFLOP/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, g, f, fb in rows:
        table.add_row(name, f"{g:.1f}", f"{f:.3f}", f"{fb:.3f}", f"{g / f:.0f}", f"{3 * g / fb:.0f}")
    table.add_section()
    table.add_row("ratio adapter / plain", f"{ag / pg:.2f}", f"{af / pf:.2f}", f"{afb / pfb:.2f}", "", "")
    table.add_row("ratio official core / plain", "", f"{rf / pf:.2f}", f"{rfb / pfb:.2f}", "", "")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print("fwd+bwd GFLOP/s counts backward as 2x forward; grid_sample FLOPs are not counted.")
    return results


def run_bench_checkpoint(
    ckpt: str,
    input_size: int = 512,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 0,
    dtype: str = "float32",
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """Time a whole model from a checkpoint (``load_model_from_checkpoint``: nothing else is read): inference on one
    ``input_size`` image (the checkpoint's test mode for segmentation) and, for segmentation, a training step's
    forward+backward on a random label map."""
    from rich.console import Console

    from adapterctl.engine.tasks import get_task
    from adapterctl.models.build import load_model_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, cfg, _ = load_model_from_checkpoint(ckpt, overrides or [])
    task = get_task(cfg).name
    image = torch.rand(1, 3, input_size, input_size) * 255
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def infer() -> None:
        with torch.no_grad(), autocast:
            if task == "segmentation":
                model.predict(image)
            else:
                model([image[0]])

    model.eval()
    results = {"forward_s": _median_time(infer, runs, warmup)}
    if task == "segmentation":
        labels = torch.randint(0, int(cfg.data.num_classes), (2, input_size, input_size))
        batch = image.repeat(2, 1, 1, 1)  # BatchNorm in training needs two images

        def step() -> None:
            with autocast:
                loss = sum(v for k, v in model(batch, labels).items() if k.startswith("loss"))
            loss.backward()
            model.zero_grad(set_to_none=True)

        model.train()
        results["train_step_forward_backward_s"] = _median_time(step, runs, warmup)
    line = ", ".join(f"{k} {v:.3f}" for k, v in results.items())
    Console().print(f"{ckpt} ({task}, {input_size}x{input_size}, {dtype}, median of {runs}): {line}")
    return results


def run_bench_mask2former_step(
    experiment: str = "synthetic_mask2former_vit_adapter_t_demo",
    batch: int | None = None,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 0,
    dtype: str = "float32",
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """One training step of a Mask2Former experiment's model split into backbone, pixel decoder, transformer
    decoder, matching (costs + assignment), loss and backward (medians of ``runs``), with the share of each and
    the peak memory (CUDA: allocator peak; CPU: the process's peak resident set)."""
    import resource

    from rich.console import Console
    from rich.table import Table

    from adapterctl.config import compose
    from adapterctl.models.build import build_model
    from adapterctl.models.heads.mask2former_loss import mask2former_losses, to_mask

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = compose("train", [f"experiment={experiment}", *(overrides or [])])
    if cfg.head.name != "mask2former":
        raise ValueError(f"experiment {experiment} has head={cfg.head.name}; this benchmark times Mask2Former")
    model = build_model(cfg).train()
    head = model.decode_head
    b = int(batch or cfg.trainer.batch_size)
    h, w = (int(s) for s in cfg.data.train.crop_size)
    images = torch.rand(b, 3, h, w) * 255
    labels = torch.randint(0, int(cfg.data.num_classes), (b, h, w))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    phases = ("backbone", "pixel decoder", "transformer decoder", "matching", "loss", "backward")
    samples: dict[str, list[float]] = {p: [] for p in phases}

    def step(record: bool) -> None:
        times = {}
        with autocast:
            t0 = time.perf_counter()
            feats = model.backbone(model.normalize(images))
            t1 = time.perf_counter()
            mask_features, memories, _ = head.pixel_decoder([feats[i] for i in head.in_index])
            t2 = time.perf_counter()
            out = head.decode(mask_features, memories)
            t3 = time.perf_counter()
            log: dict = {}
            gl, gm = to_mask(labels, head.ignore_index)
            loss = sum(mask2former_losses(head, out, gl, gm, record=log).values())
            t4 = time.perf_counter()
        loss.backward()
        t5 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        times = {"backbone": t1 - t0, "pixel decoder": t2 - t1, "transformer decoder": t3 - t2,
                 "matching": log["matching_s"], "loss": t4 - t3 - log["matching_s"], "backward": t5 - t4}  # fmt: skip
        if record:
            for k, v in times.items():
                samples[k].append(v)

    for _ in range(warmup):
        step(False)
    for _ in range(runs):
        step(True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    total = sum(med.values())
    if torch.cuda.is_available() and images.is_cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA allocator)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"
    table = Table(title=f"Mask2Former training step: {experiment}, batch {b} x {h}x{w}, {dtype}, median of {runs}")
    for col in ("phase", "seconds", "share"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for k in phases:
        table.add_row(k, f"{med[k]:.3f}", f"{100 * med[k] / total:.1f}%")
    table.add_row("step", f"{total:.3f}", "100%")
    console = Console(width=max(Console().width, 100))
    console.print(table)
    console.print(f"peak memory {peak}; matching = costs + linear_sum_assignment for {head.num_queries} queries x "
                  f"{len(head.transformer_decoder.layers) + 1} predictions x {b} images")  # fmt: skip
    return {**{f"{k.replace(' ', '_')}_s": v for k, v in med.items()}, "step_s": total}


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, autocast) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (a step's activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        outs = _outputs(model(x))
    sum(o.float().mean() for o in outs).backward()
    model.zero_grad(set_to_none=True)
    return total


def run_bench_freeze(
    entry: str = "vit_adapter_t",
    input_size: int = 512,
    batch: int = 2,
    runs: int = 3,
    warmup: int = 1,
    threads: int = 0,
    dtype: str = "float32",
) -> dict[str, float]:
    """A training step (forward + backward) of one backbone entry point with the ViT trainable, frozen, and
    frozen under bf16: seconds, activation memory kept for backward, trainable parameters, in one run."""
    from rich.console import Console
    from rich.table import Table

    from adapterctl.models.summary import entry_points

    if threads:
        torch.set_num_threads(threads)
    entries = entry_points()
    if entry not in entries:
        raise ValueError(f"unknown entry point {entry!r}; choose one of {sorted(entries)}")
    x = torch.randn(batch, 3, input_size, input_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    rows, results = [], {}
    for label, kw in (("ViT trained", {}), ("ViT frozen", {"freeze_vit": True}),
                      ("ViT frozen, bf16", {"freeze_vit": True, "freeze_vit_dtype": "bfloat16"})):  # fmt: skip
        torch.manual_seed(0)
        model = entries[entry](**kw).train()

        def step(model=model) -> None:
            with autocast:
                loss = sum(o.float().mean() for o in _outputs(model(x)))
            loss.backward()
            model.zero_grad(set_to_none=True)

        seconds = _median_time(step, runs, warmup)
        saved = saved_activation_bytes(model, x, autocast) / 2**20
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        rows.append((label, seconds, saved, trainable))
        key = label.replace(", ", "_").replace(" ", "_").lower()
        results.update({f"{key}_s": seconds, f"{key}_saved_mib": saved, f"{key}_trainable_m": trainable})
    table = Table(title=f"{entry} training step, batch {batch} x {input_size}x{input_size}, {dtype}, median of {runs}")
    for col in ("ViT", "step s", "vs trained", "activations MiB", "vs trained", "trainable M"):
        table.add_column(col, justify="left" if col == "ViT" else "right")
    base_s, base_m = rows[0][1], rows[0][2]
    for label, seconds, saved, trainable in rows:
        table.add_row(label, f"{seconds:.3f}", f"{seconds / base_s:.2f}", f"{saved:.0f}", f"{saved / base_m:.2f}",
                      f"{trainable:.2f}")  # fmt: skip
    Console(width=max(Console().width, 110)).print(table)
    Console().print("activations: bytes autograd saves for backward in one forward (saved_tensors_hooks).")
    return results
