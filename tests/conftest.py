import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (STYLE.md: reset between compiles) and draws
    the same random numbers whatever ran before it, so a failure reproduces alone."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
