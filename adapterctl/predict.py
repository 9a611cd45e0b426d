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
    score_thr: float = 0.3,
) -> list[Path]:
    """Segmentation: ``<stem>.png`` (class index per pixel, palette PNG) and ``<stem>_overlay.jpg`` per image.
    Detection: ``<stem>.json`` (boxes xyxy in original pixels, scores, class names, RLE masks, for detections
    scoring at least ``score_thr``) and ``<stem>_overlay.jpg`` (masks tinted, boxes outlined)."""
    from omegaconf import OmegaConf
    from PIL import Image

    from adapterctl.data.transforms import EvalTransform
    from adapterctl.engine.checkpoint import load_checkpoint
    from adapterctl.engine.distributed import resolve_device
    from adapterctl.models.build import build_model

    state = load_checkpoint(ckpt)
    cfg = OmegaConf.create(state["config"])
    dev = resolve_device(device)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    if cfg.task == "detection":
        return _predict_detection(model, cfg, inputs, Path(out_dir), dev, score_thr, alpha)
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


def _class_names(cfg) -> list[str]:
    if cfg.data.get("classes"):
        return list(cfg.data.classes)
    ann = Path(str(cfg.data.test.get("ann_file", "")))
    if ann.is_file():
        from adapterctl.data.coco import LabelMap, load_coco

        return LabelMap.from_coco(load_coco(ann)).names
    return [f"class {i + 1}" for i in range(int(cfg.data.num_classes))]


def _predict_detection(model, cfg, inputs, out_dir: Path, dev, score_thr: float, alpha: float) -> list[Path]:
    import json

    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    from adapterctl.data.coco import DetTransform

    names = _class_names(cfg)
    colours = palette(len(names) + 1)
    transform = DetTransform([list(s) for s in cfg.data.test.scales])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in collect_images(inputs):
        img = load_image(path)
        h, w = img.shape[-2:]
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
            rows.append(
                {
                    "box_xyxy": [round(v, 2) for v in box],
                    "score": round(score, 4),
                    "label": lab,
                    "name": name,
                    "mask_rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
        overlay.save(out_dir / f"{path.stem}_overlay.jpg", quality=92)
        (out_dir / f"{path.stem}.json").write_text(
            json.dumps({"image": str(path), "size": [h, w], "detections": rows}, indent=1)
        )
        written.append(out_dir / f"{path.stem}.json")
    return written
