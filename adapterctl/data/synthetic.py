"""``adapterctl data synth``: small datasets in the real formats, made from textured shapes.

Segmentation: the ADE20K tree (``images/{training,validation}/*.jpg``, ``annotations/.../*.png``, label 0 =
unlabelled, 1..K classes). Every class has its own colour and texture, so a short CPU run can learn them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SEG_CLASSES = ("background_a", "disc", "square", "triangle", "stripes", "ring", "blob", "cross")
_COLOURS = np.array(
    [
        (90, 120, 80),
        (220, 60, 50),
        (50, 90, 210),
        (35, 35, 35),
        (160, 60, 200),
        (40, 190, 180),
        (250, 140, 20),
        (240, 240, 240),
    ],
    dtype=np.float32,
)


def _texture(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = 6 + kind
    phase = rng.uniform(0, 2 * np.pi)
    if kind % 3 == 0:
        t = np.sin(xx * 2 * np.pi / period + phase)
    elif kind % 3 == 1:
        t = np.sin((xx + yy) * 2 * np.pi / period + phase)
    else:
        t = np.sin(xx * 2 * np.pi / period + phase) * np.sin(yy * 2 * np.pi / period)
    return t


def _shape_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    r = rng.uniform(0.1, 0.3) * min(h, w)
    if kind == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    if kind == "square":
        return (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    if kind == "triangle":
        return (yy - cy < r) & (yy - cy > -r) & (np.abs(xx - cx) < (yy - cy + r) / 2)
    if kind == "stripes":
        return (np.abs(yy - cy) < r * 1.5) & (np.abs(xx - cx) < r * 0.6)
    if kind == "ring":
        d = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d < r**2) & (d > (0.55 * r) ** 2)
    if kind == "blob":
        ang = np.arctan2(yy - cy, xx - cx)
        rad = r * (1 + 0.3 * np.sin(3 * ang + rng.uniform(0, 6)))
        return (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
    if kind == "cross":
        return ((np.abs(yy - cy) < r * 0.3) & (np.abs(xx - cx) < r)) | (
            (np.abs(xx - cx) < r * 0.3) & (np.abs(yy - cy) < r)
        )
    raise ValueError(kind)


def make_seg_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its ADE20K-style label (0 unlabelled, 1..8 classes)."""
    label = np.ones((h, w), dtype=np.uint8)
    img = _COLOURS[0] + 25 * _texture(0, h, w, rng)[..., None]
    n_shapes = int(rng.integers(2, 5))
    kinds = rng.choice(np.arange(1, len(SEG_CLASSES)), size=n_shapes, replace=False)
    for k in kinds:
        mask = _shape_mask(SEG_CLASSES[k], h, w, rng)
        colour = _COLOURS[k] + rng.normal(0, 12, size=3)
        img[mask] = colour + 30 * _texture(k, h, w, rng)[mask][..., None]
        label[mask] = k + 1
    if rng.random() < 0.5:  # an unlabelled region (ADE20K's 0 = "other"), ignored in training and evaluation
        y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        hh, ww = int(rng.integers(8, 24)), int(rng.integers(8, 24))
        img[y : y + hh, x : x + ww] = rng.uniform(0, 255, size=(min(hh, h - y), min(ww, w - x), 3))
        label[y : y + hh, x : x + ww] = 0
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def write_seg_dataset(
    out: str | Path, n_train: int = 160, n_val: int = 40, seed: int = 0, size_range: tuple[int, int] = (112, 192)
) -> Path:
    """Write an ADE20K-format synthetic dataset under ``out``; returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        img_dir, ann_dir = out / "images" / split, out / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            img, label = make_seg_sample(rng, h, w)
            name = f"synth_{split}_{i:05d}"
            Image.fromarray(img).save(img_dir / f"{name}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(ann_dir / f"{name}.png")
    (out / "classes.txt").write_text("\n".join(SEG_CLASSES) + "\n")
    return out


DET_CATEGORIES = ((1, "disc"), (3, "square"), (7, "triangle"), (12, "ring"))  # non-contiguous ids on purpose
_DET_COLOURS = {1: (220, 60, 50), 3: (50, 90, 210), 7: (35, 35, 35), 12: (40, 190, 180)}


def _polygon_of(kind: str, cy: float, cx: float, r: float) -> list[float]:
    if kind == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    else:  # triangle
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [float(v) for p in pts for v in p]


def write_det_dataset(
    out: str | Path, n_train: int = 120, n_val: int = 30, seed: int = 0, size_range: tuple[int, int] = (160, 256)
) -> Path:
    """Write a COCO-format synthetic dataset: ``{train,val}/*.jpg``, ``annotations/instances_{split}.json`` and,
    for HTC++'s semantic branch, COCO-stuff-style label maps ``stuffthingmaps/{split}/*.png`` (each category's
    contiguous index 0..3 on its objects, 4 = the background "stuff", 255 = void on crowd regions).

    Squares and triangles carry polygon masks, discs and rings RLE masks; some images hold a crowd region
    (``iscrowd=1``, RLE) and some hold no object at all.
    """
    import json

    from pycocotools import mask as mask_utils

    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in DET_CATEGORIES]
    ann_id = 1
    label_of = {cat_id: i for i, (cat_id, _) in enumerate(DET_CATEGORIES)}
    for split, n in (("train", n_train), ("val", n_val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "stuffthingmaps" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            img = np.asarray(_COLOURS[0], np.float32) + 25 * _texture(0, h, w, rng)[..., None]
            img_id = i + 1
            semantic = np.full((h, w), len(DET_CATEGORIES), np.uint8)  # the background stuff class
            n_obj = 0 if rng.random() < 0.1 else int(rng.integers(1, 5))
            for _ in range(n_obj):
                cat_id, _name = DET_CATEGORIES[int(rng.integers(len(DET_CATEGORIES)))]
                r = float(rng.uniform(0.08, 0.2) * min(h, w))
                cy, cx = float(rng.uniform(r, h - r)), float(rng.uniform(r, w - r))
                kind = dict(DET_CATEGORIES)[cat_id]
                if kind in ("square", "triangle"):
                    poly = _polygon_of(kind, cy, cx, r)
                    mask = mask_utils.decode(mask_utils.frPyObjects([poly], h, w))[..., 0]
                    segmentation: object = [poly]
                else:
                    yy, xx = np.mgrid[0:h, 0:w]
                    d = (yy - cy) ** 2 + (xx - cx) ** 2
                    mask = ((d < r**2) & ((kind == "disc") | (d > (0.55 * r) ** 2))).astype(np.uint8)
                    rle = mask_utils.encode(np.asfortranarray(mask))
                    segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                if mask.sum() < 4:
                    continue
                colour = np.asarray(_DET_COLOURS[cat_id], np.float32) + rng.normal(0, 10, 3)
                img[mask.astype(bool)] = colour
                semantic[mask.astype(bool)] = label_of[cat_id]
                x0, y0, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": img_id,
                        "category_id": cat_id,
                        "iscrowd": 0,
                        "bbox": [x0, y0, bw, bh],
                        "area": float(mask.sum()),
                        "segmentation": segmentation,
                    }
                )
                ann_id += 1
            if n_obj and rng.random() < 0.15:  # a crowd of small discs, marked iscrowd with one RLE
                crowd = np.zeros((h, w), np.uint8)
                for _ in range(5):
                    y, x = int(rng.integers(5, h - 5)), int(rng.integers(5, w - 5))
                    crowd[y - 3 : y + 3, x - 3 : x + 3] = 1
                img[crowd.astype(bool)] = _DET_COLOURS[1]
                semantic[crowd.astype(bool)] = 255
                rle = mask_utils.encode(np.asfortranarray(crowd))
                x0, y0, bw, bh = mask_utils.toBbox(rle).tolist()
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": img_id,
                        "category_id": 1,
                        "iscrowd": 1,
                        "bbox": [x0, y0, bw, bh],
                        "area": float(crowd.sum()),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    }
                )
                ann_id += 1
            img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
            name = f"synth_{split}_{i:05d}.jpg"
            Image.fromarray(img).save(out / split / name, quality=95)
            Image.fromarray(semantic).save(out / "stuffthingmaps" / split / name.replace(".jpg", ".png"))
            images.append({"id": img_id, "file_name": name, "height": h, "width": w})
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": categories,
            "info": {"description": "adapterctl synthetic COCO-format shapes"},
        }
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return out
