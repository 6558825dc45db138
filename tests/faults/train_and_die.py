"""A training run for the fault tests, in a process of its own (killed with SIGKILL on purpose).

    python train_and_die.py MODE CKPT SSD_DIR OUT

MODE: ``reference`` (train 2 steps, checkpoint, train 2 more), ``kill:PHASE`` (the same, killed
by SIGKILL in PHASE of the third step: forward, backward, deferred (an update running after
step() returned), ssd-write (a write of optimizer state to SSD in flight)), ``resume`` (for each
of the comma-separated checkpoints CKPT, a new model loads it and trains the last 2 steps; OUT
is as many comma-separated files). Losses and final weights go to OUT.
"""

import os
import signal
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

from test_offload import lm_loss, token_batches  # noqa: E402
from test_reliability import _ssd_model  # noqa: E402

mode, ckpt, ssd_dir, out = sys.argv[1:5]
data = token_batches(4, t=16)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, opt) -> None:
    from lohan_compile.runtime.offload import OffloadRuntime
    from lohan_compile.runtime.step import TRACKER

    if phase == "forward":
        TRACKER.forward_outputs = lambda *a: die()
    elif phase == "backward":
        original = OffloadRuntime.grad_ready
        calls = []

        def grad_ready(self, *a, **k):
            calls.append(1)
            if len(calls) == 3:
                die()
            return original(self, *a, **k)

        OffloadRuntime.grad_ready = grad_ready
    elif phase == "deferred":
        update = opt.update_params

        def update_params(*a, **k):
            if threading.current_thread() is not threading.main_thread():
                die()  # the worker thread, updating after step() returned
            return update(*a, **k)

        opt.update_params = update_params
    elif phase == "ssd-write":
        tier = opt.state_tier
        copy_ = tier.copy_

        def copy_and_die(dst, src):
            event = copy_(dst, src)
            if tier.location(dst) == "ssd":
                die()  # the write is in flight
            return event

        tier.copy_ = copy_and_die
    else:
        raise SystemExit(f"unknown phase {phase}")


def build():
    return _ssd_model(ssd_dir, max_grad_norm=1.0, executor="fx")


def step(model, opt, cm, ids):
    loss = lm_loss(cm, ids)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


if mode == "resume":
    for one_ckpt, one_out in zip(ckpt.split(","), out.split(",")):
        model, opt, cm = build()
        saved = torch.load(one_ckpt)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        losses = [step(model, opt, cm, ids) for ids in data[2:]]
        opt.synchronize()
        torch.save({"losses": losses, "model": model.state_dict()}, one_out)
        del model, opt, cm
        torch._dynamo.reset()
    print("finished")
    sys.exit(0)

model, opt, cm = build()
losses = []
if True:
    for ids in data[:2]:
        losses.append(step(model, opt, cm, ids))
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    torch.save(state, ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)  # a checkpoint is whole or absent
    assert any(opt._on_ssd(t) for st in opt.state.values() for t in st.values()), "no state on SSD"
    if mode.startswith("kill:"):
        arm(mode.split(":", 1)[1], opt)
for ids in data[2:]:
    losses.append(step(model, opt, cm, ids))
opt.synchronize()
torch.save({"losses": losses[-2:], "model": model.state_dict()}, out)
print("finished")
