"""ADE20K-format semantic segmentation folders (``images/<split>/*.jpg`` + ``annotations/<split>/*.png``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from adapterctl.data.images import IMAGE_SUFFIXES, load_image
from adapterctl.data.transforms import IGNORE, EvalTransform, TrainTransform
from adapterctl.errors import DataError

log = logging.getLogger(__name__)


def load_label(path: Path, reduce_zero_label: bool, num_classes: int) -> torch.Tensor:
    """(H, W) uint8 class map; with ``reduce_zero_label`` 0 -> 255 (ignored) and 1..K -> 0..K-1."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: label must be a single-channel PNG (mode L or P), got mode {im.mode}")
            arr = np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read label ({exc})") from None
    if reduce_zero_label:
        arr = arr - 1
        arr[arr == -1] = IGNORE
    bad = np.unique(arr[(arr >= num_classes) & (arr != IGNORE)])
    if bad.size:
        shown = (bad + 1 if reduce_zero_label else bad)[:10].tolist()
        allowed = f"0..{num_classes} (0 = unlabelled)" if reduce_zero_label else f"0..{num_classes - 1} and 255"
        raise DataError(f"{path}: label values {shown} outside the {num_classes} classes (allowed: {allowed})")
    return torch.from_numpy(arr.astype(np.uint8))


class SegmentationFolder(Dataset):
    """Images and label PNGs paired by file stem.

    Args:
        root: dataset root holding ``img_dir/<split>`` and ``ann_dir/<split>``.
        split: ``training`` / ``validation`` for ADE20K, or your folder names.
        num_classes: classes after ``reduce_zero_label``.
        train: apply ``transform`` (a :class:`TrainTransform`) with a per-sample seed; else ``test_transform``.
        on_bad_sample: ``error`` (stop, naming the file) or ``skip`` (use the next sample and report the file).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int,
        reduce_zero_label: bool = True,
        img_dir: str = "images",
        ann_dir: str = "annotations",
        train: bool = False,
        transform: TrainTransform | None = None,
        test_transform: EvalTransform | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.root = Path(root)
        img_root, ann_root = self.root / img_dir / split, self.root / ann_dir / split
        for d in (img_root, ann_root):
            if not d.is_dir():
                raise DataError(f"dataset folder not found: {d} (see datasets/README.md for the expected tree)")
        labels = {p.stem: p for p in ann_root.iterdir() if p.suffix.lower() == ".png"}
        images = sorted(p for p in img_root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"no images in {img_root}")
        missing = [p for p in images if p.stem not in labels]
        self.skipped: list[str] = []
        if missing:
            if on_bad_sample == "error":
                raise DataError(f"{len(missing)} image(s) have no annotation in {ann_root}, e.g. {missing[0].name}")
            self.skipped += [f"{p}: no annotation" for p in missing]
            log.warning("skipping %d images without annotation, e.g. %s", len(missing), missing[0])
        self.samples = [(p, labels[p.stem]) for p in images if p.stem in labels]
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.train = train
        self.transform = transform
        self.test_transform = test_transform
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, ann_path = self.samples[index]
        img = load_image(img_path)
        label = load_label(ann_path, self.reduce_zero_label, self.num_classes)
        if img.shape[-2:] != label.shape:
            raise DataError(f"{ann_path}: label size {tuple(label.shape)} differs from image {tuple(img.shape[-2:])}")
        return img, label

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        skipped = []
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                img, label = self._load(i)
                break
            except DataError as exc:
                if self.on_bad_sample == "error":
                    raise
                skipped.append(str(exc))
        else:
            raise DataError(f"every sample under {self.root} is unreadable")
        out: dict = {"index": i, "path": str(self.samples[i][0]), "skipped": skipped}
        if self.train:
            assert self.transform is not None
            img, label = self.transform(img, label, np.random.default_rng(seed))
            out.update(image=img, label=label.long())
        else:
            out["ori_size"] = tuple(img.shape[-2:])
            out["image"] = self.test_transform(img) if self.test_transform else img
            out["label"] = label.long()
        return out


def index_seed(index: int, base: int = 0) -> int:
    return (base * 1_000_003 + index) & 0x7FFFFFFF


def collate_train(batch: Sequence[dict]) -> dict:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "skipped": [s for b in batch for s in b["skipped"]],
    }


def collate_eval(batch: Sequence[dict]) -> list[dict]:
    return list(batch)
