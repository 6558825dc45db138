"""Host arenas: invariants under random alloc/free sequences, budget, stats, and
the promise that host-tier memory never comes from the c10 allocator."""

import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hosttier_helpers import allocation_events, make_tier  # noqa: F401  (fixture)
from lohan_compile import HostMemoryError
from lohan_compile.runtime.hosttier import HostTier

MiB = 1 << 20
ALIGN = 4096


def round_up(n: int, a: int = ALIGN) -> int:
    return max(a, (n + a - 1) // a * a)


class ArenaMachine(RuleBasedStateMachine):
    """Random allocations and frees against a small budget: blocks never overlap,
    are aligned, and the statistics are exactly the sum of what is live."""

    BUDGET = 6 * MiB

    def __init__(self):
        super().__init__()
        self.tier = HostTier(self.BUDGET, arena_bytes=2 * MiB, copy_threads=1)
        self.live: dict[int, tuple[torch.Tensor, int]] = {}
        self.next_id = 0
        self.refused = 0

    @rule(size=st.one_of(st.integers(0, 64 * 1024), st.integers(64 * 1024, 3 * MiB)))
    def alloc(self, size):
        before = self.tier.stats()
        try:
            t = self.tier.empty((size,), torch.uint8)
        except HostMemoryError:
            # refused only when it really cannot fit: not in any free block and
            # a new arena would pass the budget
            after = self.tier.stats()
            assert after.largest_free_bytes < round_up(size)
            assert after.reserved_bytes + round_up(size) > self.BUDGET
            assert after.failed_allocs == before.failed_allocs + 1
            self.refused += 1
            return
        if size:
            # the bytes are really ours: write the block's first and last byte
            t[0] = 1
            t[-1] = 2
        self.live[self.next_id] = (t, size)
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        key = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[key]

    @rule()
    def trim(self):
        before = self.tier.stats()
        released = self.tier.trim()
        assert self.tier.stats().reserved_bytes == before.reserved_bytes - released

    @invariant()
    def books_balance(self):
        s = self.tier.stats()
        sized = list(self.live.values())  # a 0-byte tensor holds one granule too
        assert s.live_blocks == len(sized)
        assert s.in_use_bytes == sum(round_up(n) for _, n in sized)
        assert s.requested_bytes == sum(n for _, n in sized)
        assert s.reserved_bytes == s.in_use_bytes + s.free_bytes
        assert s.reserved_bytes <= self.BUDGET
        assert s.peak_in_use_bytes >= s.in_use_bytes
        assert s.largest_free_bytes <= s.free_bytes
        assert 0.0 <= s.fragmentation <= 1.0
        addr = [t.untyped_storage().data_ptr() for t, _ in sized]  # data_ptr() is 0 when empty
        ranges = sorted((a, a + round_up(n)) for a, (_, n) in zip(addr, sized))
        for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
            assert a1 <= b0, "two live blocks overlap"
        for start, _ in ranges:
            assert start % ALIGN == 0
        self.tier.check()

    def teardown(self):
        self.live.clear()
        gc.collect()
        s = self.tier.stats()
        assert s.in_use_bytes == 0 and s.live_blocks == 0 and s.requested_bytes == 0
        # everything is free again, in one block per arena (coalesced)
        assert s.free_blocks == s.arenas
        self.tier.trim()
        assert self.tier.stats().reserved_bytes == 0
        self.tier.close()


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 300_000), min_size=1, max_size=30), order=st.randoms())
def test_memory_returned_and_coalesced(sizes, order):
    tier = HostTier(None, arena_bytes=MiB, copy_threads=1)
    try:
        blocks = [tier.empty((n,), torch.uint8) for n in sizes]
        s = tier.stats()
        assert s.in_use_bytes == sum(round_up(n) for n in sizes)
        order.shuffle(blocks)
        while blocks:
            blocks.pop()
            tier.check()
        s = tier.stats()
        assert s.in_use_bytes == 0 and s.live_blocks == 0
        assert s.frees == s.allocs == len(sizes)
        assert s.free_blocks == s.arenas  # fully coalesced: one free block per arena
        if s.arenas == 1:
            assert s.fragmentation == 0.0
        tier.trim()
        assert tier.stats().reserved_bytes == 0
    finally:
        tier.close()


def test_views_keep_the_block(make_tier):
    tier = make_tier(None, arena_bytes=MiB)
    t = tier.empty((256, 256), torch.float32)
    v = t[10:20].view(-1)
    del t
    assert tier.stats().live_blocks == 1
    v.fill_(3.0)
    del v
    assert tier.stats().live_blocks == 0


def test_large_request_gets_its_own_arena(make_tier):
    tier = make_tier("64MiB", arena_bytes=MiB)
    t = tier.empty((5 * MiB + 1,), torch.uint8)
    s = tier.stats()
    assert s.arenas == 1 and s.reserved_bytes == round_up(5 * MiB + 1)
    assert t.data_ptr() % ALIGN == 0
    del t
    assert tier.trim() == round_up(5 * MiB + 1)


def test_budget_refuses_and_says_what_to_do(make_tier):
    tier = make_tier("4MiB", arena_bytes=MiB)
    keep = [tier.empty((MiB,), torch.uint8) for _ in range(4)]
    with pytest.raises(HostMemoryError) as info:
        tier.empty((1,), torch.uint8)
    msg = str(info.value)
    assert "host_memory_budget" in msg and "4.00 MiB" in msg and "ssd_dir" in msg
    assert isinstance(info.value, MemoryError)
    del keep[0]
    tier.empty((MiB,), torch.uint8)  # fits again once a block is back


def test_budget_trims_empty_arenas_to_fit(make_tier):
    # two empty 2 MiB arenas cannot hold 3 MiB, but unmapping them makes room
    tier = make_tier("4MiB", arena_bytes=2 * MiB)
    a, b = tier.empty((2 * MiB,), torch.uint8), tier.empty((2 * MiB,), torch.uint8)
    del a, b
    big = tier.empty((3 * MiB,), torch.uint8)
    assert tier.stats().arenas == 1
    del big


def test_peak_and_reset(make_tier):
    tier = make_tier(None, arena_bytes=MiB)
    a = tier.empty((3 * ALIGN,), torch.uint8)
    b = tier.empty((5 * ALIGN,), torch.uint8)
    del a
    s = tier.stats()
    assert s.peak_in_use_bytes == 8 * ALIGN and s.in_use_bytes == 5 * ALIGN
    tier.reset_peak()
    assert tier.stats().peak_in_use_bytes == 5 * ALIGN
    del b


def test_fragmentation_is_measured(make_tier):
    tier = make_tier(None, arena_bytes=16 * ALIGN)
    blocks = [tier.empty((ALIGN,), torch.uint8) for _ in range(16)]
    for i in range(0, 16, 2):
        blocks[i] = None  # free every other block: 8 holes of one granule
    s = tier.stats()
    assert s.free_bytes == 8 * ALIGN and s.largest_free_bytes == ALIGN
    assert s.fragmentation == pytest.approx(1 - 1 / 8)
    blocks.clear()
    assert tier.stats().fragmentation == 0.0


def test_alignment_option(make_tier):
    tier = make_tier(None, arena_bytes=4 * MiB, alignment=1 << 16)
    ts = [tier.empty((n,), torch.uint8) for n in (1, 70_000, 5)]
    assert all(t.data_ptr() % (1 << 16) == 0 for t in ts)
    with pytest.raises(ValueError, match="power of two"):
        HostTier(None, alignment=1000)


def test_host_memory_is_not_from_the_c10_allocator(make_tier):
    """The profiler's allocator events must see device-tier bytes only."""
    from torch.profiler import ProfilerActivity, profile

    tier = make_tier(None, arena_bytes=8 * MiB)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        h = tier.empty((1 << 20,), torch.float32)  # 4 MiB host tier
        h.fill_(1.0)
        d = torch.empty(3 * 1000 * 1000, dtype=torch.uint8)  # 3 MB device tier
        del h, d
    sizes = [size for size, _ in allocation_events(prof) if size > 0]
    assert 3_000_000 in sizes
    assert not any(s >= 4 * MiB for s in sizes), sizes
