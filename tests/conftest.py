"""Test-suite wide settings."""

from collections.abc import Iterator

import pytest
import torch

# Small matrices on a 2-core machine: intra-op threads only add contention (a 64x64
# matmul measured 2000x slower with 2 threads while another process was busy).
torch.set_num_threads(1)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test with float64 as the default dtype (ground-truth comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
