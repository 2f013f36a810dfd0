import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (STYLE.md: reset between compiles)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
