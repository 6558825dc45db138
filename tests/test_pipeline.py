"""The pass pipeline: names, bisecting, debug checks, and errors that point at the node."""

import gc

import pytest
import torch

import lohan_compile as lohan
from lohan_compile import settings
from lohan_compile.graph.pipeline import NodeError, Pass, Pipeline
from lohan_compile.passes import PASS_NAMES, default_passes
from models import MLP


def compile_with_passes(model, passes, x, **options):
    """Compile ``model`` through the backend with a custom pass list."""
    import lohan_compile.passes as passes_module

    original = passes_module.default_pipeline
    passes_module.default_pipeline = lambda: Pipeline(passes)
    try:
        cm = torch.compile(model, backend="lohan", options=options or None)
        return cm(x)
    finally:
        passes_module.default_pipeline = original


def test_default_pipeline_order():
    assert list(PASS_NAMES) == [
        "classify_roles", "chunk_loss", "partition_graph", "classify_saved", "reduce_grads", "offload_grads",
        "accumulate_grads", "plan_memory", "apply_plan",
        "stream_params",
    ]


def test_disable_pass_by_name_to_bisect():
    model = MLP()
    cm = torch.compile(model, backend="lohan", options={"disable_passes": ["classify_saved", "plan_memory", "apply_plan"]})  # noqa: E501
    cm(torch.randn(4, 32)).sum().backward()
    graph = lohan.last_report().graphs[0]
    names = {r.name: r.skipped for r in graph.passes}
    assert names == {
        "classify_roles": False, "chunk_loss": False, "partition_graph": False, "classify_saved": True, "reduce_grads": False,
        "offload_grads": False, "accumulate_grads": False,
        "plan_memory": True, "apply_plan": True, "stream_params": False,
    }
    assert lohan.last_report().summary()["kept_bytes"] is None  # not computed, not invented


def test_disable_pass_from_environment(monkeypatch):
    monkeypatch.setenv("LOHAN_DISABLE_PASSES", "apply_plan")
    cm = torch.compile(MLP(), backend="lohan")
    cm(torch.randn(4, 32)).sum().backward()
    assert [r.name for r in lohan.last_report().graphs[0].passes if r.skipped] == ["apply_plan"]


@pytest.mark.parametrize(
    "disabled, message",
    [
        (["partition_graph"], "required"),
        (["classify_roles"], "requires"),
        (["classify_saved"], "requires"),
        (["clasify_saved"], "unknown pass"),
    ],
)
def test_invalid_disabling_is_refused(disabled, message):
    with pytest.raises(ValueError, match=message):
        Pipeline(default_passes()).validate_disabled(disabled)


def test_failing_pass_names_pass_node_and_source_line():
    def explode(graphs, facts):
        gm = graphs.joint
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default)
        raise NodeError(node, "cannot handle this node")

    passes = default_passes()[:1] + [Pass("explode", explode)] + default_passes()[1:]
    with pytest.raises(Exception) as e:
        compile_with_passes(MLP(), passes, torch.randn(2, 32))
    msg = str(e.value)
    assert "pass 'explode' failed" in msg
    assert "addmm" in msg
    assert "models.py" in msg and "line" in msg  # the user's source line
    assert "classify_roles" in msg  # the passes that ran before it
    assert "LOHAN_DISABLE_PASSES=explode" in msg


def test_debug_check_catches_a_node_without_fake_value():
    def corrupt(graphs, facts):
        node = next(n for n in graphs.joint.graph.nodes if n.op == "call_function")
        del node.meta["val"]
        return graphs, {}

    passes = [default_passes()[0], Pass("corrupt", corrupt)] + default_passes()[1:]
    with pytest.raises(Exception) as e:
        compile_with_passes(MLP(), passes, torch.randn(2, 32))
    assert "after pass 'corrupt'" in str(e.value) and "meta['val']" in str(e.value)

    # without debug checks the broken metadata goes unnoticed by the pipeline itself
    torch._dynamo.reset()
    with settings.DEBUG.override(False):
        compile_with_passes(MLP(), passes, torch.randn(2, 32))


def test_debug_check_catches_a_broken_partition():
    def drop_saved(graphs, facts):
        # the backward graph loses an input the forward graph still saves for it
        bw = graphs.bw
        ph = [n for n in bw.graph.nodes if n.op == "placeholder"][0]
        ph.replace_all_uses_with(bw.graph.call_function(torch.ops.aten.zeros.default, ([1],)))
        bw.graph.erase_node(ph)
        return graphs, {}

    passes = default_passes() + [Pass("drop_saved", drop_saved)]
    with pytest.raises(Exception) as e:
        compile_with_passes(MLP(), passes, torch.randn(2, 32))
    assert "after pass 'drop_saved'" in str(e.value)


def test_pass_records_have_timings_and_reports():
    cm = torch.compile(MLP(), backend="lohan")
    cm(torch.randn(4, 32)).sum().backward()
    records = lohan.last_report().graphs[0].passes
    assert all(r.seconds >= 0 for r in records)
    roles = records[0].report["roles"]
    assert roles["param"] == 6 and roles["input"] == 1 and roles["tangent"] == 1


def test_pipeline_runs_inference_passes_only_for_forward_only_graphs(tmp_path):
    cm = torch.compile(MLP(), backend="lohan", options={"dump_dir": str(tmp_path)})
    with torch.no_grad():
        cm(torch.randn(4, 32))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith("_inference.py")
    text = (tmp_path / files[0]).read_text()
    assert text.count("# param") == 6 and "tangent" not in text
    compile(text, "dump", "exec")  # the dump is Python


def test_forward_ops_replayed_in_backward_for_nothing_are_removed():
    """partition_graph drops forward ops a partitioner left in backward with no user (torch
    kept LLaMA's attention forwards there on a second partition of a graph); ops that are
    used, backward's own ops, and ops that write an argument stay."""
    import torch.fx as fx

    from lohan_compile.passes.partition_graph import drop_dead_replays

    g = fx.Graph()
    a = g.placeholder("a")
    dead = g.call_function(torch.ops.aten.mm.default, (a, a))  # a forward op nobody reads
    dead_item = g.call_function(torch.ops.aten.max.dim, (a, 0))
    item = g.call_function(__import__("operator").getitem, (dead_item, 0))  # a chain, dead at its end
    used = g.call_function(torch.ops.aten.mul.Tensor, (a, a))
    own = g.call_function(torch.ops.aten.sin.default, (a,))  # backward's own, unused: not ours to drop
    writes = g.call_function(torch.ops.aten.add_.Tensor, (a, a))  # mutates a: kept
    for n in (dead, dead_item, item, used, writes):
        n.meta["partitioner_tag"] = "is_forward"
    own.meta["partitioner_tag"] = "is_backward"
    g.output((used,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert drop_dead_replays(gm) == 3
    left = {n.name for n in gm.graph.nodes}
    assert {used.name, own.name, writes.name} <= left and not {dead.name, dead_item.name, item.name} & left
    x = torch.randn(3, 3)
    assert torch.equal(gm(x.clone())[0], x * x)


@pytest.mark.parametrize("frozen_before", [False, True])
def test_the_passes_run_with_what_the_process_held_out_of_the_collectors_scans(frozen_before):
    """While the passes run, the cycle collector scans only what they make (what the process held
    is frozen), and afterwards the collector is as it was; a process that froze objects itself
    (a server before it forks) is left alone, its freeze kept."""
    seen = []

    def look(graphs, facts):
        seen.append((gc.isenabled(), gc.get_freeze_count()))
        return graphs, {}

    if frozen_before:
        gc.freeze()
    try:
        before = (gc.isenabled(), gc.get_freeze_count())
        torch._dynamo.reset()
        compile_with_passes(MLP(), default_passes() + [Pass("look", look)], torch.randn(4, 32)).sum().backward()
        after = (gc.isenabled(), gc.get_freeze_count())
    finally:
        if frozen_before:
            gc.unfreeze()
    assert seen and after[0] == before[0] and all(enabled for enabled, _ in seen)
    if frozen_before:  # (frozen objects the step let go of leave the count)
        assert 0 < after[1] <= before[1]
        assert all(0 < count <= before[1] for _, count in seen)
    else:
        assert after[1] == 0
        assert all(count > 0 for _, count in seen)
