"""The executed order of transfers and waits is the order the plan chose, under either executor."""

import copy

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.plan.problem import Action, Rates, Transfer
from lohan_compile.plan.program import program_for
from lohan_compile.plan.simulate import Issue, Wait
from models import tiny_llama


NAMES = {"swap_out": "lohan::swap_out", "swap_in": "lohan::swap_in", "wait_out": "lohan::wait_tensor",
         "wait_in": "lohan::wait_tensor"}
# every op a rewritten graph calls (the optimizer's threads call none of them)
GRAPH_OPS = {*NAMES.values(), "lohan::grad_stats", "lohan::grad_ready", "lohan::grads_ready", "lohan::weight_ready",
             "lohan::weight_wait"}

EXECUTORS = ["fx", pytest.param("inductor", marks=pytest.mark.inductor)]


def executed_events(step, names=frozenset(NAMES.values())):
    """Run ``step`` under the profiler; the lohan ops in the order they ran, with numel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = []
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.name in names:
            numel = 1
            for d in (e.input_shapes[0] if e.input_shapes else ()):
                numel *= d
            events.append((e.name, numel))
    return events


def planned_events(plan, problem, rates):
    sizes = {c.key: c.bytes for c in problem.candidates}
    events = []
    for op in program_for(problem, plan.decisions, rates):
        if isinstance(op, (Issue, Wait)) and isinstance(op.name, Transfer) and op.name.kind in ("swap_out", "swap_in"):
            kind, key = op.name.kind, op.name.key
            direction = kind.split("_")[1]
            events.append((kind if isinstance(op, Issue) else f"wait_{direction}", sizes[key]))
    return events


@pytest.mark.parametrize("executor", EXECUTORS)
def test_executed_transfer_order_equals_the_plan(executor):
    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 128, (4, 96))
    cm = torch.compile(model, backend="lohan", options={"executor": "fx"})
    cm(input_ids=ids, labels=ids).loss.backward()
    budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.6)

    torch._dynamo.reset()
    # swap-all: auto may find that recomputing costs less here than swapping (torch's min-cut
    # partition, with the logits the loop drops known gone after the first step)
    cm = torch.compile(model, backend="lohan", options={"memory_budget": budget, "executor": executor,
                                                        "policy": "swap-all"})
    for _ in range(2):  # compile outside the recording
        model.zero_grad(set_to_none=True)
        cm(input_ids=ids, labels=ids).loss.backward()

    model.zero_grad(set_to_none=True)
    events = executed_events(lambda: cm(input_ids=ids, labels=ids).loss.backward())
    planned = lohan.last_report().graphs[-1].pass_report("plan_memory")  # the recorded step's plan
    plan, problem = planned["plan"], planned["problem"]
    assert plan.count(Action.SWAP) > 0
    hw = lohan.hardware.resolve("auto")
    rates = Rates(1 / hw.d2h_bandwidth, 1 / hw.h2d_bandwidth, hw.sharing)
    planned = planned_events(plan, problem, rates)
    assert [name for name, _ in events] == [NAMES[kind] for kind, _ in planned]
    for (_, numel), (_, nbytes) in zip(events, planned):
        assert nbytes % numel == 0 and nbytes // numel in (1, 2, 4, 8)  # the same tensor, in plan order


@pytest.mark.inductor
def test_inductor_runs_every_lohan_op_in_graph_order_and_offloads_as_adamw():
    """Swaps, waits, gradient hand-offs and weight waits (swap-all and a CPUAdamW that clips):
    the Inductor executor runs every lohan op of the rewritten graphs, on the same tensors, in
    the graphs' order (which is the plan's: apply_plan orders the nodes, test above), forward
    then backward; and the training equals torch's AdamW with clip_grad_norm_ within tolerance."""
    from models import assert_same_state

    torch.manual_seed(0)
    eager = tiny_llama(layers=2)
    model = copy.deepcopy(eager)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, weight_decay=0.01)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, max_grad_norm=0.5)
    cm = torch.compile(model, backend="lohan", options={"policy": "swap-all", "optimizer": opt, "executor": "inductor"})
    g = torch.Generator().manual_seed(1)
    events = None
    for i in range(3):
        ids = torch.randint(0, 128, (2, 64), generator=g)
        expected = eager(input_ids=ids, labels=ids).loss
        expected.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.5)
        opt_e.step()
        opt_e.zero_grad()
        losses = []

        def step():
            losses.append(cm(input_ids=ids, labels=ids).loss)
            losses[-1].backward()
            opt.step()
            opt.zero_grad()

        if i == 1:  # compiled in the first step, outside the recording
            events = executed_events(step, GRAPH_OPS)
        else:
            step()
        torch.testing.assert_close(losses[-1].detach(), expected.detach(), rtol=1e-4, atol=1e-5)
    opt.synchronize()
    assert_same_state(eager, model, exact=False, atol=1e-4)
    graph = lohan.last_report().graphs[-1]
    planned = [tuple(e) for phase in ("forward", "backward") for e in graph.segments[phase]["lohan_op_sequence"]]
    assert {"lohan::swap_in", "lohan::grad_ready", "lohan::weight_wait"} <= {name for name, _ in events}
    assert events == planned
    assert graph.segments["backward"]["segments"] > 1  # compute really runs between them
    assert lohan.last_report().summary()["swapped_bytes"] > 0
