"""The ``adapterctl`` command line: parses, composes the config and calls ``run_*``; no logic of its own.

Heavy modules (torch, timm) are imported inside the commands so that ``adapterctl --help`` stays quick.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="adapterctl",
    help=(
        "ViT-Adapter for dense prediction: build, train, evaluate and export plain-ViT segmentation and "
        "detection models.\n\nConfigs are Hydra configs; overrides are typed as Hydra users type them, e.g. "
        "`adapterctl config model=vit_adapter_s trainer.max_iters=100 +extra.key=1`."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Hydra overrides: group=option, key=value, +new.key=value.", show_default=False),
]


def _fail(message: str, code: int = 2, label: str = "[bold red]error:[/]") -> typer.Exit:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"{label} {message}", soft_wrap=True)
    return typer.Exit(code)


@app.command()
def config(
    overrides: Overrides = None,
    name: Annotated[str, typer.Option("--config", "-c", help="Root config: train, eval or export.")] = "train",
) -> None:
    """Print the composed, resolved YAML of a config (train by default) with the given overrides."""
    from adapterctl.config import ConfigError, compose, to_yaml

    try:
        cfg = compose(name, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    typer.echo(to_yaml(cfg), nl=False)


@app.command()
def models(
    flops: Annotated[bool, typer.Option(help="Count GFLOPs at --size (slower: runs one forward each).")] = True,
    size: Annotated[int, typer.Option(help="Square input size for the GFLOP count.")] = 512,
) -> None:
    """List the model entry points with their total, ViT and adapter parameters and GFLOPs."""
    from rich.console import Console
    from rich.table import Table

    from adapterctl.models.summary import summarize_entry_points

    table = Table(title="Backbone entry points (ViT-Adapter, BEiT-Adapter, DINOv2 / DINOv3 / EVA-02 adapters)")
    for col in ("entry point", "total params", "ViT params", "adapter params"):
        table.add_column(col, justify="right" if col != "entry point" else "left")
    if flops:
        table.add_column(f"GFLOPs @ {size}x{size}", justify="right")
    for row in summarize_entry_points(flops_size=size if flops else None):
        cells = [row.name, f"{row.total:,}", f"{row.vit:,}", f"{row.adapter:,}"]
        if flops:
            cells.append(f"{row.gflops:.1f}")
        table.add_row(*cells)
    Console().print(table)
    if flops:
        Console().print("GFLOPs: forward multiply-adds x2 by torch.utils.flop_counter; grid_sample is not counted.")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Official ViT-Adapter checkpoint (.pth / .pth.tar).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output file (.safetensors).", show_default=False)],
    model: Annotated[
        str, typer.Option(help="Model config (conf/model) the checkpoint was trained with.")
    ] = "vit_adapter_t",
    variant: Annotated[str, typer.Option(help="segmentation or detection (which official copy).")] = "segmentation",
    ema: Annotated[
        bool, typer.Option(help="Convert an mmdet EMAHook checkpoint's ema_* averages instead of its weights.")
    ] = False,
    overrides: Overrides = None,
) -> None:
    """Convert an official ViT-Adapter checkpoint into an adapterctl safetensors file.

    Keys that have no place in the model are listed, never silently dropped.
    """
    from adapterctl.models.convert import run_convert

    typer.echo(
        _run_guarded(lambda: run_convert(src, dst, model=model, variant=variant, overrides=overrides or [], ema=ema))
    )


@app.command()
def bench(
    overrides: Overrides = None,
    size: Annotated[str, typer.Option(help="Backbone size: t, s, b or l.")] = "t",
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input",
            help="Square input side (multiple of 32). Default 512; --model: the experiment's own input size.",
        ),
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed runs (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 2,
    threads: Annotated[int, typer.Option(help="torch threads (0: leave as is).")] = 0,
    dtype: Annotated[
        str, typer.Option(help="float32 or bfloat16 (autocast); backbone benchmark: also both (one run each).")
    ] = "float32",
    ckpt: Annotated[
        Path | None, typer.Option(help="Time this checkpoint's whole model instead (inference; segmentation: a step).")
    ] = None,
    m2f_step: Annotated[
        str | None,
        typer.Option(
            "--m2f-step",
            help="Time a training step of this Mask2Former experiment split into backbone, pixel decoder, "
            "decoder, matching, loss and backward (e.g. synthetic_mask2former_vit_adapter_t_demo).",
        ),
    ] = None,
    freeze: Annotated[
        str | None,
        typer.Option(
            "--freeze",
            help="Compare a training step of this entry point (e.g. dinov2_adapter_s) with its ViT trained, frozen "
            "and frozen in bf16: time, activation memory, trainable parameters.",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers (and the machine) to this JSON file.")
    ] = None,
    components: Annotated[
        bool, typer.Option(help="Backbone benchmark: also time each adapter component on its recorded inputs.")
    ] = True,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Time this experiment's whole model (backbone + head, initial weights, synthetic inputs at the "
            "experiment's input size): inference and a training step, GFLOPs, images/s, peak memory. Repeatable; "
            "key=value overrides apply to each.",
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="--model: the training step's batch (default: trainer.batch_size).")
    ] = None,
    train_step: Annotated[
        str | None,
        typer.Option(
            "--train-step",
            help="Time a training iteration of this experiment (+ key=value overrides, e.g. data.root=...): the "
            "real loop against the sum of its parts (data wait, forward, backward, optimizer), peak memory.",
        ),
    ] = None,
) -> None:
    """Time ViT-Adapter against its plain timm ViT in the same run: forward, forward+backward, ratio, GFLOP/s."""
    from adapterctl.bench import run_bench, run_bench_checkpoint

    def done(kind: str, results: dict) -> None:
        if json_out is None:
            return
        import json
        import platform

        import torch

        from adapterctl.engine.precision import cpu_has_fast_bf16
        from adapterctl.files import write_text

        record = {
            "benchmark": kind, "size": size, "input": input_size or (None if model else 512), "runs": runs,
            "dtype": dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_fast_bf16": cpu_has_fast_bf16(),
            "results": results,
        }  # fmt: skip
        write_text(json_out, json.dumps(record, indent=2, default=float) + "\n")
        typer.echo(f"wrote {json_out}")

    if input_size is not None and input_size % 32:
        raise _fail(f"--input must be a multiple of 32, got {input_size}")
    if dtype not in ("float32", "bfloat16", "both"):
        raise _fail(f"--dtype must be float32, bfloat16 or both, got {dtype!r}")
    others = (train_step, ckpt, freeze, m2f_step, model)
    if dtype == "both" and any(o is not None for o in others):
        raise _fail(
            "--dtype both is for the backbone benchmark; give --model/--train-step/--ckpt/--freeze/--m2f-step one dtype"
        )
    if sum(o is not None for o in others) > 1:
        raise _fail("give one of --model, --train-step, --ckpt, --freeze, --m2f-step")
    if batch is not None and (model is None or batch < 1):
        raise _fail(f"--batch {batch}: a positive training-step batch, with --model")
    if model is not None:
        from adapterctl.bench_models import run_bench_models

        done("models", _run_guarded(lambda: run_bench_models(
            list(model), overrides or [], input_size, batch, runs, warmup, threads, dtype)))  # fmt: skip
        return
    side = input_size or 512
    if train_step is not None:
        from adapterctl.bench import run_bench_train_step

        done("train_step", _run_guarded(
            lambda: run_bench_train_step(train_step, overrides or [], runs, warmup, threads)))  # fmt: skip
        return
    if ckpt is not None:
        done(
            "checkpoint",
            _run_guarded(lambda: run_bench_checkpoint(str(ckpt), side, runs, warmup, threads, dtype, overrides or [])),
        )
        return
    if overrides:
        raise _fail(f"unexpected arguments {overrides}: key=value overrides go with --model, --train-step or --ckpt")
    if freeze is not None:
        from adapterctl.bench import run_bench_freeze

        done("freeze", _run_guarded(lambda: run_bench_freeze(freeze, side, 2, runs, warmup, threads, dtype)))
        return
    if m2f_step is not None:
        from adapterctl.bench import run_bench_mask2former_step

        done("mask2former_step", _run_guarded(
            lambda: run_bench_mask2former_step(m2f_step, None, runs, warmup, threads, dtype)))  # fmt: skip
        return
    if dtype == "both":
        from adapterctl.bench import run_bench_dtypes

        done("backbone", _run_guarded(
            lambda: run_bench_dtypes(size=size, input_size=side, runs=runs, warmup=warmup, threads=threads,
                                     components=components)
        ))  # fmt: skip
        return
    done("backbone", _run_guarded(
        lambda: run_bench(size=size, input_size=side, runs=runs, warmup=warmup, threads=threads, dtype=dtype,
                          components=components)
    ))  # fmt: skip


def _run_guarded(fn, *args):
    """Run a command body; user errors become one line and a non-zero exit, no traceback.

    Exit status: 0 done, 1 failed (data, checkpoint, output, training), 2 bad command line or config,
    75 preempted by SIGTERM/SIGINT after a checkpoint (resume with ``resume=true``), 130 interrupted elsewhere.
    """
    import os

    from adapterctl.errors import AdapterctlError, Preempted, os_reason

    debug = bool(os.environ.get("ADAPTERCTL_DEBUG"))
    hint = "" if debug else "  (ADAPTERCTL_DEBUG=1 shows the traceback)"
    try:
        return fn(*args)
    except Preempted as exc:
        raise _fail(str(exc), code=exc.exit_code, label="[bold yellow]stopped:[/]") from None
    except AdapterctlError as exc:
        if debug:
            raise
        raise _fail(_last_line(exc) + (hint if exc.exit_code == 1 else ""), code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", code=130) from None
    except OSError as exc:  # a read or write the code did not wrap: still one line naming the path
        if debug:
            raise
        message = f"{exc.filename}: {os_reason(exc)}" if exc.filename else _last_line(exc)
        raise _fail(message + hint, code=1) from None
    except ValueError as exc:  # a library's own check on a value the config passed through
        if debug:
            raise
        raise _fail(_last_line(exc) + hint, code=1) from None
    except BaseException:  # a bug: the traceback is shown; data workers (they ignore SIGTERM) must not block the exit
        _stop_children()
        raise


def _stop_children() -> None:
    """Kill this process's multiprocessing children (DataLoader workers) when leaving on an unexpected error:
    interpreter exit would otherwise join workers that a traceback still holds, and SIGTERM does not stop them."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def _last_line(exc: BaseException) -> str:
    """DataLoader workers re-raise with the worker's traceback in the message; keep the error itself."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1].split(": ", 1)[1] if len(lines) > 1 and ": " in lines[-1] else (lines[-1] if lines else repr(exc))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(overrides: Overrides = None) -> None:
    """Train a model: `adapterctl train experiment=... trainer.max_iters=2000`. Works under torchrun (DDP)."""
    from adapterctl.config import compose
    from adapterctl.engine.train import run_train

    def body() -> None:
        cfg = compose("train", overrides or [], run_dir=True)
        run_train(cfg)

    _run_guarded(body)


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_(overrides: Overrides = None) -> None:
    """Evaluate a checkpoint: `adapterctl eval ckpt=PATH [save_predictions=true] [mode=slide|whole|aug]`.

    The model and data come from the config stored in the checkpoint; other overrides are merged into it.
    """
    from adapterctl.engine.evaluate import run_eval

    _run_guarded(run_eval, overrides or [])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export(overrides: Overrides = None) -> None:
    """Export a checkpoint: `adapterctl export ckpt=PATH [format=onnx|torch_export|torchscript]
    [input_size=[512,512]]`, checked against eager PyTorch."""
    from adapterctl.export import run_export

    typer.echo(_run_guarded(run_export, overrides or []))


@app.command()
def predict(
    ckpt: Annotated[
        Path, typer.Argument(help="Training checkpoint (.pt) or converted model (.safetensors).", show_default=False)
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files or folders, then any key=value overrides of the checkpoint's config.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    mode: Annotated[str | None, typer.Option(help="whole, slide or aug (default: the checkpoint's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    score_thr: Annotated[float, typer.Option(help="Detection: keep detections scoring at least this.")] = 0.5,
    amp: Annotated[
        str | None, typer.Option(help="auto, bf16, fp16 or none (default: the precision the checkpoint trained in).")
    ] = None,
) -> None:
    """Run a checkpoint on images. Segmentation: a palette label PNG and a colour overlay per image.
    Detection: a JSON of boxes, scores, class names and RLE masks, and an overlay. Original image size."""
    from adapterctl.predict import run_predict

    # a key=value that is not an existing path is an override (image names may contain "=" too)
    overrides = [a for a in inputs if "=" in a and not Path(a).exists()]
    images = [a for a in inputs if a not in overrides]
    written = _run_guarded(run_predict, ckpt, images, out, mode, device, 0.5, score_thr, amp, overrides)
    typer.echo(f"wrote {len(written)} predictions to {out}")


@app.command()
def experiments(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the reproduction experiments with their hyperparameters and the paper's results."""
    import json

    from adapterctl.experiments import list_experiments

    rows = list_experiments()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Reproduction experiments (conf/experiment)")
    cols = [
        "experiment",
        "model",
        "pretrained",
        "lr",
        "wd",
        "layer decay",
        "iters",
        "batch",
        "crop",
        "dpr",
        "def. heads/ratio",
        "img",
        "paper",
    ]
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["size"],
            r["pretrained"],
            str(r["lr"]),
            str(r["weight_decay"]),
            str(r["layer_decay_rate"]),
            str(r["max_iters"]),
            r["batch"],
            r["crop"],
            str(r["drop_path_rate"]),
            f"{r['deform_num_heads']}/{r['deform_ratio']}",
            str(r["img_size"]),
            r["paper_result"],
        )
    Console(width=max(Console().width, 200)).print(table)


data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    task: Annotated[str, typer.Option(help="seg (ADE20K format) or det (COCO format).")] = "seg",
    n_train: Annotated[int, typer.Option(help="Training images.")] = 160,
    n_val: Annotated[int, typer.Option(help="Validation images.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a small synthetic dataset in a real format (the demo's data)."""
    from adapterctl.data.synthetic import write_det_dataset, write_seg_dataset

    writers = {"seg": write_seg_dataset, "det": write_det_dataset}
    if task not in writers:
        raise _fail(f"--task must be seg or det, got {task!r}")
    path = writers[task](out, n_train=n_train, n_val=n_val, seed=seed)
    typer.echo(f"wrote {n_train} training and {n_val} validation images to {path}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
