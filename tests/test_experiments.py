"""Reproduction experiments: every paper row is listed with its released hyperparameters and starts."""

from __future__ import annotations

import functools
import json
import subprocess

import pytest
from typer.testing import CliRunner

from adapterctl.cli import app

from .conftest import REPO

runner = CliRunner()


@functools.cache
def _listed_rows() -> tuple[dict, ...]:
    """``adapterctl experiments --json`` (composes every row: ~10 s on a slow CPU), run once for this module."""
    result = runner.invoke(app, ["experiments", "--json"])
    assert result.exit_code == 0, result.output
    return tuple(json.loads(result.output))


ROWS = {  # configs-and-results.md §3.1: lr, weight decay, layer decay, drop path, img size, SS / MS mIoU
    "ade20k_upernet_vit_adapter_t": (1.2e-4, 0.01, 0.95, 0.1, 224, 42.6, 43.6),
    "ade20k_upernet_vit_adapter_s": (6e-5, 0.01, 0.95, 0.2, 224, 46.2, 47.1),
    "ade20k_upernet_vit_adapter_b": (6e-5, 0.01, 0.95, 0.3, 224, 48.8, 49.7),
    "ade20k_upernet_vit_adapter_t_augreg": (1.2e-4, 0.01, 0.95, 0.1, 224, 43.9, 44.8),
    "ade20k_upernet_vit_adapter_b_augreg": (2e-5, 0.01, 1.0, 0.3, 384, 51.9, 52.5),
    "ade20k_upernet_vit_adapter_l_augreg": (2e-5, 0.05, 0.95, 0.4, 384, 53.4, 54.4),
}


def test_experiments_json_lists_every_paper_row_with_its_hyperparameters():
    rows = {r["name"]: r for r in _listed_rows()}
    for name, (lr, wd, ld, dpr, img, ss, ms) in ROWS.items():
        r = rows[name]
        assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"], r["img_size"]) == (
            lr,
            wd,
            ld,
            dpr,
            img,
        ), name
        assert (r["paper"]["mIoU_ss"], r["paper"]["mIoU_ms"]) == (ss, ms)
        assert r["batch"] == "8x2" and r["crop"] == "512x512" and r["max_iters"] == 160000
        assert r["test"] == "slide [512, 512]/[341, 341]"
    assert rows["ade20k_upernet_vit_adapter_l_augreg"]["with_cp"] is True
    assert rows["ade20k_upernet_vit_adapter_b"]["deform_ratio"] == 0.5


def test_experiments_table_prints():
    result = runner.invoke(app, ["experiments"])
    assert result.exit_code == 0 and "42.6 / 43.6" in result.output


def test_makefile_has_a_target_per_row():
    for name in ROWS:
        dry = subprocess.run(["make", "-n", name, "GPUS=2"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        assert f"--nproc_per_node 2 -m adapterctl train experiment={name}" in dry.stdout


def test_a_paper_row_starts_and_stops_on_missing_weights(tmp_path, monkeypatch):
    """Without the pretrained file the run stops at once, naming it (no GPU, no ADE20K here)."""
    monkeypatch.setenv("ADAPTERCTL_PRETRAINED", str(tmp_path / "weights"))
    result = runner.invoke(
        app,
        [
            "train",
            "experiment=ade20k_upernet_vit_adapter_t",
            "trainer.device=cpu",
            "trainer.amp=none",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    assert result.exit_code == 1
    assert "deit_tiny_patch16_224-a1311bcf.pth" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # a run that cannot start writes nothing


COCO_ROWS = {  # configs-and-results.md §3.3: lr, weight decay, layer decay, drop path, box / mask AP
    "coco_maskrcnn_vit_adapter_t_1x": (2e-4, 0.01, 1.0, 0.1, 41.1, 37.5),
    "coco_maskrcnn_vit_adapter_t_3x": (1e-4, 0.05, 1.0, 0.1, 46.0, 41.0),
    "coco_maskrcnn_vit_adapter_s_1x": (1e-4, 0.05, 1.0, 0.2, 44.7, 39.9),
    "coco_maskrcnn_vit_adapter_s_3x": (1e-4, 0.05, 1.0, 0.2, 48.2, 42.8),
    "coco_maskrcnn_vit_adapter_b_1x": (1e-4, 0.05, 1.0, 0.3, 47.0, 41.8),
    "coco_maskrcnn_vit_adapter_b_3x": (1e-4, 0.05, 1.0, 0.3, 49.6, 43.6),
    "coco_maskrcnn_vit_adapter_l_1x": (1e-4, 0.05, 0.8, 0.4, 48.7, 43.3),
    "coco_maskrcnn_vit_adapter_l_3x": (1e-4, 0.05, 0.8, 0.4, 52.1, 46.0),
}


def test_coco_rows_listed_with_released_hyperparameters():
    from adapterctl.config import compose

    rows = {r["name"]: r for r in _listed_rows()}
    for name, (lr, wd, ld, dpr, box, mask) in COCO_ROWS.items():
        r = rows[name]
        assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"]) == (lr, wd, ld, dpr), name
        assert (r["paper"]["box_ap"], r["paper"]["mask_ap"]) == (box, mask)
        cfg = compose("train", [f"experiment={name}"])
        assert cfg.task == "detection" and cfg.head.name == "maskrcnn" and cfg.model.vit_feature_mode == "final"
        global_blocks = [i for i, on in enumerate(cfg.model.window_attn) if not on]
        assert global_blocks == ([5, 11, 17, 23] if "_l_" in name else [2, 5, 8, 11])
        assert cfg.schedule.name == "step" and list(cfg.optim.no_decay_keys) == [
            "level_embed",
            "pos_embed",
            "norm",
            "bias",
        ]
        scales = [tuple(s) for s in cfg.data.train.scales]
        assert scales == ([(1333, 800)] if name.endswith("1x") else [(1333, s) for s in range(480, 801, 32)])
    dry = subprocess.run(
        ["make", "-n", "coco_maskrcnn_vit_adapter_t_1x", "GPUS=2"], cwd=REPO, capture_output=True, text=True
    )
    assert "experiment=coco_maskrcnn_vit_adapter_t_1x" in dry.stdout


CASCADE_ROWS = {  # configs-and-results.md "Other detectors": drop path, box / mask AP, #Param (M)
    "coco_cascade_maskrcnn_vit_adapter_s_3x": (0.2, 51.5, 44.3, 86),
    "coco_cascade_maskrcnn_vit_adapter_b_3x": (0.3, 52.1, 44.8, 158),
}


def test_cascade_rows_carry_the_official_settings():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    rows = {r["name"]: r for r in _listed_rows()}
    for name, (dpr, box, mask, params) in CASCADE_ROWS.items():
        r = rows[name]
        assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"]) == (1e-4, 0.05, 1.0, dpr)
        assert (r["paper"]["box_ap"], r["paper"]["mask_ap"], r["batch"], r["amp"]) == (box, mask, "8x2", "fp16")
        cfg = compose("train", [f"experiment={name}"])
        assert cfg.head.name == "cascade_maskrcnn" and cfg.model.vit_feature_mode == "final"
        assert [i for i, on in enumerate(cfg.model.window_attn) if not on] == [2, 5, 8, 11]
        assert [tuple(s) for s in cfg.data.train.scales] == [(1333, s) for s in range(480, 801, 32)]
        assert cfg.data.train.pipeline == "3x" and cfg.trainer.max_iters == 263880
        with torch.device("meta"):
            model = build_model(cfg)
        assert type(model).__name__ == "AdapterCascadeMaskRCNN"
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params) < 0.5, name
        dry = subprocess.run(["make", "-n", name, "GPUS=2"], cwd=REPO, capture_output=True, text=True)
        assert f"experiment={name}" in dry.stdout, dry.stderr


def test_htc_row_carries_the_official_settings():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    rows = {r["name"]: r for r in _listed_rows()}
    name = "coco_htc_vit_adapter_l_augreg_3x"
    r = rows[name]
    assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"]) == (1e-4, 0.05, 0.9, 0.4)
    assert (r["paper"]["box_ap"], r["paper"]["mask_ap"], r["batch"], r["amp"], r["with_cp"]) == (
        56.6, 49.0, "16x1", "none", True
    )  # fmt: skip
    cfg = compose("train", [f"experiment={name}"])
    assert (cfg.head.name, cfg.head.semantic_classes, cfg.head.max_per_img, cfg.head.score_thresh) == (
        "htc", 183, 300, 0.001
    )  # fmt: skip
    assert cfg.head.extra_attention_heads == 32 and cfg.head.extra_attention_drop_path == 0.4
    assert cfg.data.train.pipeline == "range" and [list(s) for s in cfg.data.train.scales] == [
        [1600, 400],
        [1600, 1400],
    ]
    assert cfg.data.train.semantic_dir.endswith("stuffthingmaps/train2017")
    assert [list(s) for s in cfg.data.test.scales] == [[1600, 1400]] and cfg.model.img_size == 384
    assert [i for i, on in enumerate(cfg.model.window_attn) if not on] == [5, 11, 17, 23]
    with torch.device("meta"):
        model = build_model(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 401) < 1.0
    dry = subprocess.run(["make", "-n", name, "GPUS=8", "NNODES=2"], cwd=REPO, capture_output=True, text=True)
    assert f"experiment={name}" in dry.stdout, dry.stderr
    assert list(cfg.optim.no_decay_keys) == []  # the HTC++ configs: LayerDecayOptimizerConstructor, no custom keys


@pytest.mark.parametrize(
    ("name", "weights", "box", "mask"),
    [("coco_htc_beit_adapter_l_3x", "beit_large_patch16_224_pt22k_ft22k.pth", 58.4, 50.8),
     ("coco_htc_beitv2_adapter_l_3x", "beitv2_large_patch16_224_pt1k_ft21k.pth", 58.8, 51.1)],
)  # fmt: skip
def test_htc_beit_rows_run_the_detection_copy_of_beit(name, weights, box, mask):
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    cfg = compose("train", [f"experiment={name}"])
    assert (cfg.paper.box_ap, cfg.paper.mask_ap, cfg.model.family, cfg.model.layout) == (
        box, mask, "beit_adapter", "detection"
    )  # fmt: skip
    assert cfg.model.pretrained.endswith(weights) and cfg.model.drop_path_rate == 0.4 and cfg.model.init_values == 1e-6
    assert [i for i, s in enumerate(cfg.model.window_size) if s == 56] == [5, 11, 17, 23] and all(cfg.model.window_attn)
    assert (cfg.head.extra_attention_drop_path, cfg.head.max_per_img, cfg.optim.layer_decay_rate) == (0.3, 100, 0.9)
    with torch.device("meta"):
        model = build_model(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 401) < 1.0
    dry = subprocess.run(["make", "-n", name], cwd=REPO, capture_output=True, text=True)
    assert f"experiment={name}" in dry.stdout, dry.stderr


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def test_rows_are_differences_from_their_base():
    """A row names its base (``_coco_maskrcnn``, ``_ade20k_upernet``...) and sets only what differs from it."""
    import yaml

    from adapterctl.config import CONFIG_DIR

    folder = CONFIG_DIR / "experiment"
    for path in sorted(folder.glob("[!_]*.yaml")):
        row = yaml.safe_load(path.read_text())
        bases = [d for d in row.get("defaults", []) if isinstance(d, str) and d.startswith("_")]
        for base in bases:
            shared = dict(_leaves(yaml.safe_load((folder / f"{base}.yaml").read_text())))
            repeated = {k: v for k, v in _leaves(row) if k in shared and shared[k] == v}
            assert not repeated, (path.name, base, repeated)
        if path.stem.startswith(("coco_", "ade20k_")):
            assert bases, f"{path.name} should build on a shared base"


M2F_ROWS = {  # the official BEiT-Adapter-L + Mask2Former configs: data, img/crop, queries, iterations, GPUs x
    # batch, test stride, SS / MS mIoU
    "ade20k_mask2former_beit_adapter_l_640": ("ade20k", 640, 100, 160000, "8x2", 426, 58.3, 59.0),
    "ade20k_mask2former_beit_adapter_l_896": ("ade20k", 896, 200, 80000, "16x1", 512, 59.4, 60.5),
    "ade20k_mask2former_beitv2_adapter_l_896": ("ade20k", 896, 200, 80000, "16x1", 512, 61.2, 61.5),
    "cocostuff164k_mask2former_beit_adapter_l_896": ("coco_stuff164k", 896, 200, 80000, "16x1", 512, 51.7, 52.0),
    "cocostuff164k_mask2former_beitv2_adapter_l_896": ("coco_stuff164k", 896, 200, 80000, "16x1", 512, 52.3, None),
    "cocostuff10k_mask2former_beit_adapter_l_512": ("coco_stuff10k", 512, 100, 40000, "8x2", 341, 53.2, 54.2),
    "cityscapes_mask2former_beit_adapter_l_896": ("cityscapes", 896, 100, 80000, "16x1", 512, 84.9, 85.8),
    "pascal_context59_mask2former_beit_adapter_l_480": ("pascal_context59", 480, 100, 40000, "8x2", 320, 67.8, 68.2),
}


def test_mask2former_rows_carry_the_official_settings():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    rows = {r["name"]: r for r in _listed_rows()}
    for name, (data, img, queries, iters, batch, stride, ss, ms) in M2F_ROWS.items():
        r = rows[name]
        assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"]) == (2e-5, 0.05, 0.9, 0.3)
        assert (r["img_size"], r["crop"], r["max_iters"], r["batch"]) == (img, f"{img}x{img}", iters, batch), name
        assert r["test"] == f"slide [{img}, {img}]/[{stride}, {stride}]", name
        assert (r["paper"]["mIoU_ss"], r["paper"]["mIoU_ms"]) == (ss, ms), name
        cfg = compose("train", [f"experiment={name}"])
        assert (cfg.data.name, cfg.head.name, cfg.head.decode.num_queries) == (data, "mask2former", queries)
        with torch.device("meta"):  # the full 568M-parameter model, without allocating it
            model = build_model(cfg)
        # the README's #Param (568M at 100 queries, 571M at 200 or with a 896 rel-pos window); the 512 and 480 rows
        # say 568M too, though their smaller relative-position tables make 567.4M / 567.1M (0.9M / 1.1M fewer)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - float(cfg.paper.params.rstrip("M"))) < 1.0, (name, count)
    v2 = compose("train", ["experiment=ade20k_mask2former_beitv2_adapter_l_896"])
    assert v2.model.pretrained.endswith("beitv2_large_patch16_224_pt1k_ft21k.pth")
    assert v2.load_from.endswith("mask2former_beitv2_adapter_large_896_80k_cocostuff164k.safetensors")


def test_makefile_has_a_target_per_mask2former_row():
    for name in M2F_ROWS:
        dry = subprocess.run(["make", "-n", name, "GPUS=2"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        assert f"--nproc_per_node 2 -m adapterctl train experiment={name}" in dry.stdout


MORE_BEIT_ROWS = {  # data, head, img/crop, iterations, GPUs x batch, stride, lr, layer decay, drop path, SS / MS
    "cocostuff10k_mask2former_beit_adapter_b_512":
        ("coco_stuff10k", "mask2former", 512, 40000, "8x2", 341, 3e-5, 0.95, 0.2, 50.0, 50.5),
    "pascal_context59_mask2former_beit_adapter_b_480":
        ("pascal_context59", "mask2former", 480, 40000, "8x2", 320, 3e-5, 0.95, 0.2, 64.0, 64.4),
    "cocostuff10k_upernet_beit_adapter_l_512":
        ("coco_stuff10k", "upernet", 512, 80000, "8x2", 341, 2e-5, 0.9, 0.3, 51.0, 51.4),
    "cocostuff164k_upernet_beit_adapter_l_640":
        ("coco_stuff164k", "upernet", 640, 80000, "8x2", 426, 2e-5, 0.9, 0.3, 50.5, 50.7),
    "pascal_context59_upernet_beit_adapter_l_480":
        ("pascal_context59", "upernet", 480, 80000, "8x2", 320, 2e-5, 0.9, 0.3, 67.0, 67.5),
}  # fmt: skip


def test_the_other_beit_rows_carry_the_official_settings():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    rows = {r["name"]: r for r in _listed_rows()}
    for name, (data, head, img, iters, batch, stride, lr, ld, dpr, ss, ms) in MORE_BEIT_ROWS.items():
        r = rows[name]
        assert (r["lr"], r["weight_decay"], r["layer_decay_rate"], r["drop_path_rate"]) == (lr, 0.05, ld, dpr), name
        assert (r["img_size"], r["crop"], r["max_iters"], r["batch"]) == (img, f"{img}x{img}", iters, batch), name
        assert r["test"] == f"slide [{img}, {img}]/[{stride}, {stride}]", name
        assert (r["paper"]["mIoU_ss"], r["paper"]["mIoU_ms"]) == (ss, ms), name
        cfg = compose("train", [f"experiment={name}"])
        assert (cfg.data.name, cfg.head.name) == (data, head), name
        with torch.device("meta"):
            count = sum(p.numel() for p in build_model(cfg).parameters()) / 1e6
        assert abs(count - float(cfg.paper.params.rstrip("M"))) < 1.0, (name, count)
    b = compose("train", ["experiment=cocostuff10k_mask2former_beit_adapter_b_512"])
    assert (b.model.embed_dim, b.model.depth, b.head.decode.ffn_channels, b.head.decode.enc_ffn_channels) == (
        768, 12, 2048, 1024,
    )  # fmt: skip
    for name in MORE_BEIT_ROWS:
        dry = subprocess.run(["make", "-n", name, "GPUS=2"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0 and f"train experiment={name}" in dry.stdout, dry.stderr


def test_recipes_beyond_the_paper_name_their_source_and_claim_no_number():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    rows = {r["name"]: r for r in _listed_rows()}
    for name, vit, frozen in (
        ("ade20k_upernet_dinov2_adapter_l_512", "vit_large_patch14_dinov2", False),
        ("ade20k_mask2former_dinov2_adapter_l_896_frozen", "vit_large_patch14_dinov2", True),
        ("ade20k_mask2former_dinov3_adapter_l_896_frozen", "vit_large_patch16_dinov3", True),
    ):
        r = rows[name]
        assert r["paper_result"] == "not a paper row" and r["recipe_source"] and not r["paper"], name
        cfg = compose("train", [f"experiment={name}"])
        assert (cfg.model.vit, cfg.model.freeze_vit or False) == (vit, frozen)
        with torch.device("meta"):
            model = build_model(cfg)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(n.startswith("backbone.vit.") for n in trainable) != frozen, name
    dinov3 = compose("train", ["experiment=ade20k_mask2former_dinov3_adapter_l_896_frozen"])
    assert list(dinov3.data.test.stride) == [596, 596] and list(dinov3.data.test.aug_ratios)[0] == 0.9


def test_htc_o365_row_carries_its_fine_tuning_config():
    import torch

    from adapterctl.config import compose
    from adapterctl.models.build import build_model

    name = "coco_htc_beitv2_adapter_l_o365"
    cfg = compose("train", [f"experiment={name}"])
    assert (cfg.paper.box_ap, cfg.paper.mask_ap, cfg.paper.gpus, cfg.trainer.batch_size) == (61.8, 53.0, 32, 2)
    assert cfg.load_from.endswith("htc++_beitv2_adapter_large_fpn_o365.safetensors")
    assert (cfg.head.fpn_norm_groups, cfg.head.box_norm, cfg.head.box_loss) == (32, True, "giou")
    assert (cfg.optim.layer_decay_rate, cfg.optim.grad_clip, cfg.trainer.max_iters) == (0.8, 0.1, 20000)
    assert list(cfg.schedule.milestones) == [] and cfg.schedule.warmup_iters == 500
    assert cfg.model.drop_path_rate == 0.3 and cfg.head.extra_attention_drop_path == 0.3 and cfg.model.with_cp
    assert [list(s) for s in cfg.data.train.scales] == [[2000, 600], [2000, 1600]]
    assert [list(s) for s in cfg.data.test.scales] == [[2000, 1000]]
    with torch.device("meta"):
        model = build_model(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 401) < 1.0
    assert isinstance(model.roi_heads.bbox_head[0].shared_convs[0].bn, torch.nn.BatchNorm2d)
    dry = subprocess.run(["make", "-n", name], cwd=REPO, capture_output=True, text=True)
    assert f"experiment={name}" in dry.stdout, dry.stderr
