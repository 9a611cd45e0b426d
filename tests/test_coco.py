"""COCO data and evaluation: label mapping, crowd and empty images, bad annotations, COCOeval parity."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch

from adapterctl.data.coco import CocoDetection, LabelMap, load_coco
from adapterctl.engine.coco_eval import CocoEvaluator
from adapterctl.errors import DataError


@pytest.fixture(scope="module")
def synth_det(tmp_path_factory):
    from adapterctl.data.synthetic import write_det_dataset

    return write_det_dataset(tmp_path_factory.mktemp("synth_det"), n_train=30, n_val=12, seed=3)


def test_label_mapping_round_trip(synth_det):
    coco = load_coco(synth_det / "annotations" / "instances_val.json")
    labels = LabelMap.from_coco(coco)
    assert labels.cat_ids == [1, 3, 7, 12] and labels.names == ["disc", "square", "triangle", "ring"]
    for cat in labels.cat_ids:
        assert labels.to_cat(labels.to_label(cat)) == cat
    assert [labels.to_label(c) for c in labels.cat_ids] == [1, 2, 3, 4]  # 0 is the background


def test_crowd_and_empty_images(synth_det):
    ann = synth_det / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    crowd_imgs = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    empty = {i["id"] for i in data["images"]} - {a["image_id"] for a in data["annotations"]}
    assert crowd_imgs and empty, "the generator must make crowd regions and empty images"
    train = CocoDetection(synth_det / "train", ann, train=True)
    full = CocoDetection(synth_det / "train", ann, train=False)
    assert not empty & set(train.ids) and empty <= set(full.ids)  # empty: evaluation only
    idx = train.ids.index(sorted(crowd_imgs)[0])
    t_train, t_full = train[idx]["target"], full[full.ids.index(train.ids[idx])]["target"]
    assert (t_train["iscrowd"] == 0).all() and (t_full["iscrowd"] == 1).any()
    assert t_full["masks"].shape[0] == t_full["boxes"].shape[0]
    # polygons and RLE both decode: mask areas equal the annotated areas
    torch.testing.assert_close(t_full["masks"].sum((1, 2)).float(), t_full["area"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 10]), r"annotation \d+ of image \d+ .*has no area"),
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["images"][0].update(file_name="missing.jpg"), r"missing\.jpg\) not found"),
    ],
)
def test_bad_annotations_are_named_or_skipped(synth_det, tmp_path, mutate, message):
    data = json.loads((synth_det / "annotations" / "instances_val.json").read_text())
    first_img = data["annotations"][0]["image_id"]
    data["images"] = sorted(data["images"], key=lambda i: i["id"] != first_img)
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        CocoDetection(synth_det / "val", bad)
    lenient = CocoDetection(synth_det / "val", bad, on_bad_sample="skip")
    assert len(lenient.skipped) == 1 and len(lenient) == len(data["images"]) - 1
    # evaluation reads lenient.coco: the skipped image's objects must not count as missed there
    assert first_img not in lenient.coco.imgs and first_img not in lenient.coco.imgToAnns
    assert len(lenient.coco.imgs) == len(lenient)


def test_malformed_json_is_named(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match=r"x\.json: not valid JSON"):
        load_coco(tmp_path / "x.json")


def _noisy_predictions(ds, rng):
    """Ground truth with jitter, lower scores and false positives: a non-trivial AP."""
    out = []
    for i in range(len(ds)):
        s = ds[i]
        t = s["target"]
        keep = t["iscrowd"] == 0
        boxes = t["boxes"][keep] + torch.from_numpy(rng.normal(0, 3, (int(keep.sum()), 4))).float()
        shift = [int(v) for v in rng.integers(-3, 4, size=2)]
        masks = torch.roll(t["masks"][keep], shifts=shift, dims=(1, 2))
        scores = torch.from_numpy(rng.uniform(0.3, 1.0, len(boxes))).float()
        labels = t["labels"][keep]
        h, w = s["ori_size"]
        fp_box = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
        fp_mask = torch.zeros(1, h, w, dtype=torch.uint8)
        fp_mask[:, 10:50, 10:60] = 1
        out.append(
            (
                t["image_id"],
                torch.cat([boxes, fp_box]),
                torch.cat([scores, torch.tensor([0.2])]),
                torch.cat([labels, torch.tensor([1])]),
                torch.cat([masks, fp_mask]),
            )
        )
    return out


def test_evaluator_equals_direct_cocoeval_on_the_written_json(synth_det, tmp_path):
    from pycocotools.cocoeval import COCOeval

    ds = CocoDetection(synth_det / "val", synth_det / "annotations" / "instances_val.json")
    ev = CocoEvaluator(ds.coco, ds.labels)
    for args in _noisy_predictions(ds, np.random.default_rng(0)):
        ev.update(*args)
    results_file = tmp_path / "results.json"
    metrics = ev.compute(results_file)
    rows = json.loads(results_file.read_text())
    assert {r["category_id"] for r in rows} <= {1, 3, 7, 12} and all(len(r["bbox"]) == 4 for r in rows)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = load_coco(synth_det / "annotations" / "instances_val.json")
            direct = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
            direct.evaluate()
            direct.accumulate()
            direct.summarize()
        for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), direct.stats[:6], strict=True):
            got = metrics[f"{iou_type}_{name}"]
            assert (got is None and value < 0) or abs(got - 100 * value) < 1e-3, (iou_type, name, got, value)
    assert 20 < metrics["bbox_AP"] < 100 and 20 < metrics["segm_AP"] < 100


def test_perfect_predictions_score_100(synth_det, tmp_path):
    ds = CocoDetection(synth_det / "val", synth_det / "annotations" / "instances_val.json")
    ev = CocoEvaluator(ds.coco, ds.labels)
    for i in range(len(ds)):
        t = ds[i]["target"]
        keep = t["iscrowd"] == 0
        ev.update(t["image_id"], t["boxes"][keep], torch.ones(int(keep.sum())), t["labels"][keep], t["masks"][keep])
    metrics = ev.compute()
    assert metrics["bbox_AP"] > 99.0 and metrics["segm_AP"] > 99.0


def test_no_detections_gives_zero_not_a_crash(synth_det):
    ds = CocoDetection(synth_det / "val", synth_det / "annotations" / "instances_val.json")
    assert CocoEvaluator(ds.coco, ds.labels).compute()["bbox_AP"] == 0.0


def test_synthetic_writer_makes_polygons_and_rle(synth_det, tmp_path):
    data = json.loads((synth_det / "annotations" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
    assert kinds == {"list", "dict"}
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_cli_synth_det(tmp_path):
    from typer.testing import CliRunner

    from adapterctl.cli import app

    result = CliRunner().invoke(
        app, ["data", "synth", "--task", "det", "--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "2"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "d" / "annotations" / "instances_val.json").read_text())["images"]) == 2


def _sample_target(h=300, w=400):
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 10:60, 10:80] = 1
    masks[1, 200:290, 300:390] = 1
    masks[2, 100:150, 150:250] = 1
    return torch.rand(3, h, w) * 255, {
        "boxes": torch.tensor([[10.0, 10, 80, 60], [300, 200, 390, 290], [150, 100, 250, 150]]),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "area": torch.tensor([3500.0, 8100, 5000]),
        "masks": masks,
    }


def test_absolute_range_crop_drops_boxes_outside_and_crops_masks():
    from adapterctl.data.det_transforms import _crop

    image, target = _sample_target()
    for seed in range(20):
        img, out = _crop(image, target, 100, 150, np.random.default_rng(seed))
        h, w = img.shape[-2:]
        assert 100 <= h <= 150 and 100 <= w <= 150
        assert out["masks"].shape == (len(out["boxes"]), h, w)
        assert len(out["labels"]) == len(out["boxes"]) == len(out["area"])
        assert (out["boxes"][:, 2] > out["boxes"][:, 0]).all() and (out["boxes"][:, 3] > out["boxes"][:, 1]).all()
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()


def test_detr_3x_pipeline_is_seeded_and_bounded():
    from adapterctl.data.det_transforms import DetrTransform

    t = DetrTransform([[1333, s] for s in range(480, 801, 32)])
    image, target = _sample_target()
    shapes = set()
    for seed in range(12):
        img, out = t(image, target, np.random.default_rng(seed))
        again, out2 = t(image, target, np.random.default_rng(seed))
        assert torch.equal(img, again) and torch.equal(out["boxes"], out2["boxes"])
        assert max(img.shape[-2:]) <= 1024 and out["masks"].shape[-2:] == img.shape[-2:]
        shapes.add(tuple(img.shape[-2:]))
    assert len(shapes) > 3  # multi-scale: several output sizes


def test_3x_experiment_uses_the_detr_pipeline(synth_det):
    from adapterctl.config import compose
    from adapterctl.data.coco import build_det_dataset
    from adapterctl.data.det_transforms import DetrTransform

    cfg = compose(
        "train",
        [
            "experiment=coco_maskrcnn_vit_adapter_t_3x",
            "data.num_classes=4",  # the synthetic file's categories, not COCO's 80
            f"data.train.img_dir={synth_det / 'train'}",
            f"data.train.ann_file={synth_det / 'annotations' / 'instances_train.json'}",
        ],
    )
    ds = build_det_dataset(cfg.data, train=True)
    assert isinstance(ds.transform, DetrTransform)
    sample = ds[(0, 5)]
    assert sample["target"]["masks"].shape[-2:] == sample["image"].shape[-2:]


def test_training_filters_tiny_boxes_and_small_images(synth_det, tmp_path):
    data = json.loads((synth_det / "annotations" / "instances_val.json").read_text())
    first = data["annotations"][0]
    first["bbox"] = [first["bbox"][0], first["bbox"][1], 0.5, first["bbox"][3]]  # narrower than a pixel
    with_objects = {a["image_id"] for a in data["annotations"][1:] if not a["iscrowd"]}
    with_rle = {a["image_id"] for a in data["annotations"] if isinstance(a["segmentation"], dict)}
    # shrinking an image with an RLE would make the RLE's size wrong, a data error rather than a small image
    small = next(i for i in reversed(data["images"]) if i["id"] in with_objects - with_rle)
    small["width"] = 20  # a side under 32 px
    path = tmp_path / "filtered.json"
    path.write_text(json.dumps(data))
    train = CocoDetection(synth_det / "val", path, train=True)
    full = CocoDetection(synth_det / "val", path, train=False)
    assert small["id"] not in train.ids and small["id"] in full.ids
    if first["image_id"] in train.ids:
        target = train[train.ids.index(first["image_id"])]["target"]
        assert (target["boxes"][:, 2] - target["boxes"][:, 0] >= 1).all()
    eval_target = full[full.ids.index(first["image_id"])]["target"]
    assert len(eval_target["boxes"]) == sum(a["image_id"] == first["image_id"] for a in data["annotations"])


# A box of 10 x 20 pixels at rows 10-19, columns 5-24 of a 40 x 48 image, as an uncompressed (column-major) RLE:
# 5 empty columns and 10 rows, then 20 columns of 10 set and 30 clear pixels, then the remaining clear pixels
BOX_RUNS = [210] + [10, 30] * 19 + [10, 20 + 23 * 40]


def _write_tiny_coco(root, mutate=None):
    """Three 40 x 48 images with one box annotation each: a polygon, a compressed RLE, an uncompressed RLE."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    mask = np.zeros((40, 48), np.uint8)
    mask[10:20, 5:25] = 1
    segmentations = [
        [[5.0, 10.0, 25.0, 10.0, 25.0, 20.0, 5.0, 20.0]],
        {"size": [40, 48], "counts": mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")},
        {"size": [40, 48], "counts": BOX_RUNS},
    ]
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 5, "name": "blob"}]}
    for i, (name, seg) in enumerate(zip(("a.png", "b.png", "c.png"), segmentations, strict=True), start=1):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(root / name)
        data["images"].append({"id": i, "file_name": name, "height": 40, "width": 48})
        data["annotations"].append(
            {
                "id": 10 + i,
                "image_id": i,
                "category_id": 1,
                "bbox": [5, 10, 20, 10],
                "area": 200.0,
                "iscrowd": 0,
                "segmentation": seg,
            }
        )
    if mutate is not None:
        mutate(data)
    ann_file = root / "tiny.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def _assert_skipped(ds, img_id: int, ann_id: int, message: str) -> None:
    """Left out of the samples and of the ground truth that evaluation reads, and reported."""
    assert img_id not in ds.ids and img_id not in ds.coco.imgs and ann_id not in ds.coco.anns
    assert len(ds.skipped) == 1 and re.search(message, ds.skipped[0])


def test_tiny_coco_decodes_polygon_and_both_rle_forms_alike(tmp_path):
    ds = CocoDetection(tmp_path, _write_tiny_coco(tmp_path), num_classes=2)
    assert ds.ids == [1, 2, 3] and not ds.skipped
    masks = [ds[i]["target"]["masks"][0] for i in range(3)]
    assert masks[1].sum() == 200 and torch.equal(masks[1], masks[2])
    assert (masks[0] != masks[1]).sum() <= 30  # the polygon rasterises its right and bottom edges too


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([[5.0, 10.0, 25.0, 10.0]], r"polygon 0 has 4 coordinates; a polygon needs at least 3 points"),
        ([5.0, 10.0, 25.0, 10.0, 25.0, 20.0], r"segmentation must be a list of polygons"),
    ],
)
def test_polygon_with_under_3_points_is_named_or_skipped(tmp_path, segmentation, message):
    ann_file = _write_tiny_coco(tmp_path, lambda d: d["annotations"][0].update(segmentation=segmentation))
    where = r"tiny\.json: annotation 11 of image 1 \(a\.png\): "
    with pytest.raises(DataError, match=where + message):
        CocoDetection(tmp_path, ann_file)
    _assert_skipped(CocoDetection(tmp_path, ann_file, on_bad_sample="skip"), 1, 11, where + message)


@pytest.mark.parametrize(("index", "ann_id", "name"), [(1, 12, "b"), (2, 13, "c")])  # compressed, uncompressed
def test_rle_of_another_size_than_its_image_is_named_or_skipped(tmp_path, index, ann_id, name):
    ann_file = _write_tiny_coco(tmp_path, lambda d: d["annotations"][index]["segmentation"].update(size=[48, 40]))
    message = (
        rf"tiny\.json: annotation {ann_id} of image {index + 1} \({name}\.png\): "
        r"RLE size \[48, 40\] differs from the image's \[height, width\] \[40, 48\]"
    )
    with pytest.raises(DataError, match=message):
        CocoDetection(tmp_path, ann_file)
    _assert_skipped(CocoDetection(tmp_path, ann_file, on_bad_sample="skip"), index + 1, ann_id, message)


def test_annotation_of_no_image_is_named_or_skipped(tmp_path):
    def add_orphan(d):
        d["annotations"].append({**d["annotations"][0], "id": 20, "image_id": 99})

    ann_file = _write_tiny_coco(tmp_path, add_orphan)
    message = r"tiny\.json: annotation 20 has image_id 99, which is not in 'images'"
    with pytest.raises(DataError, match=message):
        CocoDetection(tmp_path, ann_file)
    ds = CocoDetection(tmp_path, ann_file, on_bad_sample="skip")
    assert ds.ids == [1, 2, 3] and 20 not in ds.coco.anns and 99 not in ds.coco.imgToAnns
    assert len(ds.skipped) == 1 and re.search(message, ds.skipped[0])


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])  # a file-level fault: never skipped
def test_repeated_image_id_always_raises(tmp_path, on_bad_sample):
    ann_file = _write_tiny_coco(tmp_path, lambda d: d["images"][2].update(id=1))
    message = r"tiny\.json: image id 1 is repeated in 'images' \(a\.png and c\.png\); ids must be unique"
    with pytest.raises(DataError, match=message):
        CocoDetection(tmp_path, ann_file, on_bad_sample=on_bad_sample)


def test_repeated_category_id_raises(tmp_path):
    ann_file = _write_tiny_coco(tmp_path, lambda d: d["categories"][1].update(id=1))
    with pytest.raises(DataError, match=r"tiny\.json: category id 1 is repeated in 'categories' \(box and blob\)"):
        load_coco(ann_file)


def test_num_classes_must_match_the_categories(tmp_path):
    from omegaconf import OmegaConf

    from adapterctl.data.coco import build_det_dataset

    ann_file = _write_tiny_coco(tmp_path)
    split = {"img_dir": str(tmp_path), "ann_file": str(ann_file), "scales": [[64, 48]]}
    data = OmegaConf.create({"num_classes": 80, "train": split, "test": split, "on_bad_sample": "skip"})
    message = r"tiny\.json: 2 categories, but num_classes is 80 \(data\.num_classes in the config"
    with pytest.raises(DataError, match=message):
        build_det_dataset(data, train=False)
    data.num_classes = 2
    assert len(build_det_dataset(data, train=False)) == 3


def test_max_dets_are_mmdets_ap_at_100_the_rest_at_1000(synth_det):
    """With more than 100 detections per image, AP counts the best 100 and AP50 / APs.. up to 1000, as mmdet's
    maxDets (100, 300, 1000) make pycocotools do; pycocotools' own (1, 10, 100) would cut AP50 at 100 too."""
    ds = CocoDetection(synth_det / "val", synth_det / "annotations" / "instances_val.json")
    runs = {}
    for max_dets in ((100, 300, 1000), (1, 10, 100)):
        ev = CocoEvaluator(ds.coco, ds.labels, iou_types=("bbox",), max_dets=max_dets)
        for i in range(len(ds)):
            t = ds[i]["target"]
            keep = t["iscrowd"] == 0
            gt_boxes, gt_labels = t["boxes"][keep], t["labels"][keep]
            classes = gt_labels.unique()  # 150 better-scored misses of each class, then the true boxes
            junk = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(150 * len(classes), 1)
            ev.update(
                t["image_id"], torch.cat([junk, gt_boxes]),
                torch.cat([torch.full((len(junk),), 0.9), torch.full((len(gt_boxes),), 0.5)]),
                torch.cat([classes.repeat_interleave(150), gt_labels]),
            )  # fmt: skip
        runs[max_dets] = ev.compute()
    mm, plain = runs[(100, 300, 1000)], runs[(1, 10, 100)]
    assert mm["bbox_AP"] == plain["bbox_AP"] == 0.0  # the true boxes rank beyond 100
    assert mm["bbox_AP50"] > 0.5 and plain["bbox_AP50"] == 0.0
