import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _release_models():
    """A compiled disk-backed model owns a cache with a prefetch thread; free it (and its
    files) when its test ends, not whenever the garbage collector next runs, so that later
    tests that count threads or fds see none of it."""
    yield
    torch._dynamo.reset()
    gc.collect()
