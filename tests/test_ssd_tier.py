"""The SSD tier: bit-exact round trips, private files, cleanup after crashes,
shared folders, and every error made real (no mocks)."""

import os
import re
import signal
import stat
import subprocess

import pytest
import torch

from hosttier_helpers import make_tier, popen_python, run_python, ssd_dir  # noqa: F401  (fixtures)
from lohan_compile import HostMemoryError, StorageError
from lohan_compile.runtime import hosttier
from lohan_compile.runtime.hosttier import HostTier

MiB = 1 << 20
KiB = 1 << 10

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]
# byte sizes around the 4096 granule and the 64 KiB I/O chunk used below
NBYTES = [0, 1, 7, 4095, 4096, 4097, 65535, 65536, 65537, 3 * 65536 + 123, 1_000_003]


def bytes_of(dtype, nbytes):
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = nbytes // itemsize
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8)
    return raw.view(dtype)


def ssd_round_trip(tier, x):
    token = tier.empty_like(x, where="ssd")
    assert tier.location(token) == "ssd"
    tier.copy_(token, x).wait()
    back = torch.empty_like(x)
    tier.copy_(back, token).wait()
    return back


@pytest.mark.parametrize("direct_io", ["auto", False])
def test_round_trips_bit_exact(make_tier, ssd_dir, direct_io):
    tier = make_tier(None, ssd_dir=ssd_dir, ssd_chunk_bytes="64KiB", direct_io=direct_io)
    for dtype in DTYPES:
        for nbytes in NBYTES:
            x = bytes_of(dtype, nbytes)
            back = ssd_round_trip(tier, x)
            assert torch.equal(back.view(torch.uint8), x.view(torch.uint8)), (dtype, nbytes)
    s = tier.stats()
    assert s.ssd_failed_ios == 0 and s.ssd_live_blocks == 0
    tier.check()


def test_host_blocks_go_to_and_from_ssd_in_place(make_tier, ssd_dir):
    """A host block is aligned and padded, so direct I/O needs no staging copy."""
    tier = make_tier(None, ssd_dir=ssd_dir, ssd_chunk_bytes="64KiB")
    x = torch.randn(12345)
    h = tier.empty_like(x)
    h.copy_(x)
    token = tier.empty_like(x, where="ssd")
    tier.copy_(token, h).wait()
    h2 = tier.empty_like(x)
    tier.copy_(h2, token).wait()
    assert torch.equal(h2, x)


def test_direct_io_is_reported(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir)
    info = tier.ssd
    assert info.direct_io and info.io_mode.startswith("direct")
    buffered = make_tier(None, ssd_dir=ssd_dir, direct_io=False)
    assert not buffered.ssd.direct_io and "buffered" in buffered.ssd.io_mode


def test_private_folder_and_files(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir, ssd_files=3)
    info = tier.ssd
    name = os.path.basename(info.folder)
    assert re.fullmatch(r"lohan-ssd-[0-9a-f]{32}", name)  # 128 random bits
    st = os.lstat(info.folder)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert len(info.files) == 3
    for f in info.files + (os.path.join(info.folder, "lock"),):
        assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600
    other = make_tier(None, ssd_dir=ssd_dir)
    assert other.ssd.folder != info.folder


def test_spill_when_budget_is_full(make_tier, ssd_dir):
    tier = make_tier("1MiB", arena_bytes="1MiB", ssd_dir=ssd_dir)
    xs = [torch.randn(100_000) for _ in range(5)]  # 400 KB each: two fit in 1 MiB
    hs = []
    for x in xs:
        h, ev = tier.to_host(x)
        ev.wait()
        hs.append(h)
    where = [tier.location(h) for h in hs]
    assert where == ["host", "host", "ssd", "ssd", "ssd"]
    assert all(h.data_ptr() == 0 for h in hs[2:])  # no host memory behind SSD blocks
    s = tier.stats()
    assert s.reserved_bytes <= MiB and s.ssd_live_blocks == 3
    for x, h in zip(xs, hs):
        d, ev = tier.to_device(h)
        ev.wait()
        assert torch.equal(d, x)
    del h
    hs.clear()
    s = tier.stats()
    assert s.ssd_in_use_bytes == 0 and s.in_use_bytes == 0


def test_non_dense_tensor_spills(make_tier, ssd_dir):
    tier = make_tier("64KiB", arena_bytes="64KiB", ssd_dir=ssd_dir)
    x = torch.randn(200, 300)[:, ::3]  # 80 KB, over the 64 KiB budget
    h, ev = tier.to_host(x)
    ev.wait()
    assert tier.location(h) == "ssd" and h.is_contiguous()
    d, ev = tier.to_device(h)
    ev.wait()
    assert torch.equal(d, x)


def test_files_removed_on_close_and_on_normal_exit(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir)
    folder = tier.ssd.folder
    ssd_round_trip(tier, torch.randn(1000))
    tier.close()
    assert not os.path.exists(folder)
    out = run_python(
        f"""
        import torch
        from lohan_compile.runtime.hosttier import HostTier
        t = HostTier(None, ssd_dir={str(ssd_dir)!r})
        tok = t.empty((1000,), where="ssd")
        t.copy_(tok, torch.randn(1000)).wait()
        print(t.ssd.folder)
        # no close(): a normal interpreter exit removes the files
        """
    )
    assert not os.path.exists(out.stdout.strip())
    assert sorted(os.listdir(ssd_dir)) == [".lohan-ssd.lock"]


def test_crashed_run_is_cleaned_at_start(ssd_dir):
    proc = popen_python(
        f"""
        import os, signal, sys, torch
        from lohan_compile.runtime.hosttier import HostTier
        t = HostTier(None, ssd_dir={str(ssd_dir)!r})
        tok = t.empty((100000,), where="ssd")
        t.copy_(tok, torch.randn(100000)).wait()
        print(t.ssd.folder, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    stale = out.strip()
    assert os.path.isdir(stale) and os.listdir(stale)
    tier = HostTier(None, ssd_dir=ssd_dir)  # cleans at start
    try:
        assert not os.path.exists(stale)
        assert os.path.isdir(tier.ssd.folder)
    finally:
        tier.close()


def test_cleanup_function_counts_stale_folders(ssd_dir):
    # a folder whose creator died before locking it, and one whose lock is free
    (ssd_dir / ("lohan-ssd-" + "0" * 32)).mkdir(mode=0o700)
    dead = ssd_dir / ("lohan-ssd-" + "1" * 32)
    dead.mkdir(mode=0o700)
    (dead / "lock").write_text("12345\n")
    (dead / "data-0").write_bytes(b"x" * 100)
    foreign = ssd_dir / "someone-elses-folder"
    foreign.mkdir()
    assert hosttier.cleanup_stale(ssd_dir) == 2
    assert sorted(os.listdir(ssd_dir)) == [".lohan-ssd.lock", "someone-elses-folder"]


def test_two_live_runs_share_a_folder(make_tier, ssd_dir):
    other = popen_python(
        f"""
        import sys, torch
        from lohan_compile.runtime.hosttier import HostTier
        t = HostTier(None, ssd_dir={str(ssd_dir)!r})
        x = torch.arange(100000, dtype=torch.float32)
        tok = t.empty_like(x, where="ssd")
        t.copy_(tok, x).wait()
        print(t.ssd.folder, flush=True)
        sys.stdin.readline()          # stay alive while the other run works
        back = torch.empty_like(x)
        t.copy_(back, tok).wait()
        assert torch.equal(back, x)
        print("ok", flush=True)
        """
    )
    try:
        their_folder = other.stdout.readline().strip()
        assert os.path.isdir(their_folder), other.stderr.read()
        before = sorted(os.listdir(their_folder))
        # this run starts (and cleans) while the other is live, works, and closes
        mine = make_tier(None, ssd_dir=ssd_dir)
        assert hosttier.cleanup_stale(ssd_dir) == 0
        ssd_round_trip(mine, torch.randn(50000))
        mine.close()
        assert sorted(os.listdir(their_folder)) == before
        # a second tier in this process, sharing the folder with a live one
        a = make_tier(None, ssd_dir=ssd_dir)
        b = make_tier(None, ssd_dir=ssd_dir)
        x = torch.randn(30000)
        assert torch.equal(ssd_round_trip(a, x), x) and torch.equal(ssd_round_trip(b, x), x)
        b.close()
        assert os.path.isdir(a.ssd.folder)
        out, err = other.communicate("go\n", timeout=120)
        assert "ok" in out, err
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


# ---- errors, made real --------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StorageError, match="does not exist") as info:
        HostTier(None, ssd_dir=missing)
    assert f"mkdir -p {missing}" in str(info.value)
    assert info.value.errno == 2


def test_path_is_a_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(StorageError, match="is not a folder"):
        HostTier(None, ssd_dir=f)


def test_unwritable_folder():
    # sysfs refuses new files even to root; no permission bits involved
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys/kernel here")
    with pytest.raises(StorageError, match="cannot write in ssd_dir") as info:
        HostTier(None, ssd_dir="/sys/kernel")
    assert "Choose an ssd_dir" in str(info.value) or "choose another" in str(info.value)


def test_read_only_filesystem(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(StorageError, match="Read-only file system"):
            HostTier(None, ssd_dir=mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


FSIZE_SCRIPT = """
import resource, signal, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))
from lohan_compile import StorageError
from lohan_compile.runtime.hosttier import HostTier
t = HostTier("1MiB", arena_bytes="1MiB", ssd_dir={dir!r}, ssd_files=1, preallocate={pre})
xs = [torch.randn(250_000) for _ in range(4)]   # 1 MB each: the 3rd SSD block passes 2 MiB
kept = []
try:
    for x in xs:
        h, ev = t.to_host(x)
        kept.append(h)
        ev.wait()
    print("no error")
except StorageError as e:
    print("StorageError", e.errno, e)
    t.check()
    print("stats ok", t.stats().ssd_failed_ios)
"""


@pytest.mark.parametrize("preallocate", [True, False])
def test_file_size_limit(ssd_dir, preallocate):
    """A full disk, made real with RLIMIT_FSIZE: with preallocation the swap_out
    itself fails; without, the write fails and its wait raises."""
    out = run_python(FSIZE_SCRIPT.format(dir=str(ssd_dir), pre=preallocate)).stdout
    assert "StorageError 27" in out, out  # EFBIG
    assert "file-size limit" in out and "ulimit -f" in out
    if preallocate:
        assert "cannot reserve" in out
    else:
        assert "writing" in out and "stats ok 1" in out


def test_no_space_on_a_small_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for preallocate in (True, False):
            t = HostTier("1MiB", arena_bytes="1MiB", ssd_dir=mnt, ssd_files=1, preallocate=preallocate)
            kept = []
            try:
                with pytest.raises(StorageError, match="No space left") as info:
                    for _ in range(6):
                        h, ev = t.to_host(torch.randn(250_000))
                        kept.append(h)
                        ev.wait()
                assert info.value.errno == 28 and "larger disk" in str(info.value)
            finally:
                kept.clear()
                t.close()
        assert os.listdir(mnt) == [".lohan-ssd.lock"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_short_read_is_refused(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir, ssd_files=1)
    x = torch.randn(100_000)
    tok = tier.empty_like(x, where="ssd")
    tier.copy_(tok, x).wait()
    path, offset, _ = tier.ssd_extent(tok)
    os.truncate(path, offset + 4096)  # another program cut the file
    with pytest.raises(StorageError, match="short read") as info:
        tier.copy_(torch.empty_like(x), tok).wait()
    assert "truncated" in str(info.value)


def test_corrupted_block_is_refused(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir, ssd_files=1, ssd_chunk_bytes="64KiB")
    x = torch.randn(100_000)
    tok = tier.empty_like(x, where="ssd")
    tier.copy_(tok, x).wait()
    path, offset, _ = tier.ssd_extent(tok)
    with open(path, "r+b") as f:  # buffered write; the direct read sees it
        f.seek(offset + 70_000)
        f.write(b"\xff\xfe\xfd")
    with pytest.raises(StorageError, match="checksum mismatch") as info:
        tier.copy_(torch.empty_like(x), tok).wait()
    # the error names the file and the offset of the 64 KiB chunk holding the flipped bytes
    assert f"in {path} at offset {offset + 65536} " in str(info.value), str(info.value)


def test_unwritten_block_cannot_be_read(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir)
    tok = tier.empty((1000,), where="ssd")
    with pytest.raises(ValueError, match="never written"):
        tier.copy_(torch.empty(1000), tok)


def test_budget_without_ssd_raises(make_tier):
    tier = make_tier("1MiB", arena_bytes="1MiB")
    keep = []
    with pytest.raises(HostMemoryError, match="give an ssd_dir"):
        for _ in range(4):
            keep.append(tier.to_host(torch.randn(100_000))[0])
    hosttier.drain()


def test_direct_io_required_but_refused_or_granted(make_tier, ssd_dir):
    tier = make_tier(None, ssd_dir=ssd_dir, direct_io=True)
    assert tier.ssd.direct_io  # this filesystem takes O_DIRECT


def test_ssd_dir_option_is_checked_up_front(tmp_path):
    from lohan_compile import Options

    with pytest.raises(ValueError, match="does not exist"):
        Options(ssd_dir=str(tmp_path / "missing"))
    t = HostTier.from_options(Options(ssd_dir=str(tmp_path), host_memory_budget="1GiB"))
    try:
        assert t.stats().budget_bytes == 1 << 30 and t.ssd is not None
    finally:
        t.close()


def test_several_folders_stripe_each_block_over_every_drive(make_tier, tmp_path):
    """ssd_dir as a list (one folder per drive, a RAID 0): a block of several chunks has a part
    in every folder, round trips bit-exact at every size, a flipped byte in its second part is
    refused, and closing removes every private folder."""
    from lohan_compile import Options

    dirs = [tmp_path / f"nvme{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    tier = make_tier(None, ssd_dir=Options(ssd_dir=[str(d) for d in dirs]).ssd_dir, ssd_chunk_bytes="64KiB")
    info = tier.ssd
    assert len(info.folders) == 3 and len(info.files) == 3
    assert [os.path.dirname(f) for f in info.folders] == [str(d) for d in dirs]
    for f, folder in zip(info.files, info.folders):
        assert os.path.dirname(f) == folder
    # ten chunks: four in one folder's file, three in each other's, read back whole
    x = torch.randn(10 * 65536 // 4)
    before = [os.path.getsize(f) for f in info.files]
    tok = tier.empty_like(x, where="ssd")  # (space is reserved here)
    tier.copy_(tok, x).wait()
    grown = [os.path.getsize(f) - b for f, b in zip(info.files, before)]
    assert all(g > 0 for g in grown), grown  # every drive holds part of it
    back = torch.empty_like(x)
    tier.copy_(back, tok).wait()
    assert torch.equal(back, x)
    for n in NBYTES:
        y = bytes_of(torch.uint8, n)
        assert torch.equal(ssd_round_trip(tier, y), y), n
    blocks = [tier.empty((65536 // 4,), where="ssd") for _ in range(3)]  # one chunk each
    for b in blocks:
        tier.copy_(b, torch.zeros(65536 // 4)).wait()
    assert len({tier.ssd_extent(b)[0] for b in blocks}) == 3  # one-chunk blocks take turns
    # a flipped byte in a part that is not the first: refused by its checksum
    second = next(f for f in info.files if f != tier.ssd_extent(tok)[0] and os.path.getsize(f) > 0)
    with open(second, "r+b") as f:
        data = bytearray(f.read())
    first_nonzero = next(i for i, b in enumerate(data) if b)
    with open(second, "r+b") as f:
        f.seek(first_nonzero)
        f.write(bytes([data[first_nonzero] ^ 0xFF]))
    with pytest.raises(StorageError, match="checksum mismatch") as err:
        tier.copy_(torch.empty_like(x), tok).wait()
    assert second in str(err.value)
    folders = info.folders
    del tok, blocks
    tier.close()
    assert not any(os.path.exists(f) for f in folders)


def test_ssd_dir_lists_are_checked_up_front(tmp_path):
    from lohan_compile import Options

    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        Options(ssd_dir=[str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="names a folder twice"):
        Options(ssd_dir=[str(tmp_path / "a"), str(tmp_path / "a" / ".")])
    with pytest.raises(ValueError, match="a list of folder paths"):
        Options(ssd_dir=3)
    assert Options(ssd_dir=[str(tmp_path / "a")]).ssd_dir == str(tmp_path / "a")


@pytest.fixture
def ramfs(tmp_path):
    """A filesystem that refuses O_DIRECT (ramfs), when this machine lets us mount one."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a ramfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_buffered_fallback_where_direct_io_is_refused(ramfs):
    tier = HostTier(None, ssd_dir=ramfs)
    try:
        info = tier.ssd
        assert not info.direct_io
        assert info.io_mode.startswith("buffered fallback") and "refused O_DIRECT" in info.io_mode
        x = torch.randn(12345)
        assert torch.equal(ssd_round_trip(tier, x), x)
    finally:
        tier.close()
    with pytest.raises(StorageError, match="direct I/O was required"):
        HostTier(None, ssd_dir=ramfs, direct_io=True)
    assert os.listdir(ramfs) == [".lohan-ssd.lock"]  # the refused tier left nothing behind


def test_the_cpu_optimizer_refuses_a_block_on_ssd_instead_of_crashing(make_tier, ssd_dir):
    """An SSD-resident block has no host memory (a null data pointer): the optimizer's kernels
    check for it and raise, where reading it would kill the process."""
    from lohan_compile import adam_ops

    tier = make_tier(None, ssd_dir=ssd_dir)
    token = tier.empty((4096,), where="ssd")
    assert tier.location(token) == "ssd"
    with pytest.raises(ValueError, match="no host memory"):
        adam_ops.grad_stats([token])
    master, m, v = (torch.zeros(4096) for _ in range(3))
    with pytest.raises(ValueError, match="no host memory"):
        adam_ops.adam_update([master], [m], [v], [token], [], [1.0], lr=1e-3, beta1=0.9, beta2=0.999,
                             eps=1e-8, weight_decay=0.0)
