from __future__ import annotations

import os
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
