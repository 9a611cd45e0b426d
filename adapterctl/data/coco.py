"""COCO-format detection / instance segmentation data through pycocotools.

Category ids map to contiguous labels 1..K (0 is torchvision's background) and back. Polygons and RLE masks
decode to binary masks; ``iscrowd`` regions are kept for evaluation and left out of training targets; images
without annotations are kept for evaluation and skipped in training, as mmdet does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adapterctl.data.det_transforms import DetrTransform, DetTransform
from adapterctl.data.images import load_image
from adapterctl.errors import DataError

log = logging.getLogger(__name__)


def load_coco(ann_file: str | Path):
    """A pycocotools COCO index, with a clear error for a missing or malformed file."""
    import json

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{ann_file}: not a COCO file (no '{key}' list)")
    _require_unique_ids(data, "images", "image", "file_name", ann_file)
    _require_unique_ids(data, "categories", "category", "name", ann_file)
    return _index(data)


def _index(data: dict):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _without(coco, img_ids: set):
    """``coco`` less the images ``img_ids``, their annotations and annotations of no image: what a skip leaves
    out of the dataset must leave the ground truth too, or COCOeval counts it as missed (or fails decoding it)."""
    images = [i for i in coco.dataset["images"] if i["id"] not in img_ids]
    kept = {i["id"] for i in images}
    annotations = [a for a in coco.dataset["annotations"] if a["image_id"] in kept]
    return _index({**coco.dataset, "images": images, "annotations": annotations})


def _require_unique_ids(data: dict, key: str, kind: str, name_key: str, ann_file: Path) -> None:
    """pycocotools indexes by id and silently keeps the last entry of a repeated one: the other image or category
    vanishes and its annotations land on the survivor. No per-sample skip can repair that, so always an error."""
    seen: dict = {}
    for entry in data[key]:
        first = seen.setdefault(entry.get("id"), entry)
        if first is not entry:
            raise DataError(
                f"{ann_file}: {kind} id {entry.get('id')} is repeated in '{key}' "
                f"({first.get(name_key)} and {entry.get(name_key)}); ids must be unique"
            )


class LabelMap:
    """COCO category ids <-> contiguous labels 1..K (0 = background)."""

    def __init__(self, cat_ids: Sequence[int], names: Sequence[str]) -> None:
        self.cat_ids = list(cat_ids)
        self.names = list(names)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}

    @classmethod
    def from_coco(cls, coco) -> LabelMap:
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        return cls([c["id"] for c in cats], [c["name"] for c in cats])

    def to_label(self, cat_id: int) -> int:
        return self.cat_to_label[cat_id]

    def to_cat(self, label: int) -> int:
        return self.cat_ids[label - 1]

    def __len__(self) -> int:
        return len(self.cat_ids)


def _segmentation_problem(seg, info: dict) -> str | None:
    """What pycocotools cannot decode for this image, checked up front because it otherwise fails at the first
    ``__getitem__`` or deep in COCOeval with an error naming nothing (a 4-number polygon even passes as a box)."""
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list):
                return f"segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...], got {seg[:6]}"
            if len(poly) < 6:
                return f"polygon {k} has {len(poly)} coordinates; a polygon needs at least 3 points (6 coordinates)"
    elif isinstance(seg, dict) and "height" in info and "width" in info:
        size = [info["height"], info["width"]]
        if seg.get("size") != size:
            return f"RLE size {seg.get('size')} differs from the image's [height, width] {size}"
    return None


def ann_to_mask(coco, ann: dict, h: int, w: int) -> np.ndarray:
    """Polygon(s), uncompressed RLE or compressed RLE -> (h, w) uint8 mask."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


class CocoDetection(Dataset):
    """Images and instance targets from a COCO JSON.

    Args:
        img_dir: folder of the image files (``file_name`` is relative to it).
        ann_file: the COCO JSON.
        train: drop images without (non-crowd) annotations and crowd regions from the targets.
        with_masks: decode instance masks.
        on_bad_sample: ``error`` (stop on a malformed annotation or missing image, naming it) or ``skip`` (leave
            the image, or an annotation of no image, out of the dataset and of ``coco``, listed in ``skipped``).
        num_classes: if given, the number of categories the file must define (the model's class count).
        semantic_dir: if given, a folder of COCO-stuff-style label maps, one ``<image stem>.png`` per image (HTC++'s
            semantic branch; datasets/README.md): loaded as ``target["semantic"]`` (H, W) int64, 255 = void.
    """

    def __init__(
        self,
        img_dir: str | Path,
        ann_file: str | Path,
        train: bool = False,
        with_masks: bool = True,
        on_bad_sample: str = "error",
        transform=None,
        num_classes: int | None = None,
        semantic_dir: str | Path | None = None,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        self.labels = LabelMap.from_coco(self.coco)
        if num_classes is not None and num_classes != len(self.labels):
            raise DataError(
                f"{self.ann_file}: {len(self.labels)} categories, but num_classes is {num_classes} "
                "(data.num_classes in the config must equal the file's category count)"
            )
        self.train = train
        self.with_masks = with_masks
        self.on_bad_sample = on_bad_sample
        self.transform = transform
        self.semantic_dir = Path(semantic_dir) if semantic_dir is not None else None
        if self.semantic_dir is not None and not self.semantic_dir.is_dir():
            raise DataError(f"data.train.semantic_dir: {self.semantic_dir} is not a folder (COCO stuff maps; see "
                            "datasets/README.md)")  # fmt: skip
        self.skipped: list[str] = []
        for problem in self._orphan_annotations():
            self._bad(problem)
        ids = sorted(self.coco.getImgIds())
        kept, dropped = [], set()
        for img_id in ids:
            problem = self._check(img_id)
            if problem:
                self._bad(problem)
                dropped.add(img_id)
                continue
            if train and not any(self._trainable(a) for a in self.coco.imgToAnns.get(img_id, [])):
                continue  # no objects to learn from (mmdet's filter_empty_gt)
            info = self.coco.imgs[img_id]
            if train and min(info.get("height", 32), info.get("width", 32)) < 32:
                continue  # mmdet's min_size=32 filter on training images
            kept.append(img_id)
        if self.skipped:
            log.warning("skipping %d bad images or annotations, e.g. %s", len(self.skipped), self.skipped[0])
            self.coco = _without(self.coco, dropped)
        self.ids = kept

    def _bad(self, problem: str) -> None:
        if self.on_bad_sample == "error":
            raise DataError(problem)
        self.skipped.append(problem)

    def _orphan_annotations(self) -> list[str]:
        """Annotations whose image_id names no image: pycocotools indexes them under that id without a word, and
        they would never be trained on or evaluated, so an id typo would silently lose objects."""
        return [
            f"{self.ann_file}: annotation {ann.get('id')} has image_id {ann['image_id']}, which is not in 'images'"
            for ann in self.coco.dataset["annotations"]
            if ann["image_id"] not in self.coco.imgs
        ]

    def _check(self, img_id: int) -> str | None:
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        if not path.is_file():
            return f"{self.ann_file}: image {img_id} ({info['file_name']}) not found in {self.img_dir}"
        if self.semantic_dir is not None and not self._semantic_path(info).is_file():
            return f"{self.ann_file}: image {img_id} ({info['file_name']}) has no label map {self._semantic_path(info)}"
        for ann in self.coco.imgToAnns.get(img_id, []):
            where = f"{self.ann_file}: annotation {ann.get('id')} of image {img_id} ({info['file_name']})"
            if ann.get("category_id") not in self.labels.cat_to_label:
                return f"{where}: unknown category_id {ann.get('category_id')}"
            bbox = ann.get("bbox")
            if not bbox or len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
                return f"{where}: box {bbox} has no area (expected [x, y, w, h] with w, h > 0)"
            problem = _segmentation_problem(ann.get("segmentation"), info)
            if problem:
                return f"{where}: {problem}"
        return None

    def _semantic_path(self, info: dict) -> Path:
        return self.semantic_dir / Path(info["file_name"]).with_suffix(".png").name

    def _semantic(self, info: dict, h: int, w: int) -> torch.Tensor:
        path = self._semantic_path(info)
        with Image.open(path) as im:
            if im.size != (w, h):
                raise DataError(f"{path}: label map is {im.size[0]}x{im.size[1]}, its image {w}x{h}")
            if im.mode not in ("L", "P"):
                raise DataError(f"{path}: a label map must be a single-channel PNG (mode L or P), got {im.mode}")
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).astype(np.int64))

    @staticmethod
    def _trainable(ann: dict) -> bool:
        """mmdet's training filter: not crowd, area > 0, box at least 1 x 1 pixel."""
        _, _, w, h = ann["bbox"]
        return not ann.get("iscrowd", 0) and ann.get("area", 1) > 0 and w >= 1 and h >= 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        image = load_image(self.img_dir / info["file_name"])
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not self.train or self._trainable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = {
            "image_id": img_id,
            "boxes": boxes,
            "labels": torch.tensor([self.labels.to_label(a["category_id"]) for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
        }
        if self.with_masks:
            masks = [ann_to_mask(self.coco, a, h, w) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.semantic_dir is not None:
            target["semantic"] = self._semantic(info, h, w)
        if self.transform is not None:
            image, target = self.transform(image, target, np.random.default_rng(seed))
        return {"image": image, "target": target, "ori_size": (h, w), "path": str(self.img_dir / info["file_name"])}


def build_det_dataset(data, train: bool, semantic: bool = False) -> CocoDetection:
    """A :class:`CocoDetection` from the ``data`` config section (``train`` or ``test`` split); ``semantic``: the
    training split's label maps too (``data.train.semantic_dir``, for a head with a semantic branch).

    ``data.train.pipeline``: ``1x`` (resize to one of ``scales`` + flip) or ``3x`` (:class:`DetrTransform`).
    ``data.num_classes`` sizes the head, so it must match the file's categories."""
    split = data.train if train else data.test
    scales = [list(s) for s in split.scales]
    pipeline = str(split.get("pipeline", "1x")) if train else "test"
    if pipeline == "3x":
        transform = DetrTransform(scales, flip_prob=float(split.get("flip_prob", 0.5)))
    elif pipeline in ("1x", "test"):
        transform = DetTransform(scales, float(split.get("flip_prob", 0.0)) if train else 0.0)
    elif pipeline == "range":
        transform = DetTransform(scales, float(split.get("flip_prob", 0.5)), mode="range")
    else:
        raise ValueError(f"data.train.pipeline must be 1x, 3x or range, got {pipeline!r}")
    return CocoDetection(
        split.img_dir,
        split.ann_file,
        train=train,
        with_masks=train,
        on_bad_sample=data.get("on_bad_sample", "error"),
        transform=transform,
        num_classes=int(data.num_classes) if data.get("num_classes") is not None else None,
        semantic_dir=split.get("semantic_dir") if train and semantic else None,
    )
