"""The other segmentation datasets in their usual (mmseg) layouts: Cityscapes, COCO-Stuff-164k / 10k, Pascal
Context 59. Each is written here from the synthetic set, then read through its data config."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from adapterctl.config import compose
from adapterctl.data.loader import build_seg_dataset
from adapterctl.errors import DataError


def _pairs(synth, split="training"):
    for img in sorted((synth / "images" / split).glob("*.jpg")):
        yield img, synth / "annotations" / split / f"{img.stem}.png"


def _train_ids(label_png) -> np.ndarray:
    ade = np.asarray(Image.open(label_png)).astype(np.int64)  # 0 unlabelled, 1..8
    return np.where(ade == 0, 255, ade - 1).astype(np.uint8)


def _data(name: str, root, *extra):
    return compose(
        "train", [f"data={name}", f"data.root={root}", "data.num_classes=8", "data.classes=null", *extra]
    ).data


def test_cityscapes_layout_with_city_folders_and_suffixes(synth_seg, tmp_path):
    root = tmp_path / "cityscapes"
    pairs = list(_pairs(synth_seg))
    for i, (img, lab) in enumerate(pairs):
        city = ("aachen", "bremen")[i % 2]
        (root / "leftImg8bit" / "train" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "train" / city).mkdir(parents=True, exist_ok=True)
        Image.open(img).save(root / "leftImg8bit" / "train" / city / f"{city}_{i:06d}_leftImg8bit.png")
        Image.fromarray(_train_ids(lab)).save(
            root / "gtFine" / "train" / city / f"{city}_{i:06d}_gtFine_labelTrainIds.png"
        )
        Image.fromarray(_train_ids(lab)).save(root / "gtFine" / "train" / city / f"{city}_{i:06d}_gtFine_color.png")
    ds = build_seg_dataset(_data("cityscapes", root, "data.test.split=train"), train=False)
    assert len(ds) == len(pairs)
    for sample_index in (0, 3):
        sample = ds[sample_index]
        city_i = int(sample["path"].rsplit("_", 2)[-2])
        assert np.array_equal(sample["label"].numpy(), _train_ids(pairs[city_i][1]))  # paired by name, not order
    broken = tmp_path / "flat"
    (broken / "leftImg8bit" / "train").mkdir(parents=True)
    (broken / "gtFine" / "train").mkdir(parents=True)
    Image.open(pairs[0][0]).save(broken / "leftImg8bit" / "train" / "a.png")
    with pytest.raises(DataError, match="no images ending in '_leftImg8bit.png'"):
        build_seg_dataset(_data("cityscapes", broken, "data.test.split=train"), train=False)


def test_coco_stuff_layouts_and_their_label_conventions(synth_seg, tmp_path):
    root = tmp_path / "coco_stuff164k"
    (root / "images" / "train2017").mkdir(parents=True)
    (root / "annotations" / "train2017").mkdir(parents=True)
    pairs = list(_pairs(synth_seg))
    for img, lab in pairs:
        shutil.copy(img, root / "images" / "train2017" / img.name)
        Image.fromarray(_train_ids(lab)).save(root / "annotations" / "train2017" / f"{img.stem}_labelTrainIds.png")
    ds = build_seg_dataset(_data("coco_stuff164k", root, "data.test.split=train2017"), train=False)
    assert len(ds) == len(pairs)
    assert np.array_equal(ds[0]["label"].numpy(), _train_ids(pairs[0][1]))  # 0..170 kept, 255 ignored
    ten_k = _data("coco_stuff10k", root, "data.test.split=train2017")
    assert ten_k.reduce_zero_label  # the 10k maps are 1..171 with 0 ignored
    wrong = tmp_path / "no_suffix"
    shutil.copytree(synth_seg / "images", wrong / "images")
    shutil.copytree(synth_seg / "annotations", wrong / "annotations")
    with pytest.raises(DataError, match="ends in '_labelTrainIds.png'"):
        build_seg_dataset(_data("coco_stuff164k", wrong, "data.test.split=validation"), train=False)


def test_pascal_context_reads_its_split_files(synth_seg, tmp_path):
    root = tmp_path / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / sub).mkdir(parents=True)
    pairs = list(_pairs(synth_seg))
    for img, lab in pairs:
        shutil.copy(img, root / "JPEGImages" / img.name)
        shutil.copy(lab, root / "SegmentationClassContext" / lab.name)  # 0 = background (ignored), 1.. classes
    listed = [img.stem for img, _ in pairs[:5]]
    (root / "ImageSets/SegmentationContext/train.txt").write_text("\n".join(listed) + "\n")
    ds = build_seg_dataset(_data("pascal_context59", root), train=True)
    assert len(ds) == 5 and [p.stem for p, _ in ds.samples] == listed
    with pytest.raises(DataError, match=r"split file not found: .*val.txt"):
        build_seg_dataset(_data("pascal_context59", root), train=False)
    (root / "ImageSets/SegmentationContext/train.txt").write_text("nope_000\n")
    with pytest.raises(DataError, match="names 1 image.* missing from .*JPEGImages, e.g. nope_000.jpg"):
        build_seg_dataset(_data("pascal_context59", root), train=True)


def test_each_layout_composes_with_its_published_pipeline():
    city = compose("train", ["data=cityscapes"]).data
    assert (list(city.train.crop_size), list(city.test.stride), city.num_classes) == ([896, 896], [512, 512], 19)
    pc = compose("train", ["data=pascal_context59"]).data
    assert (list(pc.train.scale), list(pc.train.crop_size), list(pc.test.stride)) == (
        [520, 520],
        [480, 480],
        [320, 320],
    )
    assert compose("train", ["data=coco_stuff164k"]).data.num_classes == 171
