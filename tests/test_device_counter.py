import torch

from lohan_compile.measure import measure_device_peak
from lohan_compile.runtime import device


def test_counts_live_bytes_and_peak():
    device.install()
    base = device.allocated()
    a = torch.empty(1000, dtype=torch.uint8)
    assert device.allocated() == base + 1000 and device.counted(a)
    device.reset_peak()
    b = torch.empty(5000, dtype=torch.uint8)
    del b
    c = torch.empty(300, dtype=torch.uint8)
    assert device.peak() == base + 1000 + 5000
    assert device.allocated() == base + 1300
    del a, c
    assert device.allocated() == base


def test_views_share_the_block_and_resize_is_counted():
    device.install()
    base = device.allocated()
    t = torch.empty(256, dtype=torch.float32)
    v = t.view(16, 16)
    assert device.counted(v) and device.allocated() == base + 1024
    t.untyped_storage().resize_(0)
    assert device.allocated() == base
    t.untyped_storage().resize_(2048)
    assert device.allocated() == base + 2048


def test_profiler_still_sees_allocations():
    device.install()
    m = measure_device_peak(lambda: None, lambda _: torch.empty(2**20, dtype=torch.uint8), steps=1)
    assert m.peak_bytes == 2**20


def test_a_storage_made_before_the_counter_is_adopted_with_its_bytes():
    device.install()
    base = device.allocated()
    with device.paused():  # as if made before the counter was installed
        t = torch.arange(1000, dtype=torch.float32)
    view = t[10:20]
    assert not device.counted(t) and device.allocated() == base
    assert device.adopt(t) and device.counted(t) and device.counted(view)
    assert device.allocated() == base + 4000
    assert t.equal(torch.arange(1000, dtype=torch.float32)) and view[0] == 10  # same bytes, same storage
    assert not device.adopt(t)  # counted already
    t.untyped_storage().resize_(0)  # what streaming does between uses: counted both ways
    assert device.allocated() == base
    t.untyped_storage().resize_(4000)
    assert device.allocated() == base + 4000
    del t, view
    assert device.allocated() == base
    numpy_backed = torch.from_numpy(__import__("numpy").ones(10, dtype="float32"))  # outside c10
    assert device.adopt(numpy_backed) and device.allocated() == base + 40
    assert numpy_backed.sum() == 10
