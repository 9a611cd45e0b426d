"""``adapterctl predict``: label maps and colour overlays for image files, from a checkpoint alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adapterctl.data.images import IMAGE_SUFFIXES, load_image
from adapterctl.errors import ConfigError, DataError
from adapterctl.files import save_image


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
            raise DataError(f"input not found: {item}")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, inputs))}")
    return files


@torch.inference_mode()
def run_predict(
    ckpt: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    mode: str | None = None,
    device: str = "auto",
    alpha: float = 0.5,
    score_thr: float = 0.5,
    amp: str | None = None,
    overrides: Sequence[str] = (),
) -> list[Path]:
    """Segmentation: ``<stem>.png`` (a palette PNG holding the values the dataset's annotation PNGs use: class
    k as k + 1 where 0 means unlabelled, e.g. ADE20K; else k) and ``<stem>_overlay.jpg`` per image.
    Detection: ``<stem>.json`` (detections scoring at least ``score_thr`` in the COCO results format of
    ``results.json``: ``bbox`` [x, y, w, h] in original pixels, ``category_id`` the dataset's id, ``score``,
    ``segmentation`` RLE, plus the class ``name``) and ``<stem>_overlay.jpg`` (masks tinted, boxes outlined).
    ``amp``: None runs in the precision the checkpoint was trained in. ``overrides``: ``key=value`` merged into the
    checkpoint's config (e.g. ``data.test.scale=[1024,256]``), as ``eval`` and ``export`` take them."""
    from adapterctl.engine.distributed import resolve_device
    from adapterctl.engine.precision import autocast_context, checkpoint_precision, resolve_amp, runnable_precision
    from adapterctl.engine.tasks import get_task
    from adapterctl.files import ensure_dir
    from adapterctl.models.build import load_model_from_checkpoint

    if mode not in (None, "whole", "slide", "aug"):
        raise ConfigError(f"--mode must be whole, slide or aug, got {mode!r}")
    model, cfg, _ = load_model_from_checkpoint(ckpt, overrides)
    task = get_task(cfg)
    dev = resolve_device(device)
    if amp:
        precision = resolve_amp(amp, dev)
    else:
        precision, note = runnable_precision(checkpoint_precision(cfg), dev)
        if note:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(f"note: {note}")
    images = collect_images(inputs)
    model.to(dev).eval()
    out_dir = ensure_dir(out_dir)
    with autocast_context(dev, precision):
        return task.predict(model, images, out_dir, dev, mode=mode, score_thr=score_thr, alpha=alpha)


def predict_segmentation(
    model, cfg, images: Sequence[Path], out_dir: Path, dev, mode: str | None, alpha: float
) -> list[Path]:
    """Per image: a palette label PNG in the annotations' values and a colour overlay."""
    from PIL import Image

    from adapterctl.data.loader import to_annotation_values
    from adapterctl.data.transforms import EvalTransform

    transform = EvalTransform(list(cfg.data.test.scale), int(cfg.data.test.size_divisor))
    offset = int(bool(cfg.data.get("reduce_zero_label", False)))
    colours = palette(int(cfg.data.num_classes))
    png_palette = np.concatenate([np.zeros((offset, 3), np.uint8), colours]).reshape(-1).tolist()
    written = []
    for path in images:
        img = load_image(path)
        scores = model.predict(transform(img)[None].to(dev), out_size=tuple(img.shape[-2:]), mode=mode)
        pred = scores.argmax(1)[0].cpu().numpy()
        values = to_annotation_values(pred, bool(offset), int(cfg.data.num_classes))
        if values.dtype == np.uint8:
            label = Image.fromarray(values, mode="P")
            label.putpalette(png_palette)
        else:  # beyond 256 values: a 16-bit grey PNG (no palette can hold them)
            label = Image.fromarray(values)
        save_image(label, out_dir / f"{path.stem}.png")
        rgb = img.permute(1, 2, 0).numpy()
        overlay = (1 - alpha) * rgb + alpha * colours[pred].astype(np.float32)
        save_image(Image.fromarray(overlay.clip(0, 255).astype(np.uint8)), out_dir / f"{path.stem}_overlay.jpg")
        written.append(out_dir / f"{path.stem}.png")
    return written


def _categories(cfg) -> tuple[list[str], list[int]]:
    """Class names and COCO category ids: from the checkpoint's config (recorded at training), else from the
    annotation file named there, else numbered."""
    data = cfg.data
    if data.get("classes") and data.get("category_ids"):
        return list(data.classes), [int(c) for c in data.category_ids]
    ann = Path(str(data.test.get("ann_file", "")))
    if ann.is_file():
        from adapterctl.data.coco import LabelMap, load_coco

        labels = LabelMap.from_coco(load_coco(ann))
        return labels.names, labels.cat_ids
    n = int(data.num_classes)
    names = list(data.classes) if data.get("classes") else [f"class {i + 1}" for i in range(n)]
    return names, list(range(1, n + 1))


def predict_detection(
    model, cfg, images: Sequence[Path], out_dir: Path, dev, score_thr: float, alpha: float, *, task=None,
    mode: str = "whole",
) -> list[Path]:  # fmt: skip
    """Per image: the detections in the COCO results format (JSON) and an overlay. ``mode`` ``aug``: the
    multi-scale + flip test through ``task.detect``."""
    import json

    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    from adapterctl.data.det_transforms import DetTransform
    from adapterctl.files import write_text

    names, cat_ids = _categories(cfg)
    colours = palette(len(names) + 1)
    transform = DetTransform([list(s) for s in cfg.data.test.scales])
    written = []
    for path in images:
        img = load_image(path)
        h, w = img.shape[-2:]
        if mode == "aug":
            det = task.detect(model, img.to(dev), (h, w), mode)
        else:
            resized, _ = transform(img, {"boxes": torch.zeros(0, 4)}, np.random.default_rng(0))
            det = model([resized.to(dev)], original_sizes=[(h, w)])[0]
        keep = det["scores"] >= score_thr
        boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
        masks = det["masks"][keep][:, 0].cpu().numpy() if "masks" in det else np.zeros((0, h, w), bool)
        canvas = img.permute(1, 2, 0).numpy().copy()
        for m, lab in zip(masks, labels.tolist(), strict=True):
            canvas[m] = (1 - alpha) * canvas[m] + alpha * colours[lab].astype(np.float32)
        overlay = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(overlay)
        rows = []
        for i, (box, score, lab) in enumerate(zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)):
            name = names[lab - 1] if 0 < lab <= len(names) else str(lab)
            draw.rectangle(box, outline=tuple(int(c) for c in colours[lab]), width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=(255, 255, 255))
            rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            x0, y0, x1, y1 = box
            rows.append(
                {
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "category_id": cat_ids[lab - 1] if 0 < lab <= len(cat_ids) else lab,
                    "name": name,
                    "score": round(score, 4),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
        save_image(overlay, out_dir / f"{path.stem}_overlay.jpg")
        write_text(
            out_dir / f"{path.stem}.json",
            json.dumps({"image": str(path), "size": [h, w], "detections": rows}, indent=1),
        )
        written.append(out_dir / f"{path.stem}.json")
    return written
