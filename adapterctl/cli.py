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


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


@app.command()
def config(
    overrides: Overrides = None,
    name: Annotated[
        str, typer.Option("--config", "-c", help="Root config: train, eval or export.")
    ] = "train",
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
    flops: Annotated[
        bool, typer.Option(help="Count GFLOPs at --size (slower: runs one forward each).")
    ] = True,
    size: Annotated[int, typer.Option(help="Square input size for the GFLOP count.")] = 512,
) -> None:
    """List the model entry points with their total, ViT and adapter parameters and GFLOPs."""
    from rich.console import Console
    from rich.table import Table

    from adapterctl.models.summary import summarize_entry_points

    table = Table(title="ViT-Adapter entry points (backbone only)")
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
        Console().print(
            "GFLOPs: forward multiply-adds x2 by torch.utils.flop_counter; grid_sample is not counted."
        )


@app.command()
def convert(
    src: Annotated[
        Path, typer.Argument(help="Official ViT-Adapter checkpoint (.pth / .pth.tar).", show_default=False)
    ],
    dst: Annotated[Path, typer.Argument(help="Output file (.safetensors).", show_default=False)],
    model: Annotated[
        str, typer.Option(help="Model config (conf/model) the checkpoint was trained with.")
    ] = "vit_adapter_t",
    variant: Annotated[
        str, typer.Option(help="segmentation or detection (which official copy).")
    ] = "segmentation",
    overrides: Overrides = None,
) -> None:
    """Convert an official ViT-Adapter checkpoint into an adapterctl safetensors file.

    Keys that have no place in the model are listed, never silently dropped.
    """
    from adapterctl.config import ConfigError
    from adapterctl.models.convert import ConversionError, run_convert

    try:
        report = run_convert(src, dst, model=model, variant=variant, overrides=overrides or [])
    except (ConfigError, ConversionError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(report)


@app.command()
def bench(
    size: Annotated[str, typer.Option(help="Backbone size: t, s, b or l.")] = "t",
    input_size: Annotated[int, typer.Option("--input", help="Square input side (multiple of 32).")] = 512,
    runs: Annotated[int, typer.Option(help="Timed runs (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 2,
    threads: Annotated[int, typer.Option(help="torch threads (0: leave as is).")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (autocast).")] = "float32",
) -> None:
    """Time ViT-Adapter against its plain timm ViT in the same run: forward, forward+backward, ratio, GFLOP/s."""
    from adapterctl.bench import run_bench

    if input_size % 32:
        raise _fail(f"--input must be a multiple of 32, got {input_size}")
    if dtype not in ("float32", "bfloat16"):
        raise _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    run_bench(size=size, input_size=input_size, runs=runs, warmup=warmup, threads=threads, dtype=dtype)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
