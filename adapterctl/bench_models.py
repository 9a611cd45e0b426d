"""``adapterctl bench --model EXPERIMENT``: whole models (backbone + head) from their experiment configs.

Each model is built from its config with its initial weights (no pretrained file, no dataset is read) and timed
on synthetic inputs in the task's own format at the experiment's input size: inference on one image (the
config's test mode) and a training step (forward, loss, backward) on a batch of ``trainer.batch_size``. Printed
and returned per model: parameters, inference GFLOPs, seconds and images/s for both, and the peak memory of each
phase.
"""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import torch

# COCO's typical image (640 x 480): detection is timed on it resized by the experiment's test scale
DETECTION_REFERENCE_HW = (480, 640)


def input_size(cfg, side: int | None) -> tuple[int, int]:
    """(H, W) an experiment is timed at: ``side`` x ``side`` if given; else segmentation's training crop (the
    paper's input size: 512, 640, 896) and, for detection, a 640 x 480 image resized by the test scale (keep the
    ratio, long side <= scale[0], short side <= scale[1]: 800 x 1067 at COCO's 1333 x 800)."""
    if side:
        return side, side
    if str(cfg.task) == "segmentation":
        h, w = (int(s) for s in cfg.data.train.crop_size)
        return h, w
    long_max, short_max = (int(s) for s in cfg.data.test.scales[0])
    h, w = DETECTION_REFERENCE_HW
    scale = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def synthetic_batch(cfg, batch: int, hw: tuple[int, int], seed: int = 0) -> dict:
    """A training batch as the task's collate makes it (``task.inputs`` turns it into the model's arguments):
    images in 0-255 and random labels (segmentation) or per image 8 boxes with their box-shaped masks (detection;
    HTC++ also gets a random stuff map)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images = torch.rand(batch, 3, h, w, generator=g) * 255
    num_classes = int(cfg.data.num_classes)
    if str(cfg.task) == "segmentation":
        return {"image": images, "label": torch.randint(0, num_classes, (batch, h, w), generator=g)}
    samples = []
    for image in images:
        n = 8
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 16
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g), "masks": masks}
        if cfg.head.get("semantic_labels"):
            target["semantic"] = torch.randint(0, int(cfg.head.semantic_classes), (h, w), generator=g)
        samples.append({"image": image, "target": target})
    return {"samples": samples, "skipped": []}


class PeakMemory:
    """The peak of the tensor memory a block of code allocates (live at once, above what existed on entry): the
    CUDA allocator's peak on CUDA; on CPU the allocation events of torch's profiler (``profile_memory``) summed in
    time order, which the allocator's caching cannot hide (resident-set readings can: freed memory stays
    resident). Run it outside timed runs: the profiler costs time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto's start/stop lines (and a "no GPU" error) go to the C-level stderr
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = max(torch.cuda.max_memory_allocated(self.device) - self._base, 0) / 2**20
            return
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak_mib = peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ logging bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def prepare(experiment: str, overrides: list[str] | None, batch: int | None, device: str = "auto"):
    """``(cfg, task, device, batch)`` of one experiment, with what training would refuse (a batch BatchNorm cannot
    train on, a class list that disagrees with the config) refused here, before anything runs."""
    from adapterctl.config import compose
    from adapterctl.engine.tasks import get_task
    from adapterctl.errors import AdapterctlError, ConfigError

    cfg = compose("train", [f"experiment={experiment}", *(overrides or [])])
    task = get_task(cfg)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    b = int(batch or cfg.trainer.batch_size)
    cfg.trainer.batch_size = b
    try:
        task.check(SimpleNamespace(distributed=False, device=dev, world_size=1))
    except AdapterctlError as exc:
        raise ConfigError(f"--model {experiment}: {exc}") from None
    return cfg, task, dev, b


def bench_model(
    experiment: str,
    overrides: list[str] | None = None,
    side: int | None = None,
    batch: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    dtype: str = "float32",
    device: str = "auto",
    prepared: tuple | None = None,
) -> dict:
    """One experiment's model: parameters, inference GFLOPs, inference and training-step seconds, images/s and
    peak memory (see the module docstring). ``prepared``: :func:`prepare`'s result, when already made."""
    from adapterctl.bench import _median_time
    from adapterctl.models.build import build_model
    from adapterctl.models.summary import count_flops

    cfg, task, dev, b = prepared or prepare(experiment, overrides, batch, device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg).to(dev)
    hw = input_size(cfg, side)
    image = (torch.rand(3, *hw, generator=torch.Generator().manual_seed(1)) * 255).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def infer() -> None:
        with torch.no_grad(), autocast:
            if task.name == "segmentation":
                model.predict(image[None])
            else:
                model([image])

    args = task.inputs(synthetic_batch(cfg, b, hw), dev)

    def step() -> None:
        with autocast:
            loss = sum(v for k, v in model(*args).items() if k.startswith("loss"))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    gflops = count_flops(infer, model) / 1e9
    infer_s = _median_time(lambda: (infer(), sync()), runs, warmup)
    with PeakMemory(dev) as infer_mem:
        infer()
    model.train()
    step_s = _median_time(lambda: (step(), sync()), runs, warmup)
    with PeakMemory(dev) as step_mem:
        step()
    params = sum(p.numel() for p in model.parameters())
    return {
        "experiment": experiment, "task": task.name, "head": str(cfg.head.name),
        "input_hw": list(hw), "batch": b, "params_m": params / 1e6, "inference_gflops": gflops,
        "inference_s": infer_s, "inference_images_per_s": 1.0 / infer_s, "inference_peak_mib": infer_mem.peak_mib,
        "train_step_s": step_s, "train_images_per_s": b / step_s, "train_peak_mib": step_mem.peak_mib,
        "device": str(dev),
    }  # fmt: skip


def run_bench_models(
    experiments: list[str],
    overrides: list[str] | None = None,
    side: int | None = None,
    batch: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    threads: int = 0,
    dtype: str = "float32",
) -> dict:
    """:func:`bench_model` for each experiment, one table."""
    from rich.console import Console
    from rich.table import Table

    if threads:
        torch.set_num_threads(threads)
    prepared = [prepare(e, overrides, batch) for e in experiments]  # every config checked before any is timed
    rows = [
        bench_model(e, overrides, side, batch, runs, warmup, dtype, prepared=p)
        for e, p in zip(experiments, prepared, strict=True)
    ]
    table = Table(title=f"whole models, {dtype}, {torch.get_num_threads()} threads, median of {runs}")
    cols = ("experiment", "input", "params M", "GFLOPs", "infer s", "img/s", "peak MiB", "batch", "train step s",
            "img/s", "peak MiB")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "experiment" else "right", overflow="fold")
    for r in rows:
        h, w = r["input_hw"]
        table.add_row(
            r["experiment"], f"{h}x{w}", f"{r['params_m']:.1f}", f"{r['inference_gflops']:.0f}",
            f"{r['inference_s']:.3f}", f"{r['inference_images_per_s']:.2f}", f"{r['inference_peak_mib']:.0f}",
            str(r["batch"]), f"{r['train_step_s']:.3f}", f"{r['train_images_per_s']:.2f}",
            f"{r['train_peak_mib']:.0f}",
        )  # fmt: skip
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print(
        "inference: one image in the config's test mode (no grad); train step: forward, loss and backward on a "
        "synthetic batch (no optimizer step); GFLOPs: torch.utils.flop_counter over inference (RoI ops, NMS and "
        "the deformable sampling are not counted); peak MiB: the tensor memory the phase allocates, live at once "
        "(beyond the weights and inputs)."
    )
    return {"models": rows}
