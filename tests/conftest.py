"""Fixtures shared across the test folders."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and steady on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
