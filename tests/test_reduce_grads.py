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
    nodes = list(bw.graph.nodes)
    reduces = [n for n in nodes if n.target is ALL_REDUCE]
    waits = [n for n in nodes if n.target is WAIT]
    return nodes, reduces, waits


def test_every_parameter_gradient_is_averaged_in_one_order_whatever_the_plan():
    """One collective per parameter gradient, of the gradient divided by the world size, issued
    after the gradient exists, in decreasing parameter index (the order every rank shares); its
    wait stands right before the next one is issued (the last before backward returns), and the
    backward returns the waited average."""
    group = DataParallel(world=4, rank=0, group_name="0")
    graphs = graphs_under(group, Block(d=32, heads=2), torch.randn(2, 8, 32))
    nodes, reduces, waits = collectives(graphs.bw)
    at = {n: i for i, n in enumerate(nodes)}
    out = graphs.bw.graph.output_node()
    grads = {grad_input_index(d): v for v, d in zip(out.args[0], output_descs(graphs.bw)) if grad_input_index(d) is not None}
    params = sorted(grads, reverse=True)
    assert len(reduces) == len(waits) == len(params) == len(list(Block(d=32, heads=2).parameters()))
    for k, (reduce, wait) in enumerate(zip(reduces, waits)):
        scaled = reduce.args[0]
        assert scaled.target is torch.ops.aten.div.Tensor and scaled.args[1] == 4
        assert reduce.args[1:] == ("sum", "0")
        assert wait.args == (reduce,)
        assert grads[params[k]] is wait  # in decreasing parameter index
        assert at[scaled.args[0]] < at[scaled]  # after its gradient exists
        nxt = reduces[k + 1].args[0] if k + 1 < len(reduces) else out
        assert at[wait] == at[nxt] - 1  # waited right before the next is issued
    info = get_info(reduces[0])
    assert info.made_by == "reduce_grads"


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
    _, reduces, waits = collectives(graphs.bw)
    assert len(reduces) == len(waits) == len(params)
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
    _, reduces, waits = collectives(graphs.bw)
    for k, reduce in enumerate(reduces):
        until = index[waits[k + 1].name] if k + 1 < len(waits) else len(problem.ops) - 1
        free = problem.buffers[f"bw:{reduce.name}"].free
        assert free is None or free >= until


def test_one_process_is_not_data_parallel():
    """Without a process group (or with one rank) the pass changes nothing."""
    [(graphs, _)] = capture_graphs(MLP(), lambda cm: cm(torch.randn(4, 32)).sum().backward())
    assert not [n for n in graphs.bw.graph.nodes if n.target in (ALL_REDUCE, WAIT)]
    assert lohan.last_report().graphs[0].pass_report("reduce_grads") == {"world": 1, "reduced": 0}


@pytest.mark.parametrize("bad", [{"disable_passes": ["reduce_grads"]}])
def test_reduce_grads_cannot_be_disabled(bad):
    with pytest.raises(Exception, match="required"):
        torch.compile(MLP(), backend="lohan", options=bad)(torch.randn(4, 32))
