"""Fixtures of the framework-integration tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def no_create_graph_warning() -> Iterator[None]:
    """Fail on torch's create_graph reference-cycle warning: the helpers hide it (only
    inside their backward)."""
    # torch warns once per process; warn_always makes every such backward warn again.
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            yield
    finally:
        torch.set_warn_always(was)
    messages = [str(w.message) for w in record]
    assert not any("create_graph=True" in m for m in messages), messages
