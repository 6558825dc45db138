"""torch's min-cut partitioner, its minimum cut found in C++.

``min_cut_rematerialization_partition`` builds a networkx graph of the joint graph and calls
``networkx.minimum_cut`` on it: a pure-Python maximum flow, about a third of the partitioner's
time on a deep model. ``minimum_cut_in_cpp()`` lets those calls be answered by the C++
extension (``lohan::min_cut_sink_side``, Dinic's algorithm) while it is active. The answer is
the one networkx gives, not only one of the same value: networkx's partition puts on the sink
side every node that can reach the sink in the residual graph, and that set is the same for
every maximum flow. A call this does not cover (another capacity attribute, a flow function,
an undirected graph), or a machine where the extension cannot load, goes to networkx.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import ext
from ..errors import ExtensionBuildError


def minimum_cut(graph: Any, source: Any, sink: Any, capacity: str = "capacity", flow_func: Any = None,
                **kwargs: Any) -> tuple[float, tuple[set, set]]:
    """``networkx.minimum_cut(graph, source, sink)`` for a directed graph whose edges carry
    ``capacity`` (absent: infinite): (cut value, (source side, sink side))."""
    import networkx as nx
    from networkx.algorithms.flow import maxflow

    if capacity != "capacity" or flow_func is not None or kwargs or not graph.is_directed() \
            or graph.is_multigraph():
        return maxflow.minimum_cut(graph, source, sink, capacity=capacity, flow_func=flow_func, **kwargs)
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    tails, heads, caps = [], [], []
    for u, v, data in graph.edges(data=True):
        tails.append(index[u])
        heads.append(index[v])
        caps.append(float(data.get("capacity", math.inf)))
    # (the partitioner runs under AOTAutograd's fake-tensor mode: these are real tensors)
    with _disable_current_modes():
        value, sink_side = ext.cpp_ops().min_cut_sink_side(
            torch.tensor(tails, dtype=torch.int64, device="cpu"), torch.tensor(heads, dtype=torch.int64, device="cpu"),
            torch.tensor(caps, dtype=torch.float64, device="cpu"), len(nodes), index[source], index[sink])
        on_sink_side = sink_side.tolist()
    if math.isinf(value):
        raise nx.NetworkXUnbounded("Infinite capacity path, flow unbounded above.")
    sink_nodes = {node for node, far in zip(nodes, on_sink_side) if far}
    return value, (set(nodes) - sink_nodes, sink_nodes)


_lock = threading.Lock()
_depth = 0  # how many ``minimum_cut_in_cpp`` are active (threads may partition at once)
_networkx_minimum_cut: Any = None


@contextmanager
def minimum_cut_in_cpp() -> Iterator[None]:
    """While active, ``networkx.minimum_cut`` is ``minimum_cut`` above (where the extension
    loads). torch's partitioner imports networkx and calls ``nx.minimum_cut`` inside the
    function, so the module's attribute is what it finds."""
    global _depth, _networkx_minimum_cut
    import networkx as nx

    try:
        ext.load()
        usable = True
    except ExtensionBuildError:
        usable = False
    if not usable:
        yield
        return
    with _lock:
        if _depth == 0:
            _networkx_minimum_cut = nx.minimum_cut
            nx.minimum_cut = minimum_cut
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                nx.minimum_cut = _networkx_minimum_cut
