"""Datasets and loaders from a composed config; samplers that make training resumable and evaluation exact."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from adapterctl.data.ade20k import SegmentationFolder, collate_eval, collate_train
from adapterctl.data.classes import ADE20K_CLASSES
from adapterctl.data.transforms import EvalTransform, TrainTransform
from adapterctl.errors import DataError


class InfiniteTrainSampler(Sampler):
    """Yields ``(index, sample_seed)`` for iterations ``start_iter, start_iter + 1, ...`` of one rank.

    The global sample stream is a fresh permutation per epoch (seeded by ``seed + epoch``); iteration ``it`` of
    rank ``r`` takes samples ``[(it * world + r) * batch, ... + batch)``. Every sample's augmentation seed is a
    function of its position in the stream, so a resumed run sees exactly the data of an uninterrupted one.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_iter: int = 0
    ) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world_size
        self.seed, self.start_iter = seed, start_iter
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = self.start_iter
        while True:
            first = (it * self.world + self.rank) * self.batch_size
            for pos in range(first, first + self.batch_size):
                yield self._index(pos), (self.seed * 1_000_003 + pos) & 0x7FFFFFFF
            it += 1


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: disjoint shards, no padding duplicates."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def class_names(data: DictConfig) -> list[str]:
    """``data.classes``, else ``classes.txt`` in the data root (one name per line), else ADE20K's names for
    ADE20K, else the indices. A list whose length differs from ``data.num_classes`` is an error."""
    source = "data.classes"
    names = list(data.classes) if data.get("classes") else None
    class_file = Path(str(data.root)) / "classes.txt"
    if names is None and class_file.is_file():
        names = [ln.strip() for ln in class_file.read_text().splitlines() if ln.strip()]
        source = str(class_file)
    if names is None:
        if data.name == "ade20k" and data.num_classes == len(ADE20K_CLASSES):
            return list(ADE20K_CLASSES)
        return [str(i) for i in range(data.num_classes)]
    if len(names) != int(data.num_classes):
        raise DataError(f"{source} names {len(names)} classes but data.num_classes={data.num_classes}; make them agree")
    return names


def to_annotation_values(pred: np.ndarray, reduce_zero_label: bool, num_classes: int | None = None) -> np.ndarray:
    """Predicted classes 0..K-1 as the values the dataset's annotation PNGs use, the one convention of every label
    PNG adapterctl writes (``eval save_predictions=true`` and ``predict``): with ``reduce_zero_label`` (ADE20K,
    COCO-Stuff) class k is written k + 1 and 0 stays "unlabelled", as the ADE20K test server expects; else k.
    uint8 (an 8-bit PNG) when every value of ``num_classes`` classes fits, else uint16 (a 16-bit PNG): a model with
    more classes never wraps around; decided by the class count, so all of one model's PNGs share a depth."""
    values = pred.astype(np.int64) + int(reduce_zero_label)
    top = (int(num_classes) - 1 + int(reduce_zero_label)) if num_classes else int(values.max(initial=0))
    return values.astype(np.uint8 if top <= 255 else np.uint16)


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader workers leave SIGINT/SIGTERM to the main process: a scheduler or Ctrl-C signals the whole
    process group, and a worker that died first would take the main process down before it checkpoints.
    (Workers still exit when the main process does: torch's workers watch their parent.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_seg_dataset(data: DictConfig, train: bool) -> SegmentationFolder:
    split = data.train.split if train else data.test.split
    common = dict(
        root=Path(str(data.root)),
        split=split,
        num_classes=int(data.num_classes),
        reduce_zero_label=bool(data.reduce_zero_label),
        img_dir=data.get("img_dir", "images"),
        ann_dir=data.get("ann_dir", "annotations"),
        on_bad_sample=data.get("on_bad_sample", "error"),
        img_suffix=data.get("img_suffix"),
        seg_map_suffix=data.get("seg_map_suffix", ".png"),
        recursive=bool(data.get("recursive", False)),
        split_file=(data.train if train else data.test).get("split_file"),
    )
    if train:
        t = data.train
        transform = TrainTransform(
            scale=list(t.scale),
            ratio_range=list(t.ratio_range),
            crop_size=list(t.crop_size),
            cat_max_ratio=float(t.cat_max_ratio),
            flip_prob=float(t.flip_prob),
            photometric=bool(t.photometric),
            mean=list(data.mean),
            ignore_index=int(data.ignore_index),
        )
        return SegmentationFolder(**common, train=True, transform=transform)
    return SegmentationFolder(
        **common, train=False, test_transform=EvalTransform(list(data.test.scale), int(data.test.size_divisor))
    )


def train_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    rank: int,
    world: int,
    seed: int,
    start_iter: int,
    collate_fn=collate_train,
) -> DataLoader:
    sampler = InfiniteTrainSampler(len(dataset), batch_size, rank, world, seed, start_iter)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
    )


def eval_loader(dataset, num_workers: int, rank: int, world: int, collate_fn=collate_eval) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=num_workers,
        collate_fn=collate_fn,
        worker_init_fn=_ignore_stop_signals,
    )
