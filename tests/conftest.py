import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py

from lohan_compile import settings  # noqa: E402
from lohan_compile.runtime.step import TRACKER  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each test compiles from scratch, checks graphs after every pass, and sees its own steps."""
    torch._dynamo.reset()
    TRACKER.reset()
    with settings.DEBUG.override(True):
        yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
