"""Fixtures and helpers shared by the host-tier tests (imported by them, not a conftest)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_tier():
    """HostTier factory; every tier made is closed at the end of the test."""
    from lohan_compile.runtime.hosttier import HostTier

    made = []

    def make(*args, **kwargs):
        tier = HostTier(*args, **kwargs)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


@pytest.fixture
def ssd_dir(tmp_path):
    d = tmp_path / "ssd"
    d.mkdir()
    return d


def run_python(code: str, *, timeout: float = 120, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Runs a snippet in a fresh interpreter with this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def popen_python(code: str, **popen) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def allocation_events(prof) -> list[tuple[int, int]]:
    """(alloc_size, thread id) of every c10 allocator event a profile saw (frees are negative)."""
    import torch

    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == torch._C._profiler._EventType.Allocation:
            out.append((ev.extra_fields.alloc_size, ev.start_tid))
    return out
