"""Optimizer state beyond the host budget on SSD: exact AdamW, SSD files used and removed."""

import copy
import os

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.runtime import hosttier
from models import tiny_llama
from test_offload import assert_close_models, eager_reference, lm_loss, token_batches


def state_bytes(model):
    # fp32 master, exp_avg, exp_avg_sq per parameter
    return sum(3 * 4 * p.numel() for p in model.parameters())


@pytest.mark.parametrize("overlap", ["speculative", "deferred"])
def test_state_spills_to_ssd_with_exact_adamw(tmp_path, overlap):
    batches = token_batches(4)
    torch.manual_seed(0)
    base = tiny_llama(layers=2)
    _, norms = eager_reference(copy.deepcopy(base), batches, lm_loss, lr=1e-3, max_grad_norm=None)
    limit = sorted(norms)[len(norms) // 2]
    eager = copy.deepcopy(base)
    le, ne = eager_reference(eager, batches, lm_loss, lr=1e-3, max_grad_norm=limit)

    model = copy.deepcopy(base)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    # the host tier holds gradient and weight buffers (fp32: 8 B/parameter), room to stage the
    # largest update, and half the optimizer state: the other half goes to SSD
    budget = 8 * n + 36 * largest + state_bytes(model) // 2 + (128 << 10)
    previous = hosttier.current_if_set()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=limit, overlap=overlap)
    cm = torch.compile(model, backend="lohan",
                       options={"optimizer": opt, "host_memory_budget": budget, "ssd_dir": str(tmp_path)})
    try:
        losses, grad_norms = [], []
        for batch in batches:
            loss = lm_loss(cm, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
            grad_norms.append(opt.last_grad_norm)
        for a, b in zip(le, losses):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert grad_norms == pytest.approx(ne, rel=1e-4)
        assert_close_models(eager, model)
        tier = opt.state_tier
        assert tier is not None and tier.stats().budget_bytes == budget
        on_ssd = [name for p in model.parameters() for name, t in opt.state[p].items() if opt._on_ssd(t)]
        assert on_ssd, "no state went to SSD"
        stats = tier.stats()
        assert stats.ssd_bytes_written > 0 and stats.ssd_bytes_read > 0
        assert opt.state_reads_ahead > 0  # later steps read state ahead of its update
        assert stats.peak_in_use_bytes <= budget
        folder = tier.ssd.folder
        assert os.path.isdir(folder) and os.listdir(folder)
        # a checkpoint holds the values, not SSD blocks; loading it back is exact
        sd = opt.state_dict()
        ref = torch.optim.AdamW(eager.parameters(), lr=1e-3)
        for i, p in enumerate(model.parameters()):
            saved = sd["state"][i]
            assert saved["exp_avg"].data_ptr() != 0
            torch.testing.assert_close(saved["master"], p.detach().float(), atol=0, rtol=0)
        opt.load_state_dict(sd)
        assert opt.state_dict()["state"][0]["exp_avg"].equal(sd["state"][0]["exp_avg"])
        del ref
    finally:
        torch._dynamo.reset()
        hosttier.set_current(previous)
    # the SSD files go with the tier: closing it removes its private folder
    del cm
    opt_tier = opt.state_tier
    opt.state.clear()
    opt_tier.close()
    assert not os.path.exists(folder)


SMALL_HOST_BUDGET = r'''
import re, sys, torch
import lohan_compile as lohan

def run(budget, ssd_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3)
    cm = torch.compile(model, backend="lohan", options={
        "optimizer": opt, "host_memory_budget": budget, "ssd_dir": ssd_dir, "executor": "fx"})
    x = torch.randn(8, 256)
    for _ in range(2):
        loss = cm(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss)

def within(e):
    while e is not None and not isinstance(e, lohan.HostMemoryError):
        e = e.__cause__ or e.__context__
    return e

try:
    run("1MiB", sys.argv[1])
    print("trained within 1 MiB")
except Exception as e:
    err = within(e)
    if err is None:
        raise
    print("ERROR", err)
    needed = int(re.search(r"smallest workable host budget .* \((\d+) bytes", str(err)).group(1))
    torch._dynamo.reset()
    print("TRAINED", run(needed, sys.argv[2]))
'''


def test_a_host_budget_too_small_names_the_smallest_workable_one(tmp_path):
    """Gradients the host tier spilled to SSD were read by the CPU optimizer as if in memory: the
    process died (segmentation fault). Now a budget too small is refused with the smallest
    workable one, and that one trains (in a subprocess: a crash fails this test alone)."""
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = subprocess.run([sys.executable, "-c", SMALL_HOST_BUDGET, str(tmp_path / "a"), str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "LOHAN_EXECUTOR": "fx"})
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    assert "ERROR host_memory_budget=1.00 MiB is too small" in out.stdout, out.stdout
    assert "TRAINED" in out.stdout, out.stdout
