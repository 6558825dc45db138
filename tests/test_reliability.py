"""Issue 22: what a user reads outside the compiled step is the state after the last step."""

import time

import pytest
import torch

import lohan_compile as lohan
from models import tiny_llama
from test_offload import lm_loss, token_batches


def slow_updates(opt, seconds=0.02):
    """Each deferred update takes ``seconds`` longer: a read that does not wait for it sees it missing."""
    update = opt.update_params

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return update(*args, **kwargs)

    opt.update_params = slow


def trained(steps=2, *, overlap="deferred", options=None, make=lambda: tiny_llama(layers=2)):
    model = make()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, overlap=overlap)
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt, **(options or {})})
    data = token_batches(steps + 1)
    for ids in data[:steps]:
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, cm, data[-1]


def _one_more_step(model, opt, cm, ids):
    slow_updates(opt)
    lm_loss(cm, ids).backward()
    opt.step()
    opt.zero_grad()


def test_the_models_state_dict_right_after_a_deferred_step_holds_the_step():
    model, opt, cm, ids = trained()
    _one_more_step(model, opt, cm, ids)
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # what torch.save would write
    opt.synchronize()
    for k, v in model.state_dict().items():
        assert saved[k].equal(v), f"{k}: state_dict() read before the deferred update finished"


def test_an_eager_forward_right_after_a_deferred_step_reads_the_updated_weights():
    model, opt, cm, ids = trained()
    _one_more_step(model, opt, cm, ids)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        opt.synchronize()
        after = model(input_ids=ids).logits
    assert eager.equal(after)


def test_lohan_state_dict_and_save_pretrained_right_after_a_deferred_step(tmp_path):
    model, opt, cm, ids = trained()
    _one_more_step(model, opt, cm, ids)
    sd = lohan.state_dict(model)
    opt.synchronize()
    for k, v in model.state_dict().items():
        assert sd[k].equal(v), k
    _one_more_step(model, opt, cm, ids)
    model.save_pretrained(tmp_path)
    opt.synchronize()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        assert v.equal(model.state_dict()[k]), k


def test_no_recompile_after_the_hooks():
    model, opt, cm, ids = trained(steps=1)
    from lohan_compile.runtime import modules

    assert any(m in modules._hooked for m in model.modules())
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lm_loss(cm, ids).backward()
    opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def streamed_model(steps=2):
    from test_stream_params import streamy_llama

    return trained(steps, options={"offload_params": True}, make=lambda: streamy_llama(layers=2))


def test_a_streamed_models_state_dict_saves_and_loads_whole(tmp_path):
    model, opt, cm, ids = streamed_model()
    from lohan_compile.runtime import stream

    assert any(stream.lookup(p) is not None for p in model.parameters())
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    expected = lohan.state_dict(model)
    assert all(v.numel() > 0 and v.untyped_storage().nbytes() > 0 for v in expected.values())
    from test_stream_params import streamy_llama

    fresh = streamy_llama(layers=2)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    for k, v in fresh.state_dict().items():
        assert v.equal(expected[k]), k
    with lohan.materialized(model):
        for k, v in model.state_dict().items():
            assert v.equal(expected[k]), k


def test_load_state_dict_into_a_streamed_model_updates_its_host_copies_and_masters():
    model, opt, cm, ids = streamed_model()
    from lohan_compile.runtime import stream
    from test_stream_params import streamy_llama

    assert any(stream.lookup(p) is not None for p in model.parameters())
    other = {k: v + 0.01 for k, v in streamy_llama(layers=2).state_dict().items()}
    assert not all(other[k].equal(v) for k, v in lohan.state_dict(model).items())
    model.load_state_dict(other)
    now = lohan.state_dict(model)
    for k, v in other.items():
        assert now[k].equal(v), k
    for name, p in model.named_parameters():
        if stream.lookup(p) is not None:
            assert p.untyped_storage().nbytes() == 0, name  # released again
        assert opt.state[p]["master"].equal(other[name]), f"{name}: the optimizer's master kept the old weight"


def test_load_state_dict_into_an_offloaded_model_moves_the_masters_too():
    model, opt, cm, ids = trained()
    torch.manual_seed(1)
    other = tiny_llama(layers=2).state_dict()
    model.load_state_dict(other)
    for name, p in model.named_parameters():
        assert opt.state[p]["master"].equal(other[name]), name


def test_an_eager_forward_of_a_streamed_model_says_what_to_do():
    model, opt, cm, ids = streamed_model(steps=1)
    with pytest.raises(lohan.LohanError, match="materialized"):
        model(input_ids=ids)
    with lohan.materialized(model), torch.no_grad():
        model(input_ids=ids)


@pytest.mark.parametrize("streaming", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("policy", ["keep-all", "swap-all", "recompute-all", "auto"])
def test_the_measured_peak_counts_a_model_built_before_the_counter(policy, streaming):
    # the normal order: the model exists before lohan installs its device counter (emulated
    # by pausing it); the report's measured peak must still equal DESIGN.md's profiler method
    from lohan_compile.measure import measure_device_peak
    from lohan_compile.runtime import device
    from test_stream_params import streamy_llama

    torch._dynamo.reset()

    def build():
        with device.paused():
            model = streamy_llama(layers=1)
        data = token_batches(3, t=16)
        assert not device.counted(next(model.parameters()))
        opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, overlap="speculative")
        options = {"optimizer": opt, "policy": policy, "offload_params": streaming}
        return model, opt, torch.compile(model, backend="lohan", options=options), iter(data)

    def step(state):
        model, opt, cm, batches = state
        lm_loss(cm, next(batches)).backward()
        opt.step()
        opt.zero_grad()

    import gc

    gc.collect()
    before = device.allocated()  # what earlier tests left: the counter sees it, the profiler not
    prof = measure_device_peak(build, step, steps=3)
    measured = lohan.last_report().summary()["measured_peak_bytes"] - before
    # the two differ by a few scalars the step thread makes outside the graphs (tens of bytes)
    assert abs(measured - prof.peak_bytes) <= 1024, (measured, prof)


@pytest.mark.parametrize("executor", ["fx", "inductor"])
def test_debug_mode_checks_that_compute_reads_device_memory_only(executor):
    # a plan that swaps and offloads gradients trains under the check without a complaint
    torch._dynamo.reset()
    model = tiny_llama(layers=2)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3)
    options = {"optimizer": opt, "policy": "swap-all", "executor": executor, "debug": True}
    cm = torch.compile(model, backend="lohan", options=options)
    for ids in token_batches(2):
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    assert lohan.last_report().summary()["swapped_bytes"] > 0


def test_the_debug_check_names_compute_that_reads_host_memory():
    # what a GPU run once did: backward read a swapped tensor where it lay on the host
    import torch.fx as fx

    from lohan_compile.graph.segments import Driver
    from lohan_compile.runtime import device, hosttier

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4)
    y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    y.meta["val"] = torch.empty(4)
    g.output((y,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    items = [n for n in g.nodes if n.op not in ("placeholder", "output")]
    driver = Driver(gm, items, "probe", check=lambda what, ts: device.check_reads(what, ts, None))
    assert driver([torch.ones(4)])[0].equal(torch.full((4,), 2.0))
    host = hosttier.current().empty((4,), torch.float32).fill_(1.0)
    with pytest.raises(lohan.LohanError, match=r"probe mul.*host-tier memory"):
        driver([host])


def _resources(ssd_dir):
    import gc
    import os
    import threading

    from lohan_compile.runtime import device, hosttier

    gc.collect()
    tier = hosttier.current_if_set()
    on_ssd = sum(f.stat().st_size for f in ssd_dir.rglob("*") if f.is_file())
    return {
        "device bytes": device.allocated(),
        "host-tier bytes": tier.stats().in_use_bytes if tier is not None else 0,
        "ssd bytes": on_ssd,
        "open files": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "python threads": threading.active_count(),
    }


@pytest.mark.slow
def test_compile_train_delete_cycles_leak_nothing(tmp_path):
    from test_stream_params import streamy_llama

    def cycle(options, make):
        model = make()
        opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        cm = torch.compile(model, backend="lohan", options={"optimizer": opt, **options})
        for ids in token_batches(2, t=16):
            lm_loss(cm, ids).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        del model, opt, cm
        torch._dynamo.reset()

    variants = [
        ({}, lambda: tiny_llama(layers=2)),
        ({"offload_params": True}, lambda: streamy_llama(layers=1)),
        ({"ssd_dir": tmp_path, "host_memory_budget": "64MiB"}, lambda: tiny_llama(layers=2)),
    ]
    for options, make in variants:  # the first round starts what stays: thread pools, the tiers
        cycle(options, make)
    start = _resources(tmp_path)
    for _ in range(2):
        for options, make in variants:
            cycle(options, make)
        assert _resources(tmp_path) == start


def _interrupt_at(phase, monkeypatch):
    """Raise KeyboardInterrupt (Ctrl-C) once, in the main thread, at ``phase`` of the next step."""
    import threading

    from lohan_compile.optim import CPUAdamW
    from lohan_compile.runtime.offload import OffloadRuntime
    from lohan_compile.runtime.step import TRACKER

    fired = []

    def once():
        if not fired and threading.current_thread() is threading.main_thread():
            fired.append(phase)
            raise KeyboardInterrupt

    if phase == "forward":  # the forward graph ran; its outputs are being handed back
        original = TRACKER.forward_outputs
        monkeypatch.setattr(TRACKER, "forward_outputs", lambda *a: (once(), original(*a)))
    elif phase == "backward":  # some gradients offloaded (and updated), others not yet
        original = OffloadRuntime.grad_ready
        calls = []

        def grad_ready(self, *a, **k):
            calls.append(1)
            if len(calls) == 3:
                once()
            return original(self, *a, **k)

        monkeypatch.setattr(OffloadRuntime, "grad_ready", grad_ready)
    elif phase in ("step", "step-error"):  # inside opt.step(), in the updates it runs itself
        import signal

        original = CPUAdamW.update_params

        def update_params(self, *a, **k):
            if not fired and threading.current_thread() is threading.main_thread():
                fired.append(phase)
                if phase == "step":
                    signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, delivered here
                else:
                    raise RuntimeError("injected: an update failed")
            return original(self, *a, **k)

        monkeypatch.setattr(CPUAdamW, "update_params", update_params)
    return fired


@pytest.mark.parametrize("phase", ["forward", "backward", "step", "step-error"])
def test_ctrl_c_in_a_step_leaves_the_state_from_before_it(phase, monkeypatch):
    """Ctrl-C in forward or backward: the state from before the step (what ran is rolled back).
    Ctrl-C inside opt.step(): the step completes and the interrupt is raised after it (a step
    is whole or not at all). An error inside opt.step(): the state from before the step."""
    import copy

    import torch.nn.functional as F

    from models import MLP

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)) for _ in range(4)]

    def train(interrupt):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        # clipping makes step() redo the updates that ran during backward, itself
        opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, max_grad_norm=0.01, overlap="speculative")
        cm = torch.compile(model, backend="lohan", options={"optimizer": opt})

        def step(x, y):
            F.mse_loss(cm(x), y).backward()
            opt.step()
            opt.zero_grad()

        for x, y in data[:2]:
            step(x, y)
        if interrupt:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            before_opt = copy.deepcopy(opt.state_dict())
            with monkeypatch.context() as m:
                fired = _interrupt_at(phase, m)
                with pytest.raises(RuntimeError if phase == "step-error" else KeyboardInterrupt):
                    step(*data[2])
            assert fired == [phase]
            if phase != "step":
                for k, v in model.state_dict().items():  # what a checkpoint saved now would hold
                    assert v.equal(before[k]), k
                for i, st in opt.state_dict()["state"].items():
                    for name, t in st.items():
                        assert torch.equal(t, before_opt["state"][i][name]), (i, name)
            opt.zero_grad()
        elif phase == "step":
            step(*data[2])  # the interrupted step was taken whole
        step(*data[3])
        opt.synchronize()
        return model.state_dict()

    expected, got = train(False), train(True)
    for k in expected:
        assert got[k].equal(expected[k]), k


@pytest.mark.slow
def test_killed_mid_step_with_state_on_ssd_resumes_bit_for_bit_and_leaves_no_files(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "faults" / "train_and_die.py"
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(mode, ckpt, out):
        return subprocess.run([sys.executable, str(script), mode, str(ckpt), str(ssd), str(out)],
                              capture_output=True, text=True, timeout=300, env=env)

    ref = run("reference", tmp_path / "ref.pt", tmp_path / "ref.out")
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = torch.load(tmp_path / "ref.out")
    phases = ("forward", "backward", "deferred", "ssd-write")
    for phase in phases:
        ckpt = tmp_path / f"{phase}.pt"
        killed = run(f"kill:{phase}", ckpt, tmp_path / "never.out")
        assert killed.returncode == -9, (phase, killed.returncode, killed.stderr[-3000:])
        assert ckpt.exists() and not (tmp_path / "never.out").exists()
        # what the killed run left (its start removed what the run before it left)
        assert len([p for p in ssd.iterdir() if p.name.startswith("lohan-ssd-")]) == 1, phase
    resumed = run("resume", ",".join(str(tmp_path / f"{p}.pt") for p in phases),
                  ",".join(str(tmp_path / f"{p}.out") for p in phases))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for phase in phases:
        got = torch.load(tmp_path / f"{phase}.out")
        assert got["losses"] == expected["losses"], phase
        for k, v in expected["model"].items():
            assert got["model"][k].equal(v), (phase, k)
    # the resumed run removed the last killed run's files at its start, and its own at its exit
    assert [p.name for p in ssd.iterdir() if p.name.startswith("lohan-ssd-")] == []


def _ssd_model(ssd_dir, overlap="deferred", **options):
    """A small LLaMA whose optimizer state is half on SSD (``options``: more backend options;
    ``max_grad_norm`` goes to the optimizer)."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    # gradients and weight buffers, staging for the largest update, half the state: the rest on SSD
    budget = 8 * n + 36 * largest + 6 * n + (128 << 10)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, overlap=overlap,
                         max_grad_norm=options.pop("max_grad_norm", None))
    cm = torch.compile(model, backend="lohan", options={
        "optimizer": opt, "host_memory_budget": budget, "ssd_dir": str(ssd_dir), **options})
    return model, opt, cm


def test_a_full_disk_is_found_before_the_first_step_and_changes_nothing(tmp_path):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    # in a process of its own: the refused compile's frames keep the model alive in this one
    import sys
    from pathlib import Path

    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_reliability import _ssd_model
from test_offload import lm_loss, token_batches
model, opt, cm = _ssd_model({str(mnt)!r})
before = {{k: v.clone() for k, v in model.state_dict().items()}}
try:
    lm_loss(cm, token_batches(1, t=16)[0]).backward()
    print("NO ERROR")
except Exception as e:
    print("ERROR", e)
assert all(v.equal(before[k]) for k, v in model.state_dict().items()), "weights changed"
# the state made so far is whole, from before any step
assert all(not st or (int(st["step"]) == 0 and {{"exp_avg", "exp_avg_sq", "master"}} <= set(st))
           for st in opt.state.values())
print("CONSISTENT")
"""
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        message = out.stdout
        assert "No space left on device" in message and str(mnt) in message and "KiB" in message, message
        assert "CONSISTENT" in message, message
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_failed_deferred_update_refuses_the_torn_state_until_a_checkpoint_is_loaded(tmp_path):
    import threading

    data = token_batches(4, t=16)
    model, opt, cm = _ssd_model(tmp_path)
    for ids in data[:2]:
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    import copy

    # (a copy, as torch.save writes: a state dict shares the optimizer's tensors, as torch's does)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    update = opt.update_params
    calls = []

    def failing(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            calls.append(1)
            if len(calls) == 5:  # some weights of the step are updated, others not
                raise lohan.StorageError("injected: an SSD write failed")
        return update(*a, **k)

    opt.update_params = failing
    lm_loss(cm, data[2]).backward()
    opt.step()  # returns while the updates run
    opt.zero_grad()
    with pytest.raises(lohan.LohanError, match="injected.*load the last"):
        opt.synchronize()
    opt.update_params = update
    for read in (opt.state_dict, model.state_dict, lambda: lm_loss(cm, data[3])):
        with pytest.raises(lohan.LohanError, match="hold part of that step"):
            read()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    for ids in data[2:]:
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    opt.synchronize()
    resumed = {k: v.clone() for k, v in model.state_dict().items()}

    torch._dynamo.reset()
    model, opt, cm = _ssd_model(tmp_path / "..")
    for ids in data:
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    opt.synchronize()
    for k, v in model.state_dict().items():
        assert resumed[k].equal(v), k


def test_between_backward_and_step_the_models_state_dict_holds_the_weights_before_the_step():
    # speculative updates run during backward and reach the device before step(): a state dict
    # read then shows what eager shows (the weights before the step), and the step still runs
    import torch.nn.functional as F

    from models import MLP

    torch.manual_seed(0)
    model = MLP()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, overlap="speculative")
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt})
    x, y = torch.randn(8, 32), torch.randn(8, 8)
    written_early = False
    for _ in range(3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        F.mse_loss(cm(x), y).backward()
        runtime = opt._lohan_offload
        runtime._join()
        written_early |= bool(runtime.state.weights_changed)  # the device holds updated weights
        mid = model.state_dict()
        for k, v in mid.items():
            assert v.equal(before[k]), k
        opt.step()
        opt.zero_grad()
    assert written_early
    assert not all(v.equal(before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("key", ["memory_budget", "host_memory_budget"])
@pytest.mark.parametrize("value", [0, -1, "0B", 1.5, True, "lots"])
def test_budgets_that_are_not_a_positive_number_of_bytes_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        lohan.Options(**{key: value})


def test_budgets_of_one_byte_say_what_would_work(tmp_path):
    from pathlib import Path

    from lohan_compile.errors import BudgetError

    model = tiny_llama(layers=1)
    cm = torch.compile(model, backend="lohan", options={"memory_budget": 1})
    with pytest.raises(Exception) as info:
        lm_loss(cm, token_batches(1)[0]).backward()
    err = BudgetError.within(info.value)
    assert err is not None and err.smallest_feasible_bytes > 1
    # in a process of its own: the refused compile's frames keep the model alive in this one
    import subprocess
    import sys

    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import lohan_compile as lohan
from models import tiny_llama
from test_offload import lm_loss, token_batches
model = tiny_llama(layers=1)
opt = lohan.CPUAdamW(model.parameters())
cm = torch.compile(model, backend="lohan", options={{"optimizer": opt, "host_memory_budget": 1,
                                                     "ssd_dir": {str(tmp_path)!r}, "executor": "fx"}})
try:
    lm_loss(cm, token_batches(1)[0]).backward()
except Exception as e:
    inner = getattr(e, "inner_exception", e)
    print(type(inner).__name__, inner)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("HostMemoryError") and "smallest workable host budget" in out.stdout, out.stdout


def test_reading_the_model_between_micro_batches_keeps_the_accumulated_gradients():
    import torch.nn.functional as F

    from models import MLP

    g = torch.Generator().manual_seed(0)
    micro = [(torch.randn(4, 32, generator=g), torch.randn(4, 8, generator=g)) for _ in range(2)]

    def train(read_between):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
        cm = torch.compile(model, backend="lohan", options={"optimizer": opt})
        for _ in range(2):
            with opt.accumulate():
                F.mse_loss(cm(micro[0][0]), micro[0][1]).backward()
            if read_between:
                model.state_dict()  # a log, a checkpoint of the weights, between micro-batches
            F.mse_loss(cm(micro[1][0]), micro[1][1]).backward()
            opt.step()
            opt.zero_grad()
        opt.synchronize()
        return model.state_dict()

    expected, got = train(False), train(True)
    for k in expected:
        assert got[k].equal(expected[k]), k


def test_abandoning_a_step_whose_updates_ran_final_refuses_the_torn_state():
    # without clipping and with skip_nonfinite=False, updates during backward keep no roll-back
    # copy: a backward interrupted after some of them leaves a state nobody may go on from
    import torch.nn.functional as F

    from lohan_compile.runtime.offload import OffloadRuntime
    from models import MLP

    torch.manual_seed(0)
    model = MLP()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, skip_nonfinite=False, overlap="speculative")
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt})
    x, y = torch.randn(8, 32), torch.randn(8, 8)
    for _ in range(2):
        F.mse_loss(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
    original, calls = OffloadRuntime.grad_ready, []

    def grad_ready(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    OffloadRuntime.grad_ready = grad_ready
    try:
        with pytest.raises(KeyboardInterrupt):
            F.mse_loss(cm(x), y).backward()
    finally:
        OffloadRuntime.grad_ready = original
    opt._lohan_offload._join()
    assert opt._lohan_offload.state.updated  # updates ran final before the interruption
    with pytest.raises(lohan.LohanError, match="abandoned after"):
        model.state_dict()
    with pytest.raises(lohan.LohanError, match="abandoned after"):
        F.mse_loss(cm(x), y).backward()
