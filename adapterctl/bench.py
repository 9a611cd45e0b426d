"""``adapterctl bench``: ViT-Adapter against its plain timm ViT, measured in the same run."""

from __future__ import annotations

import copy
import json
import mmap
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

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


def kernel_counters() -> tuple[int, float] | None:
    """This process's minor page faults and system CPU seconds so far (``getrusage``), or None where the OS has
    no such counters. A pass that faults in fresh memory (glibc mmaps every block above its threshold, at most
    32 MiB, and unmaps it on free, so each new large tensor is zero-filled by the kernel page by page) pays
    that time in the kernel, not in any op's arithmetic: the part of "allocator behaviour" a profile hides."""
    if sys.platform == "win32":
        return None
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _outputs(out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return out if isinstance(out, list | tuple) else [out]


def _passes(model: nn.Module, x: torch.Tensor, dtype: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The forward (eval, no grad) and forward+backward (train, loss = sum of output means) passes timed."""
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast:
            model(x)

    def forward_backward() -> None:
        model.train()
        with autocast:
            loss = sum(o.float().mean() for o in _outputs(model(x)))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def time_model(model: nn.Module, x: torch.Tensor, runs: int, warmup: int, dtype: str) -> tuple[float, float]:
    """Median forward (eval, no grad) and forward+backward (train, loss = sum of output means) seconds."""
    return time_models_interleaved([model], x, runs, warmup, dtype)[0]


def time_models_interleaved(
    models: list[nn.Module],
    x: torch.Tensor,
    runs: int,
    warmup: int,
    dtype: str,
    kernel: list[dict[str, float]] | None = None,
) -> list[tuple[float, float]]:
    """:func:`time_model` for several models with their runs interleaved (run i of every model before run i + 1
    of any): a machine's drift (another process, frequency, the allocator) then weighs on all of them alike, which
    is what makes their ratios trustworthy. Medians per model. ``kernel``, when given, receives per model the
    median minor page faults and system CPU seconds of a timed forward+backward (:func:`kernel_counters`; left
    empty where the OS has none)."""
    passes = [_passes(m, x, dtype) for m in models]
    fwd: list[list[float]] = [[] for _ in models]
    fwd_bwd: list[list[float]] = [[] for _ in models]
    faults: list[list[float]] = [[] for _ in models]
    sys_s: list[list[float]] = [[] for _ in models]
    for i in range(warmup + runs):
        for j, (forward, forward_backward) in enumerate(passes):
            for fn, store in ((forward, fwd[j]), (forward_backward, fwd_bwd[j])):
                before = kernel_counters() if fn is forward_backward and i >= warmup else None
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    store.append(time.perf_counter() - t0)
                    if before is not None:
                        after = kernel_counters()
                        faults[j].append(after[0] - before[0])
                        sys_s[j].append(after[1] - before[1])
    if kernel is not None and all(faults):
        kernel.extend(
            {
                "page_faults": statistics.median(f),
                "fault_mib": statistics.median(f) * mmap.PAGESIZE / 2**20,
                "sys_s": statistics.median(s),
            }
            for f, s in zip(faults, sys_s, strict=True)
        )
    return [(statistics.median(f), statistics.median(fb)) for f, fb in zip(fwd, fwd_bwd, strict=True)]


COMPONENTS = ("spatial prior module", "injectors", "ViT blocks", "extractors", "output maps")


def _capture_component_calls(adapter: nn.Module, x: torch.Tensor, autocast) -> dict[str, list]:
    """One training-mode forward of a :class:`~adapterctl.models.vit_adapter.ViTAdapter` recording each
    component's calls (the bound method and detached copies of its arguments, with the real ``requires_grad``)."""
    calls: dict[str, list] = {name: [] for name in COMPONENTS}
    patched = []

    def copy_arg(a):
        if torch.is_tensor(a):
            return a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, list | tuple):
            return type(a)(copy_arg(v) for v in a)
        return a

    def capture(name: str, obj, attr: str) -> None:
        original = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            calls[name].append((original, copy_arg(args), {k: copy_arg(v) for k, v in kwargs.items()}))
            return original(*args, **kwargs)

        setattr(obj, attr, wrapper)
        patched.append((obj, attr))

    capture("spatial prior module", adapter.spm, "forward")
    capture("ViT blocks", adapter.trunk, "run_blocks")
    for layer in adapter.interactions:
        capture("injectors", layer.injector, "forward")
        for extractor in [layer.extractor, *(layer.extra_extractors or [])]:
            capture("extractors", extractor, "forward")
    capture("output maps", adapter, "_output_maps")
    try:
        adapter.train()
        with autocast:
            adapter(x)
    finally:
        for obj, attr in patched:
            delattr(obj, attr)  # the class's method again
    return calls


def component_times(
    adapter: nn.Module, x: torch.Tensor, runs: int, warmup: int, dtype: str
) -> dict[str, tuple[float, float]]:
    """Median forward and forward+backward seconds of each ViT-Adapter component (:data:`COMPONENTS`), replayed
    on the inputs it received in a real forward: every call of that component in one timed run (4 injectors, the
    ViT's block groups, 4 + 2 extractors). The backward starts from the mean of the outputs, as ``time_model``."""
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    calls = _capture_component_calls(adapter, x, autocast)
    out = {}
    for name, group in calls.items():

        def forward(group=group) -> None:
            with torch.no_grad(), autocast:
                for fn, args, kwargs in group:
                    fn(*args, **kwargs)

        def forward_backward(group=group) -> None:
            for fn, args, kwargs in group:
                with autocast:
                    res = fn(*args, **kwargs)
                outs = [t for t in _flat(res) if torch.is_tensor(t) and t.requires_grad]
                sum(o.float().mean() for o in outs).backward()
            adapter.zero_grad(set_to_none=True)

        adapter.eval()
        fwd = _median_time(forward, runs, warmup)
        adapter.train()
        out[name] = (fwd, _median_time(forward_backward, runs, warmup))
    return out


def _flat(res) -> list:
    if isinstance(res, list | tuple):
        return [t for r in res for t in _flat(r)]
    return [res]


def run_bench(
    size: str = "t",
    input_size: int = 512,
    runs: int = 5,
    warmup: int = 2,
    threads: int = 0,
    dtype: str = "float32",
    components: bool = True,
) -> dict[str, float]:
    """Print and return forward / forward+backward times, their ratio to the plain ViT, GFLOP/s, the activation
    memory autograd keeps, and (``components``) the adapter's time by component."""
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
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    kernel: list[dict[str, float]] = []
    times = time_models_interleaved([m for _, m in models], x, runs, warmup, dtype, kernel=kernel)
    rows, saved = [], []
    for (name, model), (fwd, fwd_bwd) in zip(models, times, strict=True):
        rows.append((name, count_gflops(model, input_size), fwd, fwd_bwd))
        saved.append(saved_activation_bytes(model.train(), x, autocast) / 2**20)
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
        "plain_activations_mib": saved[0],
        "adapter_activations_mib": saved[1],
    }
    for who, counters in zip(("plain", "adapter", "reference"), kernel, strict=False):
        results[f"{who}_forward_backward_page_faults"] = counters["page_faults"]
        results[f"{who}_forward_backward_fault_mib"] = counters["fault_mib"]
        results[f"{who}_forward_backward_sys_s"] = counters["sys_s"]
    table = Table(
        title=f"{input_size}x{input_size}, batch 1, {torch.get_num_threads()} threads, {dtype}, median of {runs} "
        "interleaved runs"
    )
    cols = ("model", "GFLOPs (fwd)", "forward s", "fwd+bwd s", "fwd GFLOP/s", "fwd+bwd GFLOP/s", "activations MiB")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for (name, g, f, fb), mib in zip(rows, saved, strict=True):
        table.add_row(name, f"{g:.1f}", f"{f:.3f}", f"{fb:.3f}", f"{g / f:.0f}", f"{3 * g / fb:.0f}", f"{mib:.0f}")
    table.add_section()
    table.add_row(
        "ratio adapter / plain", f"{ag / pg:.2f}", f"{af / pf:.2f}", f"{afb / pfb:.2f}", "", "",
        f"{saved[1] / saved[0]:.2f}",
    )  # fmt: skip
    table.add_row("ratio official core / plain", "", f"{rf / pf:.2f}", f"{rfb / pfb:.2f}", "", "", "")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(
        "fwd+bwd GFLOP/s counts backward as 2x forward; grid_sample FLOPs are not counted. activations: what "
        "autograd keeps for backward in one forward."
    )
    if kernel:
        console.print(
            "in the kernel per fwd+bwd (median minor page faults, system CPU s; fresh large tensors are zero-filled "
            "page by page): "
            + "; ".join(
                f"{name} {c['page_faults']:.0f} ({c['fault_mib']:.0f} MiB), {c['sys_s']:.2f} s"
                for (name, _), c in zip(models, kernel, strict=True)
            )
        )
    if components:
        parts = component_times(adapter, x, runs, warmup, dtype)
        table = Table(title=f"ViT-Adapter-{size.upper()} by component (each replayed on its recorded inputs)")
        for col in ("component", "forward s", "share", "fwd+bwd s", "share"):
            table.add_column(col, justify="left" if col == "component" else "right")
        rest = (af - sum(f for f, _ in parts.values()), afb - sum(fb for _, fb in parts.values()))
        for name, (f, fb) in [*parts.items(), ("rest (patch embedding, level embeddings, glue)", rest)]:
            table.add_row(name, f"{f:.3f}", f"{100 * f / af:.0f}%", f"{fb:.3f}", f"{100 * fb / afb:.0f}%")
            key = name.split(" (")[0].replace(" ", "_").lower()
            results[f"{key}_forward_s"], results[f"{key}_forward_backward_s"] = f, fb
        table.add_section()
        table.add_row("whole adapter (above)", f"{af:.3f}", "100%", f"{afb:.3f}", "100%")
        console.print(table)
        adapter_only = af - parts["ViT blocks"][0], afb - parts["ViT blocks"][1]
        console.print(
            f"the adapter's own work (all but the ViT blocks): {adapter_only[0]:.3f} s forward, "
            f"{adapter_only[1]:.3f} s fwd+bwd; the plain ViT: {pf:.3f} / {pfb:.3f} s"
        )
    return results


def run_bench_dtypes(size: str = "t", dtypes: tuple[str, ...] = ("float32", "bfloat16"), **kwargs) -> dict:
    """:func:`run_bench` once per dtype, then the ratios side by side: adapter / plain ViT per dtype and mode,
    against the issue's goal (the FLOP ratio at 90% of the ViT's throughput), and what bf16 gains over fp32."""
    from rich.console import Console
    from rich.table import Table

    from adapterctl.engine.precision import cpu_has_fast_bf16

    console = Console(width=max(Console().width, 120))
    if "bfloat16" in dtypes and not cpu_has_fast_bf16():
        console.print("note: this CPU has no fast bf16 (AVX512-BF16 / AMX): bf16 runs emulated, ~100x slower")
    results = {dtype: run_bench(size=size, dtype=dtype, **kwargs) for dtype in dtypes}
    first = results[dtypes[0]]
    goal = first["adapter_gflops"] / first["plain_gflops"] / 0.9
    table = Table(title=f"ViT-Adapter-{size.upper()} / plain ViT by dtype (goal: FLOP ratio / 0.9 = {goal:.2f}x)")
    for col in ("dtype", "forward ratio", "fwd+bwd ratio", "adapter fwd / fwd+bwd s", "plain fwd / fwd+bwd s"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, r in results.items():
        table.add_row(
            dtype,
            f"{r['forward_ratio']:.2f}x",
            f"{r['forward_backward_ratio']:.2f}x",
            f"{r['adapter_forward_s']:.3f} / {r['adapter_forward_backward_s']:.3f}",
            f"{r['plain_forward_s']:.3f} / {r['plain_forward_backward_s']:.3f}",
        )
    console.print(table)
    if "float32" in results and "bfloat16" in results:
        fp, bf = results["float32"], results["bfloat16"]
        gains = {
            who: (
                fp[f"{who}_forward_s"] / bf[f"{who}_forward_s"],
                fp[f"{who}_forward_backward_s"] / bf[f"{who}_forward_backward_s"],
            )
            for who in ("adapter", "plain")
        }
        console.print(
            f"bf16 over fp32: ViT-Adapter {gains['adapter'][0]:.2f}x forward, {gains['adapter'][1]:.2f}x fwd+bwd; "
            f"plain ViT {gains['plain'][0]:.2f}x / {gains['plain'][1]:.2f}x"
        )
        results["bf16_speedup"] = {
            f"{who}_{mode}": g[i] for who, g in gains.items() for i, mode in enumerate(("forward", "forward_backward"))
        }
    results["goal_ratio"] = goal
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


def run_bench_train_step(
    experiment: str,
    overrides: list[str] | None = None,
    steps: int = 6,
    warmup: int = 2,
    threads: int = 0,
    out_dir: str | None = None,
) -> dict[str, float]:
    """A training iteration of ``experiment`` (+ ``overrides``) two ways, in one run: (1) the real loop
    (``run_train`` for ``warmup + steps`` iterations logging every one, the median of its own per-iteration times
    after the warmup: logging, loss read-back, the progress bar, DataLoader workers all included; logging every
    iteration costs it a little more than a real run's interval) and (2) the same model, optimizer and loader
    timed part by part (data wait, forward with the loss, backward, optimizer step). The loop's step over the sum
    of the parts is the loop's overhead; the data wait's share says whether loading keeps up. Peak memory: the
    process's peak resident set (CPU) or the CUDA allocator's peak."""
    import resource
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from adapterctl.config import compose
    from adapterctl.config_schema import check_config
    from adapterctl.data.loader import train_loader
    from adapterctl.engine.optim import build_optimizer, build_scheduler
    from adapterctl.engine.precision import autocast_context, resolve_amp
    from adapterctl.engine.tasks import get_task
    from adapterctl.engine.train import run_train
    from adapterctl.models.build import build_model

    if threads:
        torch.set_num_threads(threads)
    overrides = list(overrides or [])
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="adapterctl-bench-") as tmp:
        run = [f"experiment={experiment}", *overrides, f"trainer.max_iters={total}", "trainer.log_interval=1",
               f"trainer.eval_interval={10 * total}", f"trainer.checkpoint_interval={10 * total}",
               "trainer.final_eval=false", f"paths.output_dir={out_dir or tmp + '/run'}"]  # fmt: skip
        cfg = compose("train", run)
        check_config(cfg)
        t = cfg.trainer
        device = torch.device("cuda" if t.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        amp = resolve_amp(str(t.amp), device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        # (1) the real loop first (it also checks the config and the data), logging its it/s per `steps`
        run_train(compose("train", run))

        # (2) the parts, on the run's own model, optimizer and loader
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        task = get_task(cfg)
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg).to(device).train()
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule, total, float(cfg.optim.lr))
        loader = train_loader(task.dataset(train=True), int(t.batch_size), int(t.num_workers), 0, 1, int(cfg.seed),
                              0, collate_fn=task.collate_train)  # fmt: skip
        phases = ("data wait", "forward + loss", "backward", "optimizer")
        samples: dict[str, list[float]] = {p: [] for p in phases}
        data_iter = iter(loader)
        try:
            for i in range(total):
                t0 = time.perf_counter()
                batch = next(data_iter)
                t1 = time.perf_counter()
                with autocast_context(device, amp):
                    out = model(*task.inputs(batch, device))
                loss = sum(v for k, v in out.items() if k.startswith("loss"))
                sync()
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sync()
                t3 = time.perf_counter()
                if cfg.optim.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.optim.grad_clip))
                optimizer.step()
                scheduler.step()
                sync()
                t4 = time.perf_counter()
                if i >= warmup:
                    for p, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        samples[p].append(v)
        finally:
            getattr(data_iter, "_shutdown_workers", lambda: None)()  # workers ignore SIGTERM: stop them here
        del model, optimizer, data_iter

        rows = [
            json.loads(line) for line in (Path(run[-1].split("=", 1)[1]) / "metrics.jsonl").read_text().splitlines()
        ]
    # logged every iteration: each row's it/s is one iteration's wall time through the whole loop
    loop_step = statistics.median([1.0 / r["train/it_per_s"] for r in rows if "train/it_per_s" in r][warmup:])
    med = {p: statistics.median(v) for p, v in samples.items()}
    parts = sum(med.values())
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA allocator)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"
    b = int(cfg.trainer.batch_size)
    table = Table(title=f"training step: {experiment}, batch {b}, {amp}, {int(cfg.trainer.num_workers)} loader "
                        f"workers, median of {steps} after {warmup}")  # fmt: skip
    for col in ("phase", "seconds", "share"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for p in phases:
        table.add_row(p, f"{med[p]:.3f}", f"{100 * med[p] / parts:.1f}%")
    table.add_section()
    table.add_row("sum of the parts", f"{parts:.3f}", "100%")
    table.add_row("the training loop's step", f"{loop_step:.3f}", f"{100 * loop_step / parts:.1f}%")
    Console(width=max(Console().width, 100)).print(table)
    Console().print(f"loop / parts {loop_step / parts:.2f}x; data wait {100 * med['data wait'] / parts:.1f}% of the "
                    f"step; {b / loop_step:.2f} images/s; peak memory {peak}")  # fmt: skip
    return {**{f"{p.replace(' + ', '_').replace(' ', '_')}_s": v for p, v in med.items()}, "parts_s": parts,
            "loop_step_s": loop_step, "loop_over_parts": loop_step / parts, "images_per_s": b / loop_step}  # fmt: skip
