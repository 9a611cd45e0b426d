"""``adapterctl train``: one readable iteration loop with explicit DDP, the same for every task.

loss_dict = model(images, targets) -> sum of the ``loss_*`` terms -> backward (autocast) -> clip -> step.
Logging, evaluation and checkpoints happen at their periods; rank-0-only work sits behind ``dist.is_main``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adapterctl.engine import checkpoint as ckpt
from adapterctl.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from adapterctl.engine.precision import autocast_context, resolve_amp
from adapterctl.errors import CheckpointError, OutputError, Preempted, TrainingError, os_reason

log = logging.getLogger(__name__)


def _resume_path(cfg: DictConfig, out_dir: Path) -> Path | None:
    resume = cfg.get("resume")
    if resume in (None, False, "false", "null"):
        return None
    if resume in (True, "true"):
        path = ckpt.latest_checkpoint(out_dir / "checkpoints")
        if path is None:
            raise TrainingError(f"resume=true but {out_dir / 'checkpoints'} holds no checkpoint")
        return path
    return Path(str(resume))


class _Stop:
    """SIGTERM/SIGINT (preemption): finish the current step, checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _log_line(step: int, max_iters: int, losses: dict[str, float], lr: float, speed: float) -> str:
    # deep-supervision terms (``loss_cls.d0`` ...) are in ``loss`` and in metrics.jsonl, not on the console line
    parts = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if "." not in k)
    eta = (max_iters - step) / speed if speed > 0 else float("inf")
    return f"iter {step}/{max_iters} {parts} lr={lr:.3e} {speed:.2f} it/s eta {eta / 60:.1f} min"


def run_train(cfg: DictConfig) -> dict:
    """Train per ``cfg`` (composed with its run directory fixed); returns the last evaluation metrics.

    Raises:
        Preempted: SIGTERM/SIGINT stopped the run after it checkpointed (``resume=true`` continues it).
        TrainingError, ConfigError, DataError, OutputError: one-line reasons, found before training where they can be.
    """
    from rich.console import Console

    from adapterctl.config import save_config
    from adapterctl.config_schema import check_config
    from adapterctl.data.loader import train_loader
    from adapterctl.engine.evaluators import write_metrics
    from adapterctl.engine.optim import build_optimizer, build_scheduler
    from adapterctl.engine.precision import checkpoint_precision, runnable_precision
    from adapterctl.engine.tasks import get_task, headline
    from adapterctl.files import clean_partial_writes, ensure_dir
    from adapterctl.models.build import build_model
    from adapterctl.models.pretrained import load_pretrained

    check_config(cfg)  # types and ranges, before anything is built or written
    cfg.task = str(cfg.task)  # derived from the head; a plain value in the run's config and checkpoints
    task_impl = get_task(cfg)
    t = cfg.trainer
    dist = init_distributed(str(t.device))
    # every rank composed its own timestamp: rank 0's run directory wins
    cfg.paths.output_dir = broadcast_object(cfg.paths.output_dir, dist)
    console = Console(stderr=False, highlight=False)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    finished = False
    try:
        resume_from = _resume_path(cfg, out_dir)
        if resume_from is None:
            _refuse_existing_run(out_dir)
        state = ckpt.load_training_checkpoint(resume_from) if resume_from is not None else None
        # the precision is decided once, from the hardware (or, resuming, the checkpoint), by rank 0 for all
        if state is not None and t.amp == "auto":  # resuming: the precision the run trained in, where it can run
            amp, note = runnable_precision(checkpoint_precision(state["config"]), dist.device)
            if note and dist.is_main:
                console.print(f"note: {note}")
        else:
            amp = resolve_amp(str(t.amp), dist.device)
        amp = broadcast_object(amp, dist)
        t.amp = amp  # recorded in config.yaml and every checkpoint
        task_impl.check(dist)
        torch.manual_seed(int(cfg.seed) + dist.rank)

        model = build_model(cfg)
        if state is None and cfg.model.get("pretrained"):  # initial weights: a fresh run's only file input
            for report in load_pretrained(model, str(cfg.model.pretrained)):
                if dist.is_main:
                    console.print(str(report), soft_wrap=True, markup=False)
        if cfg.get("load_from") and state is None:  # another run's weights start this one (two-stage recipes)
            found = ckpt.initialise_from(model, str(cfg.load_from))
            if dist.is_main:
                console.print(f"initialised from {cfg.load_from}", markup=False)
                for what, keys in found.items():
                    if keys:
                        console.print(f"  {what} ({len(keys)}): {', '.join(keys[:8])}", soft_wrap=True, markup=False)
        elif cfg.get("load_from") and dist.is_main:
            console.print(f"note: resuming, so load_from={cfg.load_from} is not used", markup=False)
        model.to(dist.device)
        if dist.distributed and dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist.distributed and dist.is_main:
            # DDP refuses SyncBatchNorm on CPU modules: each process normalises with its own batch statistics
            console.print("note: CPU DDP keeps per-process BatchNorm statistics (SyncBatchNorm needs GPUs)")
        optimizer = build_optimizer(model, cfg.optim)
        max_iters = int(t.max_iters)
        scheduler = build_scheduler(optimizer, cfg.schedule, max_iters, float(cfg.optim.lr))
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        start = 0
        if state is not None:
            ckpt.load_weights(model, state["model"], resume_from)
            try:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{resume_from}: its optimizer state does not fit this run ({exc})") from None
            start = int(state["step"])

        ddp = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
            )
            if dist.distributed
            else model
        )
        # both splits open now: a broken validation split shows at start, not after hours of training
        train_set, val_set = task_impl.dataset(train=True), task_impl.dataset(train=False)
        loader = train_loader(
            train_set,
            int(t.batch_size),
            int(t.num_workers),
            dist.rank,
            dist.world_size,
            int(cfg.seed),
            start,
            collate_fn=task_impl.collate_train,
        )

        # everything is validated: only now is the run directory written to
        writer = jsonl = None
        if dist.is_main:
            ensure_dir(ckpt_dir)
            for partial in clean_partial_writes(ckpt_dir):
                console.print(f"removed a partial checkpoint write: {partial.name}")
            for partial in clean_partial_writes(out_dir):
                console.print(f"removed a partial write: {partial.name}")
            if resume_from is None:
                for kept in _set_aside_previous_attempt(out_dir):
                    console.print(f"an earlier attempt without checkpoints left {kept.name} (kept)")
            save_config(cfg, out_dir)
            if resume_from is not None:
                console.print(f"resumed from {resume_from} at iteration {start}")
                _drop_rows_after(out_dir / "metrics.jsonl", start)
            writer = _tensorboard(out_dir)
            jsonl = _open_append(out_dir / "metrics.jsonl")
        grad_clip = cfg.optim.get("grad_clip")
        log_every, eval_every = int(t.log_interval), int(t.eval_interval)
        ckpt_every, keep = int(t.checkpoint_interval), int(t.get("keep_checkpoints", 2))
        metrics: dict = {}
        skipped: set[str] = set()
        last_good = resume_from

        def save(step: int) -> Path | None:
            _average_buffers(model, dist)
            bad = ckpt.non_finite_tensors(model.state_dict(), optimizer.state_dict()["state"])
            if bad:  # the loss can still be finite at the step that blew the weights up
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise TrainingError(
                    f"at iteration {step}, {len(bad)} weight or optimizer tensors are NaN or inf (first: {bad[0]}), "
                    f"so no checkpoint is written; lower optim.lr or set optim.grad_clip; {where}"
                )
            rng_all = _gather_rng(dist)
            if not dist.is_main:
                return None
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "precision": amp,
                # unresolved: data paths follow ${paths.datasets} / data.root wherever the checkpoint goes
                "config": OmegaConf.to_container(cfg, resolve=False),
                "rng": rng_all,
            }
            path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(ckpt_dir, step))
            ckpt.prune_checkpoints(ckpt_dir, keep)
            return path

        def run_eval(step: int) -> dict:
            _average_buffers(model, dist)
            res = task_impl.evaluate(
                model, val_set, dist.device, amp, int(t.num_workers), dist.rank, dist.world_size, out_dir=out_dir
            )
            if dist.is_main:
                write_metrics({"step": step, "precision": amp, **res}, out_dir / "metrics.json")
                _write_row(jsonl, writer, step, {f"val/{k}": res.get(k) for k in task_impl.headline})
                console.print(f"iter {step}: {headline(res, task_impl.headline)}")
            return res

        model.train()
        window = _LossWindow()
        logged: list[list[float]] = []  # rows read back since the last log line
        tic = time.perf_counter()
        step = start
        data_iter = iter(loader)  # draws from the global RNG: restore the checkpoint's state after it
        if state is not None and (rng := state.get("rng", {}).get(f"rank{dist.rank}")) is not None:
            ckpt.set_rng_state(rng)
        state = None  # the resumed tensors live in the model and optimizer now
        progress = _progress(console, dist.is_main)
        task = progress.add_task("train", total=max_iters, completed=start, loss=float("nan"), lr=0.0)
        with _Stop() as stop, progress:
            while step < max_iters:
                batch = next(data_iter)
                skipped.update(batch["skipped"])
                with autocast_context(dist.device, amp):
                    out = ddp(*task_impl.inputs(batch, dist.device))
                losses = {k: v for k, v in out.items() if k.startswith("loss")}
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                # the terms stay on the device: no host synchronisation per step (read back below)
                window.add(step, {**losses, "loss": loss, **{k: v for k, v in out.items() if not k.startswith("loss")}})
                progress.update(task, completed=step)
                preempted = any_rank(stop.requested, dist)
                log_now = step % log_every == 0 or step == max_iters
                ckpt_now = step % ckpt_every == 0 and step < max_iters
                eval_now = step % eval_every == 0 and step < max_iters
                if log_now or ckpt_now or eval_now or preempted:
                    # one transfer, averaged over ranks; a non-finite loss stops here, before anything is saved
                    logged += window.flush(dist, last_good)
                if log_now and logged:
                    keys = window.keys
                    means = {k: sum(r[i] for r in logged) / len(logged) for i, k in enumerate(keys)}
                    speed = len(logged) / (time.perf_counter() - tic)
                    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                    progress.update(task, loss=logged[-1][keys.index("loss")], lr=lr)
                    if dist.is_main:
                        _write_row(
                            jsonl,
                            writer,
                            step,
                            {**{f"train/{k}": v for k, v in means.items()}, "train/lr": lr, "train/it_per_s": speed},
                        )
                        progress.console.print(_log_line(step, max_iters, means, lr, speed), soft_wrap=True)
                    logged, tic = [], time.perf_counter()
                if ckpt_now or preempted:
                    last_good = save(step) or last_good
                if preempted:  # every rank names rank 0's checkpoint
                    raise Preempted(step, broadcast_object(str(last_good) if last_good else None, dist))
                if eval_now:
                    metrics = run_eval(step)
        window.flush(dist, last_good)
        last_good = save(step) or last_good
        if t.get("final_eval", True):
            metrics = run_eval(step)
        if dist.is_main:
            ckpt_final = ckpt_dir / "final.pt"
            if last_good is not None:  # a new link renamed over the old one: final.pt is never missing
                link = ckpt_dir / f".final.pt.{os.getpid()}.tmp"
                link.unlink(missing_ok=True)
                link.symlink_to(Path(last_good).name)
                os.replace(link, ckpt_final)
            if metrics:
                console.print(task_impl.table(metrics, f"{cfg.experiment_name}: iteration {step}"))
            if skipped:
                console.print(f"[yellow]skipped {len(skipped)} bad sample(s)[/], e.g. {sorted(skipped)[0]}")
            console.print(f"run directory: {out_dir}")
        finished = True
        return metrics
    finally:
        for handle in (locals().get("jsonl"), locals().get("writer")):
            if handle is not None:
                handle.close()
        # the workers ignore SIGTERM (preemption is the main process's), so one left running when the loop fails
        # would block interpreter exit, which joins its children: stop them now (the iterator's own shutdown)
        getattr(locals().get("data_iter"), "_shutdown_workers", lambda: None)()
        if finished:  # a rank leaving on an error must not wait for the others: torchrun stops them when it exits
            barrier()
        cleanup()


class _LossWindow:
    """The loss terms of the iterations since the last read-back, kept on the device. ``flush`` reads them in one
    transfer (averaged over ranks: every rank logs the same numbers) at the log interval, before a checkpoint or an
    evaluation, on preemption and at the end, never per step; it stops training at the first non-finite loss,
    naming that iteration and the last good checkpoint."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.steps: list[int] = []
        self.rows: list[torch.Tensor] = []

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        if not self.keys:
            self.keys = list(terms)
        self.rows.append(torch.stack([terms[k].detach().float().reshape(()) for k in self.keys]))
        self.steps.append(step)

    def flush(self, dist: DistInfo, last_good) -> list[list[float]]:
        if not self.rows:
            return []
        table = torch.stack(self.rows)  # iterations x terms
        if dist.distributed:
            table = all_reduce_sum(table) / dist.world_size
        rows, steps = table.tolist(), self.steps
        self.rows, self.steps = [], []
        for step, row in zip(steps, rows, strict=True):
            if not all(math.isfinite(v) for v in row):
                values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, row, strict=True) if k.startswith("loss"))
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(
                    f"non-finite loss at iteration {step} ({values}); stopping. Lower optim.lr, set "
                    f"optim.grad_clip, or check the data; {where}."
                )
        return rows


def _refuse_existing_run(out_dir: Path) -> None:
    """A new run never writes into another run's directory (it would prune that run's checkpoints and mix both
    runs' metrics). A directory whose earlier attempt wrote no checkpoint (it failed at start) is reused, its
    metrics files kept beside under a ``.previous-<time>`` suffix."""
    if ckpt.list_checkpoints(out_dir / "checkpoints"):
        raise TrainingError(
            f"{out_dir} already holds a run (checkpoints); continue it with resume=true, or give another "
            "paths.output_dir (or leave it null for a new timestamped one)"
        )


def _set_aside_previous_attempt(out_dir: Path) -> list[Path]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in ("metrics.jsonl", "metrics.json"):
        path = out_dir / name
        if path.is_file():
            moved.append(path.rename(path.with_name(f"{name}.previous-{stamp}")))
    return moved


def _drop_rows_after(path: Path, step: int) -> None:
    """Resuming from ``step``: the rows the interrupted run logged after its checkpoint are logged again. A line a
    kill cut short (not JSON) is dropped too."""
    if not path.is_file():
        return
    from adapterctl.files import write_text

    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(ln + "\n" for ln in kept))


def _open_append(path: Path):
    try:
        return path.open("a")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {os_reason(exc)}") from None


def _average_buffers(model: nn.Module, dist: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks, so that every rank
    evaluates, and rank 0 saves, the same model. (DDP only broadcasts buffers at the start of a forward, and
    without SyncBatchNorm each process updates its running statistics from its own batch.)"""
    if not dist.distributed:
        return
    import torch.distributed as tdist

    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
                buf.div_(dist.world_size)


def _gather_rng(dist: DistInfo) -> dict:
    """Every rank's RNG state, keyed ``rank<i>``, gathered on rank 0."""
    state = ckpt.rng_state()
    if not dist.distributed:
        return {"rank0": state}
    import torch.distributed as tdist

    states: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(states, state)
    return {f"rank{i}": s for i, s in enumerate(states)}


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        log.warning("tensorboard unavailable; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _write_row(jsonl, writer, step: int, values: dict[str, float]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
    if jsonl is not None:
        try:
            jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            jsonl.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {jsonl.name}: {os_reason(exc)}") from None
    if writer is not None:
        for k, v in clean.items():
            if v is not None:
                writer.add_scalar(k, v, step)
        writer.flush()


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
