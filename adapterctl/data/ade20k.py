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
    """Images and label PNGs paired by name, in the layouts of mmseg's ``CustomDataset``.

    Args:
        root: dataset root holding ``img_dir/<split>`` and ``ann_dir/<split>``.
        split: ``training`` / ``validation`` for ADE20K, or your folder names.
        img_suffix, seg_map_suffix: an image ``<name><img_suffix>`` pairs with ``<name><seg_map_suffix>``
            (Cityscapes: ``_leftImg8bit.png`` / ``_gtFine_labelTrainIds.png``); ``img_suffix=None``: any image
            extension, paired by stem.
        recursive: look in subfolders too (Cityscapes' city folders); names keep their relative folder.
        split_file: a text file (relative to ``root``) naming the samples, one per line, in ``img_dir`` and
            ``ann_dir`` themselves (Pascal Context); ``split`` is then unused.
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
        img_suffix: str | None = None,
        seg_map_suffix: str = ".png",
        recursive: bool = False,
        split_file: str | None = None,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.root = Path(root)
        if split_file:
            img_root, ann_root = self.root / img_dir, self.root / ann_dir
        else:
            img_root, ann_root = self.root / img_dir / split, self.root / ann_dir / split
        for d in (img_root, ann_root):
            if not d.is_dir():
                raise DataError(f"dataset folder not found: {d} (see datasets/README.md for the expected tree)")
        names = self._names(img_root, img_suffix, recursive, split_file)
        if not names:
            what = f"ending in '{img_suffix}'" if img_suffix else "(.jpg, .png, ...)"
            raise DataError(f"no images {what} in {img_root}{' or its subfolders' if recursive else ''}")
        images = {name: path for name, path in names}
        labels = {name: ann_root / f"{name}{seg_map_suffix}" for name, _ in names}
        labels = {name: p for name, p in labels.items() if p.is_file()}
        missing = [images[n] for n in images if n not in labels]
        if missing and not labels:
            raise DataError(
                f"no annotation in {ann_root} ends in '{seg_map_suffix}' for the images of {img_root}, e.g. "
                f"{missing[0].name} needs {ann_root / (names[0][0] + seg_map_suffix)} (see datasets/README.md)"
            )
        self.skipped: list[str] = []
        if missing:
            if on_bad_sample == "error":
                raise DataError(f"{len(missing)} image(s) have no annotation in {ann_root}, e.g. {missing[0].name}")
            self.skipped += [f"{p}: no annotation" for p in missing]
            log.warning("skipping %d images without annotation, e.g. %s", len(missing), missing[0])
        self.samples = [(images[n], labels[n]) for n in images if n in labels]
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.train = train
        self.transform = transform
        self.test_transform = test_transform
        self.on_bad_sample = on_bad_sample

    def _names(
        self, img_root: Path, img_suffix: str | None, recursive: bool, split_file: str | None
    ) -> list[tuple[str, Path]]:
        """``(name, image path)`` pairs, sorted; the name is the image's path under ``img_root`` less its suffix."""
        if split_file:
            listing = self.root / split_file
            if not listing.is_file():
                raise DataError(f"split file not found: {listing} (see datasets/README.md for the expected tree)")
            suffix = img_suffix or ".jpg"
            found = []
            for line in listing.read_text().splitlines():
                if line.strip():
                    found.append((line.strip(), img_root / f"{line.strip()}{suffix}"))
            absent = [p for _, p in found if not p.is_file()]
            if absent:
                raise DataError(
                    f"{listing} names {len(absent)} image(s) missing from {img_root}, e.g. {absent[0].name}"
                )
            return found
        files = img_root.rglob("*") if recursive else img_root.iterdir()
        found = []
        for p in files:
            if not p.is_file():
                continue
            rel = p.relative_to(img_root).as_posix()
            if img_suffix is not None:
                if rel.endswith(img_suffix):
                    found.append((rel[: -len(img_suffix)], p))
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                found.append((rel[: -len(p.suffix)], p))
        return sorted(found)

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
