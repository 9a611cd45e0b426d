from __future__ import annotations

import os

# Triton kernels run on CPU tensors through Triton's interpreter in the suite (read when kernels are decorated,
# so before anything imports them); TRITON_INTERPRET=0 runs them on a GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]

# Two cores: keep torch from oversubscribing when pytest-xdist runs workers side by side.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def official_tiny() -> dict:
    # tensors, plain containers and a TorchVersion in its meta: weights_only reads it safely
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return torch.load(FIXTURES / "official_vit_adapter_tiny.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_kwargs() -> dict:
    """A small ViT-Adapter for shape/gradient tests (64-d, 4 blocks, 4 interactions)."""
    return dict(
        img_size=32,
        embed_dim=64,
        depth=4,
        num_heads=2,
        drop_path_rate=0.1,
        conv_inplane=8,
        deform_num_heads=2,
        deform_ratio=0.5,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
    )


TINY_MODEL = [
    "model.embed_dim=64",
    "model.depth=4",
    "model.num_heads=2",
    "model.deform_num_heads=2",
    "model.conv_inplane=8",
    "model.interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]",
    "model.img_size=64",
    "model.drop_path_rate=0.0",
    "head.decode.channels=16",
    "head.auxiliary.channels=8",
]


@pytest.fixture(scope="session")
def synth_seg(tmp_path_factory) -> Path:
    """A tiny ADE20K-format dataset written by the synthetic generator."""
    from adapterctl.data.synthetic import write_seg_dataset

    return write_seg_dataset(tmp_path_factory.mktemp("synth_seg"), n_train=8, n_val=3, seed=1, size_range=(64, 100))


def tiny_train_overrides(data_root: Path, out_dir: Path, **trainer) -> list[str]:
    t = {
        "max_iters": 4,
        "batch_size": 2,
        "num_workers": 0,
        "log_interval": 1,
        "eval_interval": 100,
        "checkpoint_interval": 2,
        "amp": "none",
        "device": "cpu",
        **trainer,
    }
    return [
        *TINY_MODEL,
        f"data.root={data_root}",
        "data.train.crop_size=[64,64]",
        "data.train.scale=[256,64]",
        "data.test.scale=[256,64]",
        f"paths.output_dir={out_dir}",
        "optim.lr=1e-3",
        "schedule.warmup_iters=2",
        *[f"trainer.{k}={v}" for k, v in t.items()],
    ]


@pytest.fixture(scope="session")
def synth_det(tmp_path_factory) -> Path:
    """A tiny COCO-format dataset written by the synthetic generator."""
    from adapterctl.data.synthetic import write_det_dataset

    return write_det_dataset(
        tmp_path_factory.mktemp("synth_det_train"), n_train=10, n_val=4, seed=2, size_range=(96, 128)
    )


def tiny_det_overrides(data_root: Path, out_dir: Path, **trainer) -> list[str]:
    t = {
        "max_iters": 3,
        "batch_size": 2,
        "num_workers": 0,
        "log_interval": 1,
        "eval_interval": 100,
        "checkpoint_interval": 100,
        "amp": "none",
        "device": "cpu",
        **trainer,
    }
    return [
        "head=maskrcnn",
        "data=synthetic_det",
        f"data.root={data_root}",
        *[o for o in TINY_MODEL if not o.startswith("head.")],
        "model.vit_feature_mode=final",
        "model.window_attn=[true,false,true,false]",
        "model.window_size=[2,null,2,null]",
        "head.fpn_channels=32",
        "head.representation_size=64",
        "head.mask_channels=16",
        "data.train.scales=[[256,128]]",
        "data.test.scales=[[256,128]]",
        f"paths.output_dir={out_dir}",
        "optim.lr=1e-3",
        "schedule=step_1x",
        "schedule.warmup_iters=1",
        "schedule.milestones=[2]",
        *[f"trainer.{k}={v}" for k, v in t.items()],
    ]


def torchrun_train(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m adapterctl train ...`` on CPU (gloo), one thread each."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "adapterctl",
        "train",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
