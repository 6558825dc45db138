import torch

from lohan_compile.measure import measure_device_peak


def test_peak_of_a_known_step():
    mb = 2**20

    def build():
        return {"w": torch.empty(mb, dtype=torch.uint8)}  # 1 MiB resident

    def step(state):
        a = torch.empty(4 * mb, dtype=torch.uint8)
        b = torch.empty(2 * mb, dtype=torch.uint8)
        del a
        c = torch.empty(1 * mb, dtype=torch.uint8)
        del b, c

    m = measure_device_peak(build, step, steps=2)
    assert m.start_bytes == mb  # the resident megabyte, allocated inside the session
    assert m.peak_bytes == mb + 6 * mb  # a and b together
    assert m.end_bytes == mb
    assert m.step_peaks == (7 * mb, 7 * mb)


def test_frees_of_blocks_allocated_before_the_session_are_ignored():
    before = torch.empty(8 * 2**20, dtype=torch.uint8)
    holder = [before]

    def step(_):
        holder.clear()  # frees a block the session never saw allocated
        x = torch.empty(2**20, dtype=torch.uint8)
        del x

    m = measure_device_peak(lambda: None, step, steps=1)
    assert m.peak_bytes == 2**20 and m.end_bytes == 0
