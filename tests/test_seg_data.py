"""ADE20K-format data: label reduction, the train/test transforms, and the bad-data messages."""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from adapterctl.data.ade20k import SegmentationFolder, load_label
from adapterctl.data.images import load_image
from adapterctl.data.transforms import EvalTransform, TrainTransform, pad_to, random_crop_box, rescale_size
from adapterctl.errors import DataError


def _write_pair(root, split, name, label: np.ndarray, image: np.ndarray | None = None):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    img = image if image is not None else np.full((*label.shape, 3), 100, np.uint8)
    Image.fromarray(img).save(root / "images" / split / f"{name}.jpg")
    Image.fromarray(label.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")


def test_reduce_zero_label(tmp_path):
    label = np.array([[0, 1, 2], [150, 3, 0]], np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "l.png")
    out = load_label(tmp_path / "l.png", reduce_zero_label=True, num_classes=150)
    assert out.tolist() == [[255, 0, 1], [149, 2, 255]]
    assert load_label(tmp_path / "l.png", reduce_zero_label=False, num_classes=151).tolist() == label.tolist()


def test_label_out_of_range_names_the_file(tmp_path):
    label = np.array([[1, 9], [3, 200]], np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png: label values \[9, 200\] outside the 8 classes"):
        load_label(tmp_path / "bad.png", reduce_zero_label=True, num_classes=8)


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path):
    for i in range(3):
        _write_pair(tmp_path, "training", f"img{i}", np.ones((40, 40), np.uint8))
    (tmp_path / "images" / "training" / "img1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    strict = SegmentationFolder(tmp_path, "training", num_classes=8)
    with pytest.raises(DataError, match=r"img1\.jpg: cannot read image"):
        strict[1]
    lenient = SegmentationFolder(tmp_path, "training", num_classes=8, on_bad_sample="skip")
    sample = lenient[1]
    assert sample["index"] == 2 and len(sample["skipped"]) == 1 and "img1.jpg" in sample["skipped"][0]


def test_missing_annotation_and_missing_folder(tmp_path):
    _write_pair(tmp_path, "training", "a", np.ones((40, 40), np.uint8))
    _write_pair(tmp_path, "training", "b", np.ones((40, 40), np.uint8))
    (tmp_path / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) have no annotation.*b\.jpg"):
        SegmentationFolder(tmp_path, "training", num_classes=8)
    ds = SegmentationFolder(tmp_path, "training", num_classes=8, on_bad_sample="skip")
    assert len(ds) == 1 and "no annotation" in ds.skipped[0]
    with pytest.raises(DataError, match="dataset folder not found: .*validation"):
        SegmentationFolder(tmp_path, "validation", num_classes=8)


RAMP16 = np.linspace(0, 65535, 32 * 40).round().astype(np.uint16).reshape(32, 40)


@pytest.mark.parametrize(("dtype", "name", "mode"), [("<u2", "grey16.png", "I;16"), (">u2", "grey16.tif", "I;16B")])
def test_16bit_grey_image_is_scaled_not_clipped(tmp_path, dtype, name, mode):
    Image.fromarray(RAMP16.astype(dtype)).save(tmp_path / name)
    with Image.open(tmp_path / name) as im:
        assert im.mode == mode
    got = load_image(tmp_path / name)
    want = torch.from_numpy(RAMP16 * (255 / 65535)).float()
    assert got.shape == (3, 32, 40) and torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    assert (got[0] - want).abs().max() <= 1  # convert("RGB") alone would clip ~all of them to 255
    assert got[0, 0, 0] == 0 and got[0, -1, -1] == 255


def test_32bit_integer_image_is_scaled_as_16bit_or_refused(tmp_path):
    Image.fromarray(RAMP16.astype(np.int32)).save(tmp_path / "int32.tif")  # mode I
    got = load_image(tmp_path / "int32.tif")
    assert (got[0] - torch.from_numpy(RAMP16 * (255 / 65535)).float()).abs().max() <= 1
    wide = RAMP16.astype(np.int32)
    wide[0, 1] = 70000
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide\.tif: 32-bit integer image \(mode I\) has values 0\.\.70000, outside"):
        load_image(tmp_path / "wide.tif")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_48bit_rgb_png_keeps_the_high_byte(tmp_path):
    # Pillow cannot write 16-bit-per-channel RGB, so build the PNG by hand: colour type 2, bit depth 16
    rgb = np.stack([RAMP16, RAMP16[::-1], np.full_like(RAMP16, 40000)], axis=-1).astype(">u2")
    h, w = RAMP16.shape
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
    (tmp_path / "rgb48.png").write_bytes(png + _png_chunk(b"IEND", b""))
    got = load_image(tmp_path / "rgb48.png")
    want = torch.from_numpy(rgb.astype(np.float64) * (255 / 65535)).permute(2, 0, 1).float()
    assert got.shape == (3, h, w) and (got - want).abs().max() <= 1


def test_float_image_is_refused_by_name(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "depth.tif")  # mode F
    with pytest.raises(DataError, match=r"depth\.tif: floating-point image \(mode F\) has no defined 0-255 scale"):
        load_image(tmp_path / "depth.tif")


def test_rescale_size_matches_mmcv():
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)
    assert rescale_size(2000, 300, (2048, 512)) == (2048, 307)


def test_pad_values_mean_image_and_ignored_label():
    img = torch.zeros(3, 20, 30)
    label = torch.zeros(20, 30, dtype=torch.uint8)
    mean = (1.0, 2.0, 3.0)
    pimg, plab = pad_to(img, label, (32, 32), mean)
    assert pimg.shape == (3, 32, 32) and plab.shape == (32, 32)
    assert pimg[:, 20:, :].reshape(3, -1).unique(dim=1).tolist() == [[1.0], [2.0], [3.0]]
    assert (plab[20:] == 255).all() and (plab[:, 30:] == 255).all() and (plab[:20, :30] == 0).all()


def test_cat_max_ratio_crop_prefers_mixed_boxes():
    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # a thin stripe of class 1: most boxes are > 75 % class 0
    rng = np.random.default_rng(0)
    boxes = [random_crop_box(label, (20, 20), 0.75, rng) for _ in range(50)]
    mixed = [b for b in boxes if len(np.unique(label[b[0] : b[1], b[2] : b[3]])) > 1]
    assert len(mixed) > 25  # without the ratio check about 1 box in 8 would be mixed
    no_check = [random_crop_box(label, (20, 20), 1.0, np.random.default_rng(i)) for i in range(50)]
    assert sum(len(np.unique(label[b[0] : b[1], b[2] : b[3]])) > 1 for b in no_check) < 20


def test_train_transform_is_a_function_of_the_seed():
    img = torch.rand(3, 90, 120) * 255
    label = torch.randint(0, 5, (90, 120), dtype=torch.uint8)
    t = TrainTransform(scale=(256, 64), ratio_range=(0.5, 2.0), crop_size=(64, 64))
    a = t(img, label, np.random.default_rng(7))
    b = t(img, label, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 64, 64) and a[1].shape == (64, 64)
    assert a[0].min() >= 0 and a[0].max() <= 255


def test_test_transform_resizes_up_to_multiple_of_32():
    out = EvalTransform((2048, 512), 32)(torch.rand(3, 375, 500) * 255)
    assert out.shape == (3, 512, 704)  # 512 x 683 -> ResizeToMultiple(32)


def test_synthetic_dataset_is_ade20k_format(synth_seg):
    ds = SegmentationFolder(synth_seg, "training", num_classes=8)
    assert len(ds) == 8
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for _, p in ds.samples])
    assert labels.max() <= 8 and (labels == 0).any() and len(np.unique(labels)) >= 6
    assert (synth_seg / "images" / "validation").is_dir()


def test_dataset_copy_with_bad_label_value_fails_in_getitem(synth_seg, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_seg, root)
    target = sorted((root / "annotations" / "training").glob("*.png"))[0]
    arr = np.asarray(Image.open(target)).copy()
    arr[0, 0] = 42
    Image.fromarray(arr, mode="L").save(target)
    ds = SegmentationFolder(root, "training", num_classes=8)
    with pytest.raises(DataError, match=f"{target.name}: label values \\[42\\]"):
        ds[0]
