"""``adapterctl eval``: a checkpoint alone, evaluated on its (or a given) validation split; metrics.json and, when
asked, the predictions in the run directory. The metrics themselves live in ``evaluators.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EVAL_KEYS = ("ckpt", "save_predictions", "mode", "paths", "trainer")


def eval_config(overrides: Sequence[str], config_name: str = "eval", own_keys: Sequence[str] = EVAL_KEYS):
    """Compose ``<config_name>.yaml`` with its own overrides; the rest are merged into the checkpoint's config.

    Returns ``(command_cfg, model, model_cfg, state)``: the model is rebuilt from the checkpoint alone.
    """
    from adapterctl.config import compose
    from adapterctl.config_schema import EVAL_RULES, check_config
    from adapterctl.models.build import load_model_from_checkpoint

    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+").split(".")[0] in own_keys]
    rest = [o for o in overrides if o not in own]
    ecfg = compose(config_name, own)
    check_config(ecfg, EVAL_RULES)
    model, mcfg, state = load_model_from_checkpoint(str(ecfg.ckpt), rest)
    return ecfg, model, mcfg, state


def run_eval(overrides: Sequence[str]) -> dict:
    """``adapterctl eval ckpt=PATH [overrides]``: metrics.json (+ predictions/) in the run directory."""
    import time

    from rich.console import Console

    from adapterctl.config_schema import check_config
    from adapterctl.engine.distributed import barrier, cleanup, init_distributed
    from adapterctl.engine.evaluators import write_metrics
    from adapterctl.engine.precision import checkpoint_precision, resolve_amp, runnable_precision
    from adapterctl.engine.tasks import get_task

    ecfg, model, mcfg, state = eval_config(overrides)
    check_config(mcfg, keys=("data.num_classes", "data.ignore_index", "data.on_bad_sample"))
    if mcfg.task == "detection":  # whole or aug (HTC++), checked before any data is read
        get_task(mcfg).test_mode(ecfg.mode, model)
    dist = init_distributed(str(ecfg.trainer.device))
    try:
        out_dir = Path(
            ecfg.paths.output_dir
            or Path(str(ecfg.ckpt)).resolve().parent.parent / f"eval_{time.strftime('%Y%m%d-%H%M%S')}"
        )
        task = get_task(mcfg)
        model.to(dist.device)
        dataset = task.dataset(train=False)
        # the checkpoint's precision unless trainer.amp says otherwise: a run is evaluated as it was trained
        if ecfg.trainer.amp:
            amp = resolve_amp(str(ecfg.trainer.amp), dist.device)
        else:
            amp, note = runnable_precision(checkpoint_precision(mcfg), dist.device)
            if note and dist.is_main:
                Console(highlight=False).print(f"note: {note}")
        metrics = task.evaluate(
            model,
            dataset,
            dist.device,
            amp,
            int(ecfg.trainer.num_workers),
            dist.rank,
            dist.world_size,
            out_dir=out_dir,
            mode=ecfg.mode,
            save_predictions=bool(ecfg.save_predictions),
        )
        if dist.is_main:
            write_metrics(
                {"ckpt": str(ecfg.ckpt), "step": state.get("step"), "precision": amp, **metrics},
                out_dir / "metrics.json",
            )
            console = Console(highlight=False)
            console.print(task.table(metrics, f"{mcfg.experiment_name} ({ecfg.ckpt})"))
            console.print(f"metrics: {out_dir / 'metrics.json'}")
            if mcfg.task == "detection":  # detections are always kept, in the COCO results format
                console.print(f"predictions: {out_dir / 'results.json'}")
            elif ecfg.save_predictions:
                console.print(f"predictions: {out_dir / 'predictions'}")
        return metrics
    finally:
        barrier()
        cleanup()
