import json

import pytest
import torch

from lohan_compile import hardware
from lohan_compile.hardware import HardwareProfile


def test_presets_are_plausible():
    for name in ("rtx4090", "a100", "h100", "lohan-testbed"):
        p = hardware.preset(name)
        assert p.matmul_flops > 1e13 and p.memory_bandwidth > 5e11
        assert 1e10 < p.h2d_bandwidth < 1e11 and p.device_memory >= 24 * 2**30
        assert p.compute_slowdown == {} and p.queue_slowdown == {}  # a GPU's engines are independent
    testbed = hardware.preset("lohan-testbed")
    assert testbed.ssd_count == 12 and testbed.host_memory == 256 * 10**9
    assert hardware.preset("h100").h2d_bandwidth > hardware.preset("a100").h2d_bandwidth  # PCIe 5 vs 4


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="Did you mean 'rtx4090'"):
        hardware.preset("rtx4900")


def test_json_round_trip():
    p = hardware.preset("lohan-testbed")
    assert HardwareProfile.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_measure_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "_measured", {})
    calls = []
    real = hardware.measure
    monkeypatch.setattr(hardware, "measure", lambda: calls.append(1) or real(quick=True))
    p = hardware.auto()
    assert p.matmul_flops > 1e8 and p.memory_bandwidth > 1e8 and p.h2d_bandwidth > 1e8
    assert all(v >= 0 for v in p.compute_slowdown.values())
    assert hardware.cache_path().exists()
    monkeypatch.setattr(hardware, "_measured", {})
    assert hardware.auto() == p and calls == [1]  # read back from the cache, not measured again
    assert hardware.resolve("auto") == p and hardware.resolve("a100") is hardware.A100


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_is_measured_for_graphs_on_the_gpu():
    """hardware="auto" on a GPU graph plans with the GPU's speeds, not the CPU's."""
    gpu = hardware.measure_cuda(quick=True)
    assert gpu.matmul_flops > 1e12 and gpu.h2d_bandwidth > 1e9 and gpu.d2h_bandwidth > 1e9
    assert gpu.device_memory == torch.cuda.get_device_properties(0).total_memory
    assert not gpu.compute_slowdown  # copy engines do not slow compute
