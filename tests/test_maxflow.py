"""The minimum cut of torch's min-cut partitioner, found in C++ (lohan_compile/graph/maxflow.py)."""

import random
from contextlib import nullcontext

import networkx as nx
import pytest
import torch
from networkx.algorithms.flow import maxflow as nx_maxflow

from lohan_compile.graph.maxflow import minimum_cut, minimum_cut_in_cpp


def _random_graph(seed: int) -> nx.DiGraph:
    rng = random.Random(seed)
    n = rng.randint(4, 60)
    g = nx.DiGraph()
    g.add_nodes_from(["source", "sink", *range(n)])
    for _ in range(rng.randint(n, 5 * n)):
        u, v = rng.sample([*range(n), "source", "sink"], 2)
        if u == "sink" or v == "source":
            continue
        kind = rng.random()
        if kind < 0.15:
            g.add_edge(u, v)  # no capacity: infinite
        elif kind < 0.5:
            g.add_edge(u, v, capacity=float(rng.randint(0, 9)))
        else:
            g.add_edge(u, v, capacity=rng.random() * 1e6)
    return g


def _unbounded_graph(seed: int) -> nx.DiGraph:
    """A random graph with integer capacities (as torch's partitioner gives) and a path of
    several infinite edges from the source to the sink among finite detours."""
    g = _random_graph(seed)
    for u, v, data in g.edges(data=True):
        if "capacity" in data:
            data["capacity"] = float(int(data["capacity"]))
    hops = ["source", "hop0", "hop1", "hop2", "sink"]
    for u, v in zip(hops, hops[1:]):
        g.add_edge(u, v)
    g.add_edge("hop1", 0, capacity=5.0)
    g.add_edge(0, "hop2", capacity=7.0)
    return g


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("make", [_random_graph, _unbounded_graph])
def test_the_cut_is_the_one_networkx_finds(make, seed):
    g = make(seed)
    try:
        want_value, (want_source_side, want_sink_side) = nx_maxflow.minimum_cut(g, "source", "sink")
    except nx.NetworkXUnbounded:
        with pytest.raises(nx.NetworkXUnbounded):
            minimum_cut(g, "source", "sink")
        return
    value, (source_side, sink_side) = minimum_cut(g, "source", "sink")
    assert value == pytest.approx(want_value, rel=1e-9, abs=1e-9)
    assert sink_side == want_sink_side and source_side == want_source_side


def test_while_active_networkx_answers_with_it_and_afterwards_again_itself():
    g = nx.DiGraph()
    g.add_edge("source", "a", capacity=3.0)
    g.add_edge("a", "sink", capacity=2.0)
    g.add_edge("source", "sink")  # infinite
    before = nx.minimum_cut
    with minimum_cut_in_cpp():
        assert nx.minimum_cut is minimum_cut
        with pytest.raises(nx.NetworkXUnbounded):
            nx.minimum_cut(g, "source", "sink")
        g.remove_edge("source", "sink")
        assert nx.minimum_cut(g, "source", "sink") == (2.0, ({"source", "a"}, {"sink"}))
        # what it does not cover goes to networkx: edges without an "other" capacity are infinite
        with pytest.raises(nx.NetworkXUnbounded):
            nx.minimum_cut(g, "source", "sink", capacity="other")
    assert nx.minimum_cut is before


def test_torch_min_cut_partitions_the_same_with_it(monkeypatch):
    import torch._functorch.config as functorch_config
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def f(x, w1, w2):
        h = torch.nn.functional.gelu(x @ w1)
        return (torch.tanh(h) * h.sigmoid() @ w2).sum()

    from lohan_compile.graph import maxflow

    asked = []
    ops = maxflow.ext.cpp_ops()
    monkeypatch.setattr(maxflow.ext, "cpp_ops", lambda: asked.append(1) or ops)
    codes = []
    for cpp in (False, True):
        def partition(joint, inputs, **kwargs):
            with functorch_config.patch(activation_memory_budget=0.5), \
                    (minimum_cut_in_cpp() if cpp else nullcontext()):
                fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
            codes.append((fw.code, bw.code))
            return fw, bw

        compiled = aot_function(f, fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm,
                                partition_fn=partition)
        args = [torch.randn(8, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True),
                torch.randn(32, 4, requires_grad=True)]
        compiled(*args).backward()
    assert asked  # (the C++ cut was the one asked the second time)
    assert codes[0] == codes[1]
