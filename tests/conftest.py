import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test process unless a test says otherwise (2 cores; threads fight)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("AVLINK_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
