"""``adapterctl predict``: label maps and colour overlays for image files, from a checkpoint alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adapterctl.data.ade20k import IMAGE_SUFFIXES, load_image


def palette(num_classes: int) -> np.ndarray:
    """A fixed, well-spread colour per class (uint8, num_classes x 3)."""
    rng = np.random.default_rng(1234)
    colours = rng.integers(40, 256, size=(max(num_classes, 1), 3), dtype=np.int64)
    return colours.astype(np.uint8)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(map(str, inputs))}")
    return files


@torch.inference_mode()
def run_predict(
    ckpt: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    mode: str | None = None,
    device: str = "auto",
    alpha: float = 0.5,
) -> list[Path]:
    """Write ``<stem>.png`` (class index per pixel, palette PNG) and ``<stem>_overlay.jpg`` for each image."""
    from omegaconf import OmegaConf
    from PIL import Image

    from adapterctl.data.transforms import EvalTransform
    from adapterctl.engine.checkpoint import load_checkpoint
    from adapterctl.engine.distributed import resolve_device
    from adapterctl.models.build import build_model

    state = load_checkpoint(ckpt)
    cfg = OmegaConf.create(state["config"])
    if cfg.task != "segmentation":
        raise ValueError(f"{ckpt}: predict handles segmentation checkpoints; this one is {cfg.task} (use eval)")
    dev = resolve_device(device)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    transform = EvalTransform(list(cfg.data.test.scale), int(cfg.data.test.size_divisor))
    colours = palette(int(cfg.data.num_classes))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in collect_images(inputs):
        img = load_image(path)
        scores = model.predict(transform(img)[None].to(dev), out_size=tuple(img.shape[-2:]), mode=mode)
        pred = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        label = Image.fromarray(pred, mode="P")
        label.putpalette(colours.reshape(-1).tolist())
        label.save(out_dir / f"{path.stem}.png")
        rgb = img.permute(1, 2, 0).numpy()
        overlay = (1 - alpha) * rgb + alpha * colours[pred].astype(np.float32)
        Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(out_dir / f"{path.stem}_overlay.jpg", quality=92)
        written.append(out_dir / f"{path.stem}.png")
    return written
