"""The C++ extension: built on first use, cached, with clear errors; its op is right."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lohan_compile.ops import fingerprint

MASK = (1 << 64) - 1
K1, K2, K3 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89)


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & MASK


def reference_fingerprint(data: bytes) -> int:
    """The algorithm csrc/fingerprint.cpp documents, in plain Python."""
    lanes = list(SEEDS)
    n = len(data)
    padded = data + b"\0" * (-n % 32)
    for block in range(0, len(padded), 32):
        for i in range(4):
            w = int.from_bytes(padded[block + 8 * i: block + 8 * i + 8], "little")
            lanes[i] = (rotl(lanes[i] ^ ((w * K1) & MASK), 27) * K2) & MASK
    h = ((n * K3) & MASK) ^ lanes[0] ^ rotl(lanes[1], 16) ^ rotl(lanes[2], 32) ^ rotl(lanes[3], 48)
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & MASK
    h ^= h >> 31
    return h


@pytest.mark.parametrize("n", [0, 1, 7, 31, 32, 33, 64, 1000, 4099])
def test_fingerprint_matches_reference(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    t = torch.from_numpy(data)
    assert fingerprint(t) == reference_fingerprint(data.tobytes())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_fingerprint_sees_every_byte(dtype):
    t = torch.zeros(257, dtype=dtype)
    base = fingerprint(t)
    assert fingerprint(t.clone()) == base
    raw = t.view(torch.uint8)
    for pos in (0, raw.numel() // 2, raw.numel() - 1):
        changed = raw.clone()
        changed[pos] ^= 1
        assert fingerprint(changed) != base


def test_fingerprint_refuses_non_contiguous():
    with pytest.raises(RuntimeError, match="contiguous"):
        fingerprint(torch.zeros(4, 4).t())


def test_fingerprint_opcheck_and_under_compile():
    t = torch.randn(33)
    torch.library.opcheck(torch.ops.lohan.fingerprint.default, (t,))

    @torch.compile(backend="lohan", fullgraph=True)
    def f(x):
        return torch.ops.lohan.fingerprint(x * 2)

    assert int(f(t)) & MASK == fingerprint(t * 2)


def test_missing_compiler_gives_a_clear_error(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = (
        "import lohan_compile.ext as e\n"
        "try:\n"
        "    e.load()\n"
        "except e.ExtensionBuildError as err:\n"
        "    print('ERR', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERR no C++ compiler found" in out.stdout, out.stdout + out.stderr
    assert "apt install g++" in out.stdout
