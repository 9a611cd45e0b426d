"""The reproduction experiments under ``conf/experiment`` with their hyperparameters and the paper's numbers."""

from __future__ import annotations

from adapterctl.config import CONFIG_DIR, compose


def list_experiments() -> list[dict]:
    rows = []
    for path in sorted((CONFIG_DIR / "experiment").glob("[!_]*.yaml")):
        cfg = compose("train", [f"experiment={path.stem}"])
        paper = cfg.get("paper") or {}
        recipe = cfg.get("recipe") or {}  # a recipe that is not a paper row: its source, no number claimed
        m, o, t, d = cfg.model, cfg.optim, cfg.trainer, cfg.data
        gpus = int(paper.get("gpus") or recipe.get("gpus") or 1)
        if "mIoU_ss" in paper:
            result = f"{paper['mIoU_ss']} / {paper['mIoU_ms'] or '-'} mIoU (SS/MS)"
        elif "box_ap_ms" in paper:
            result = (
                f"{paper['box_ap']} / {paper['box_ap_ms']} box, {paper['mask_ap']} / {paper['mask_ap_ms']} mask AP "
                "(SS/MS)"
            )
        elif "box_ap" in paper:
            result = f"{paper['box_ap']} box / {paper['mask_ap']} mask AP"
        elif recipe:
            result = "not a paper row"
        else:
            result = "-"
        rows.append(
            {
                "name": path.stem,
                "paper_config": paper.get("config"),
                "model": str(m.family) if m.get("vit") is None else m.vit,
                "size": f"{m.embed_dim}d x {m.depth}",
                "pretrained": str(m.pretrained).rsplit("/", 1)[-1] if m.pretrained else "-",
                "img_size": m.img_size,
                "drop_path_rate": m.drop_path_rate,
                "deform_num_heads": m.deform_num_heads,
                "deform_ratio": m.deform_ratio,
                "with_cp": m.with_cp,
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "layer_decay_rate": o.layer_decay_rate,
                "max_iters": t.max_iters,
                "batch": f"{gpus}x{t.batch_size}",
                "crop": "x".join(str(c) for c in d.train.crop_size) if cfg.task == "segmentation" else "-",
                "test": (
                    f"{d.test.mode} {list(d.test.crop_size)}/{list(d.test.stride)}"
                    if cfg.task == "segmentation"
                    else f"resize {[list(x) for x in d.test.scales]}"
                    + (f" (aug: {len(d.test.aug_scales)} scales)" if d.test.get("aug_scales") else "")
                ),
                "task": cfg.task,
                "amp": t.amp,
                "paper_result": result,
                "paper": dict(paper),
                "recipe_source": recipe.get("source"),
            }
        )
    return rows
