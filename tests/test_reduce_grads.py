"""reduce_grads on its own, in one process: the collectives it inserts, their order and waits,
what a rank that does not update a parameter keeps of its gradient, and what the planner holds
for them. (Trained across processes: tests/test_distributed.py.)"""

import dataclasses

import pytest
import torch
from models import MLP, Block
from test_classify import capture_graphs

import lohan_compile as lohan
import lohan_compile.passes as passes_module
from lohan_compile.graph.aot import grad_input_index, output_descs
from lohan_compile.graph.costmodel import CostModel
from lohan_compile.graph.meta import get_info
from lohan_compile.graph.pipeline import DataParallel, Pass, Pipeline
from lohan_compile.graph.problem import build_problem
from lohan_compile.hardware import resolve
from lohan_compile.passes import default_passes, reduce_grads

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
COALESCED = torch.ops._c10d_functional.all_reduce_coalesced.default


def graphs_under(group, model, x, optimizer=None):
    """The graphs of ``model``'s training step as the pipeline leaves them with ``group`` as the
    data-parallel group (no process group exists: only forward runs, which compiles)."""
    passes = [Pass("reduce_grads", lambda g, f: reduce_grads(g, dataclasses.replace(f, data_parallel=group)))
              if p.name == "reduce_grads" else p for p in default_passes()]
    options = {"executor": "fx", **({"optimizer": optimizer} if optimizer is not None else {})}
    captured = []

    def keep(graphs, facts):
        captured.append(graphs)
        return graphs, {}

    original = passes_module.default_pipeline
    passes_module.default_pipeline = lambda: Pipeline(passes + [Pass("capture", keep, inference=True)])
    try:
        torch.compile(model, backend="lohan", options=options)(x)
    finally:
        passes_module.default_pipeline = original
        torch._dynamo.reset()
    [graphs] = captured
    return graphs


def reaches(node, targets, depth=4):
    return node in targets or (depth > 0 and any(reaches(u, targets, depth - 1) for u in node.users))


def collectives(bw):
    """The graph's nodes; its collectives in order; each one's results (the coalesced one's
    ``getitem`` nodes); the waits of all of them in order."""
    nodes = list(bw.graph.nodes)
    reduces = [n for n in nodes if n.target in (ALL_REDUCE, COALESCED)]
    results = [sorted(n.users, key=nodes.index) if n.target is COALESCED else [n] for n in reduces]
    waits = [w for rs in results for r in rs for w in r.users if w.target is WAIT]
    return nodes, reduces, results, waits


def test_every_parameter_gradient_is_averaged_in_one_order_whatever_the_plan():
    """Every parameter gradient divided by the world size and all-reduced right after it exists,
    in the order the joint graph makes them (the order every rank shares): a large one alone, small ones
    together in one coalesced collective; each result waited for right before the next
    collective is issued (the last before backward returns), and the backward returns the
    waited average."""
    group = DataParallel(world=4, rank=0, group_name="0")
    model = Block(d=128, heads=2)  # (its weights are large, its norms and biases small)
    graphs = graphs_under(group, model, torch.randn(2, 8, 128))
    nodes, reduces, results, waits = collectives(graphs.bw)
    at = {n: i for i, n in enumerate(nodes)}
    out = graphs.bw.graph.output_node()
    grads = {grad_input_index(d): v for v, d in zip(out.args[0], output_descs(graphs.bw)) if grad_input_index(d) is not None}
    made = {}
    for pos, n in enumerate(graphs.joint.graph.nodes):
        for idx in getattr(get_info(n), "grad_of", ()) or ():
            made.setdefault(idx, pos)
    params = sorted(grads, key=lambda i: (made[i], -i))
    assert params != sorted(grads, reverse=True)  # (not simply by index, in this model)
    assert len(waits) == len(params) == len(list(model.parameters()))
    assert {r.target for r in reduces} == {ALL_REDUCE, COALESCED}
    order = iter(params)
    for k, (reduce, members) in enumerate(zip(reduces, results)):
        scaled = [reduce.args[0]] if reduce.target is ALL_REDUCE else list(reduce.args[0])
        assert reduce.args[1:] == ("sum", "0")
        nxt = reduces[k + 1] if k + 1 < len(reduces) else out
        first_of_next = (nxt.args[0] if nxt.target is ALL_REDUCE else nxt.args[0][0]) if nxt is not out else out
        for s, r in zip(scaled, members):
            assert s.target is torch.ops.aten.div.Tensor and s.args[1] == 4
            assert at[s.args[0]] < at[s]  # after its gradient exists
            [wait] = [w for w in r.users if w.target is WAIT]
            assert grads[next(order)] is wait  # in the joint graph's order
            assert at[wait] < at[first_of_next]  # waited before the next collective is issued
        if reduce.target is COALESCED:
            assert all(s.meta["val"].numel() * 4 < 64 * 1024 for s in scaled)
    assert get_info(reduces[0]).made_by == "reduce_grads"


@pytest.fixture
def one_rank(tmp_path):
    """A process group of one rank (the runtime resolves the group by name when it binds)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def test_a_rank_keeps_only_the_averages_of_the_parameters_it_updates(one_rank):
    """The ranks share the update: a parameter another rank updates is reduced all the same
    (every rank takes part in every collective), and its average waited for, but the backward
    returns no gradient for it; the ones this rank updates go to the CPUAdamW's offload."""
    torch.manual_seed(0)
    model = MLP()
    opt = lohan.CPUAdamW(model.parameters())
    params = [p for p in model.parameters()]
    x = torch.randn(4, 32)
    # the graph's first inputs are the parameters: this rank (0) updates every other one
    owners = {i: i % 2 for i in range(len(params))}
    group = DataParallel(world=2, rank=0, group_name=one_rank, owners=owners)
    graphs = graphs_under(group, model, x, optimizer=opt)
    _, _, _, waits = collectives(graphs.bw)
    assert len(waits) == len(params)
    swaps = [n for n in graphs.bw.graph.nodes if n.target is torch.ops.lohan.swap_out.default]
    mine = sum(1 for owner in owners.values() if owner == 0)
    sent = [w for w in waits if w.users]
    assert len(sent) == mine and all(reaches(w, swaps) for w in sent)  # alone, or in a bucket
    kept = [w for w in waits if not w.users]
    assert len(kept) == len(params) - mine  # (stays: the buffer is not freed before the collective completes)
    assert all(v is None for v in graphs.bw.graph.output_node().args[0])  # nothing reaches .grad


def test_a_collectives_buffer_is_planned_held_until_the_next_collectives_wait():
    """The process group's worker releases a collective's buffer after the graph's wait may have
    returned: the plan holds it until the next collective's wait, the last one's to the end."""
    group = DataParallel(world=2, rank=0, group_name="0")
    graphs = graphs_under(group, MLP(), torch.randn(4, 32))
    problem = build_problem(graphs.fw, graphs.bw, CostModel(resolve("auto")))
    index = {op.name: i for i, op in enumerate(problem.ops) if op.phase == "bw"}
    _, reduces, results, waits = collectives(graphs.bw)
    first_waits = [min(index[w.name] for r in rs for w in r.users) for rs in results]
    for k, members in enumerate(results):
        until = first_waits[k + 1] if k + 1 < len(results) else len(problem.ops) - 1
        for r in members:
            free = problem.buffers[f"bw:{r.name}"].free
            assert free is None or free >= until


def test_one_process_is_not_data_parallel():
    """Without a process group (or with one rank) the pass changes nothing."""
    [(graphs, _)] = capture_graphs(MLP(), lambda cm: cm(torch.randn(4, 32)).sum().backward())
    assert not [n for n in graphs.bw.graph.nodes if n.target in (ALL_REDUCE, COALESCED, WAIT)]
    assert lohan.last_report().graphs[0].pass_report("reduce_grads") == {"world": 1, "reduced": 0}


@pytest.mark.parametrize("bad", [{"disable_passes": ["reduce_grads"]}])
def test_reduce_grads_cannot_be_disabled(bad):
    with pytest.raises(Exception, match="required"):
        torch.compile(MLP(), backend="lohan", options=bad)(torch.randn(4, 32))


def test_the_collectives_are_traffic_on_the_link_between_devices():
    """Each all-reduce is a transfer on the ``net`` link, issued after its op and waited for
    before its wait: each of N devices sends 2 (N - 1) / N of the gradient's bytes; a slower
    link exposes more of it in the predicted step."""
    from lohan_compile.plan.problem import Action, Decision
    from lohan_compile.plan.program import predict

    group = DataParallel(world=4, rank=0, group_name="0")
    graphs = graphs_under(group, Block(d=32, heads=2), torch.randn(2, 8, 32))
    hw = resolve("rtx4090")
    problem = build_problem(graphs.fw, graphs.bw, CostModel(hw), world=4)
    _, _, results, _ = collectives(graphs.bw)
    grad_bytes = [sum(r.meta["val"].numel() * 4 for r in rs) for rs in results]
    assert [c.bytes for c in problem.collectives] == [2 * 3 * b // 4 for b in grad_bytes]
    keep = {c.key: Decision(Action.KEEP) for c in problem.candidates}
    steps = {}
    for name, bandwidth in (("fast", 1e15), ("slow", 1e6)):
        rates = profile_rates(hw.with_(interconnect_bandwidth=bandwidth))
        prediction = predict(problem, keep, rates)
        assert prediction.net_bytes == sum(c.bytes for c in problem.collectives)
        net = [i for i in prediction.timeline.intervals if i.resource == "net"]
        assert len(net) == len(problem.collectives)
        steps[name] = prediction.step_seconds
    # (one link, one collective at a time: the slow one's step holds all of their time)
    assert steps["slow"] >= sum(c.bytes for c in problem.collectives) / 1e6 > 10 * steps["fast"]


def profile_rates(hw):
    from lohan_compile.plan.problem import Rates

    return Rates(1 / hw.d2h_bandwidth, 1 / hw.h2d_bandwidth, hw.sharing, 1 / hw.allreduce_bandwidth)
