import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py

from lohan_compile import settings  # noqa: E402
from lohan_compile.runtime.step import TRACKER  # noqa: E402

TEST_EXECUTOR = os.environ.get("LOHAN_TEST_EXECUTOR", "fx")


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each test compiles from scratch, checks graphs after every pass, and sees its own steps.

    Tests run the fx executor unless they name another (an Inductor compile costs tens of
    seconds on 2 cores): those marked ``inductor`` pass ``executor="inductor"`` themselves.
    ``LOHAN_TEST_EXECUTOR=inductor`` runs the others under Inductor too (to look for crashes:
    their bitwise comparisons with eager then fail by design)."""
    torch._dynamo.reset()
    TRACKER.reset()
    tier = _current_tier()
    with settings.DEBUG.override(True), settings.EXECUTOR.override(TEST_EXECUTOR):
        yield
    torch._dynamo.reset()
    # a test that compiled with host_memory_budget or ssd_dir made its tier the process's current
    # one: the next test gets the one before (its SSD folder may be gone, or a tmpfs unmounted)
    now = _current_tier()
    if now is not None and (tier is None or now._obj is not tier._obj):
        from lohan_compile.runtime import hosttier

        hosttier.set_current(tier)


def _current_tier():
    from lohan_compile import ext

    if not ext._loaded:
        return None
    from lohan_compile.runtime import hosttier

    return hosttier.current_if_set()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
