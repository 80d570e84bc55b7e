"""Tiny models train faster on one thread (and do not fight other jobs for the 2 CI cores)."""

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
