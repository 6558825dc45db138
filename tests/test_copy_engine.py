"""The copy engine: asynchronous chunked copies with events, bytes counted."""

import threading
import time

import pytest
import torch

from hosttier_helpers import make_tier  # noqa: F401  (fixture)
from lohan_compile.runtime import hosttier

MiB = 1 << 20

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def rand(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(make_tier, dtype):
    tier = make_tier(None, arena_bytes=4 * MiB, copy_chunk_bytes="64KiB")
    x = rand((333, 77), dtype)
    h = tier.empty_like(x)
    tier.copy_(h, x).wait()
    d = torch.empty_like(x)
    tier.copy_(d, h).wait()
    assert torch.equal(d, x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 48, 20).permute(2, 0, 1),  # dense, permuted: one span
        lambda: torch.randn(64, 48, 20)[:, 3:40, ::3],  # gaps: gathered
        lambda: torch.randn(100, 100).t()[5:95],  # dense rows of a transposed view
        lambda: torch.randn(7, 1, 5, 1)[:, :, ::2],  # size-1 dims
        lambda: torch.randn(0, 5),
        lambda: torch.tensor(3.5),
    ],
)
def test_layouts(make_tier, make):
    tier = make_tier(None, arena_bytes=4 * MiB, copy_chunk_bytes="4KiB")
    x = make()
    h, ev = tier.to_host(x)
    ev.wait()
    assert torch.equal(h, x)
    if x.numel():
        assert tier.location(h) == "host"
    d, ev = tier.to_device(h)
    ev.wait()
    assert torch.equal(d, x) and d.stride() == h.stride()


def test_copy_checks_arguments(make_tier):
    tier = make_tier(None)
    h = tier.empty((4, 4))
    with pytest.raises(ValueError, match="sizes differ"):
        tier.copy_(h, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="dtypes differ"):
        tier.copy_(h, torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        tier.copy_(torch.zeros(4, 8)[:, ::2], torch.zeros(4, 4).t())


def test_copies_progress_without_the_gil_or_a_wait(make_tier):
    """Copy threads never need the GIL: a copy finishes while Python spins."""
    tier = make_tier(None, arena_bytes=64 * MiB, copy_threads=1)
    x = torch.randn(16 * MiB // 4)
    h = tier.empty_like(x)
    ev = tier.copy_(h, x)
    deadline = time.monotonic() + 30
    spins = 0
    while not ev.query():  # holds the GIL between checks
        spins += 1
        assert time.monotonic() < deadline
    ev.wait()
    assert torch.equal(h, x)


def test_wait_releases_the_gil(make_tier):
    tier = make_tier(None, arena_bytes=256 * MiB, copy_threads=1, copy_chunk_bytes="1MiB")
    x = torch.randn(64 * MiB // 4)
    h = tier.empty_like(x)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        ev = tier.copy_(h, x)
        before = counter[0]
        ev.wait()
        during = counter[0] - before
    finally:
        stop.set()
        t.join()
    assert during > 0
    assert torch.equal(h, x)


def test_dropping_an_event_waits_for_its_copy(make_tier):
    tier = make_tier(None, arena_bytes=64 * MiB)
    x = torch.randn(8 * MiB // 4)
    h = tier.empty_like(x)
    tier.copy_(h, x)  # event dropped at once: must finish before x could be freed
    del x
    assert tier.stats().live_blocks == 1


def test_bytes_are_counted_by_direction(make_tier):
    tier = make_tier(None, arena_bytes=8 * MiB)
    x = torch.randn(1000, 250)  # 1,000,000 bytes
    before = hosttier.bytes_moved()
    s0 = tier.stats()
    h, ev = tier.to_host(x)
    ev.wait()
    d, ev = tier.to_device(h)
    ev.wait()
    h2 = tier.empty_like(h)
    tier.copy_(h2, h).wait()  # host -> host: neither direction
    after = hosttier.bytes_moved()
    s1 = tier.stats()
    assert after["d2h_bytes"] - before["d2h_bytes"] == 1_000_000
    assert after["h2d_bytes"] - before["h2d_bytes"] == 1_000_000
    assert s1.copy_d2h_bytes - s0.copy_d2h_bytes == 1_000_000
    assert s1.copy_other_bytes - s0.copy_other_bytes == 1_000_000


def test_closed_tier_refuses_work(make_tier):
    tier = make_tier(None)
    tier.close()
    assert tier.closed
    with pytest.raises(ValueError, match="closed"):
        tier.empty((4,))
