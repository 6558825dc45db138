"""How the Inductor executor splits a graph and runs it (no Inductor here: segments run as fx)."""

import operator

import torch
import torch.fx as fx

from lohan_compile import ops

ops.load()  # the extension, and its ops' fake kernels
from lohan_compile.graph.segments import Segment, compile_segments, split

aten, lohan = torch.ops.aten, torch.ops.lohan


def _node(g, target, *args, like):
    n = g.call_function(target, args)
    n.meta["val"] = like
    return n


def _as_fx(sub, inputs):
    sub.graph.set_codegen(fx.graph._BoxedCodeGen())
    sub.recompile()
    return sub


def _shape(items):
    return [f"seg{len(i.nodes)}" if isinstance(i, Segment) else i.name for i in items]


def _swapping_graph():
    """x + c -> var_mean -> (swap its input out and back) -> mean * var * 2 -> sin."""
    v = torch.empty(4, 3)
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = v
    c = g.get_attr("const")
    c.meta["val"] = v
    a = _node(g, aten.add.Tensor, x, c, like=v)
    b = _node(g, aten.mul.Tensor, a, a, like=v)
    vm = _node(g, aten.var_mean.correction, b, [1], like=(torch.empty(4), torch.empty(4)))
    h = _node(g, lohan.swap_out.default, a, like=v)  # a lohan op between var_mean and its getitems
    var = _node(g, operator.getitem, vm, 0, like=torch.empty(4))
    mean = _node(g, operator.getitem, vm, 1, like=torch.empty(4))
    w = _node(g, lohan.wait_tensor.default, h, like=v)
    d = _node(g, lohan.swap_in.default, w, like=v)
    e = _node(g, lohan.wait_tensor.default, d, like=v)
    m = _node(g, aten.mul.Tensor, mean, var, like=torch.empty(4))
    m2 = _node(g, aten.mul.Tensor, m, 2.0, like=torch.empty(4))
    s = _node(g, aten.sin.default, e, like=v)
    g.output((m2, s))
    root = torch.nn.Module()
    root.register_buffer("const", torch.ones(4, 3))
    return fx.GraphModule(root, g)


def test_lohan_ops_cut_the_compute_and_a_tuple_never_crosses():
    items = split(_swapping_graph().graph)
    # the constant, add, mul, var_mean and its getitems (which follow their source across the
    # swap-out) are one segment; the muls and the sin after the waits another
    assert _shape(items) == ["seg6", "swap_out_default", "wait_tensor_default", "swap_in_default",
                             "wait_tensor_default_1", "seg3"]
    assert [n.name for n in items[0].outputs] == ["add_tensor", "getitem", "getitem_1"]


def test_a_run_with_a_single_op_runs_directly():
    v = torch.empty(4, 3)
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = v
    c = g.get_attr("const")
    c.meta["val"] = v
    a = _node(g, aten.add.Tensor, x, c, like=v)
    h = _node(g, lohan.swap_out.default, a, like=v)
    w = _node(g, lohan.wait_tensor.default, h, like=v)
    g.output((w,))
    root = torch.nn.Module()
    root.register_buffer("const", torch.ones(4, 3))
    gm = fx.GraphModule(root, g)
    assert _shape(split(gm.graph)) == ["const", "add_tensor", "swap_out_default", "wait_tensor_default"]
    driver = compile_segments(gm, _as_fx, "t")
    x = torch.randn(4, 3)
    torch.testing.assert_close(driver([x])[0], x + 1)
    assert driver.describe()["segments"] == 0


def test_the_driver_computes_what_the_graph_computes_and_frees_after_last_use():
    gm = _swapping_graph()
    driver = compile_segments(gm, _as_fx, "t")
    x = torch.randn(4, 3)
    got = driver([x])
    b = (x + 1) * (x + 1)
    var, mean = torch.var_mean(b, [1])
    torch.testing.assert_close(got[0], mean * var * 2)
    torch.testing.assert_close(got[1], (x + 1).sin())
    lines = driver.source.splitlines()
    assert "    args.clear()" in lines
    # the add's result is dropped right after the swap-out takes it (the copy holds it now)
    swap = next(i for i, line in enumerate(lines) if "lohan.swap_out" in line)
    assert lines[swap + 1].startswith("    del ") and "add_tensor" in lines[swap + 1]
    described = driver.describe()
    assert described["segments"] == 2 and described["lohan_ops"] == 4
    assert [name for name, _ in described["lohan_op_sequence"]] == [
        "lohan::swap_out", "lohan::wait_tensor", "lohan::swap_in", "lohan::wait_tensor"]


def test_timed_calls_measure_each_compute_item():
    driver = compile_segments(_swapping_graph(), _as_fx, "t", timing=True)
    for _ in range(5):
        driver([torch.randn(4, 3)])
    assert driver.timed and len(driver.samples) == len(driver.TIMED_CALLS)
    seconds = driver.node_seconds(lambda n: 1.0)
    assert set(seconds) >= {"add_tensor", "var_mean_correction", "sin_default"}
    assert seconds["add_tensor"] > 0
    assert all(v >= 0 for v in seconds.values())
    assert not any(name.startswith(("swap", "wait")) for name in seconds)
