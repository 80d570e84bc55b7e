"""Shared fixtures: the real data beside the repo (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("LEAKSEG_DATA")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d}")
    return d


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch deterministic and modest on the 2-core CI machine."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
