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
