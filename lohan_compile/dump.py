"""Annotated dumps of what the compiler did (``dump_dir`` / ``LOHAN_DUMP_DIR``).

For each compiled graph, into the folder:
- ``graph{N}_joint.py``, ``_fw.py``, ``_bw.py`` (``_inference.py`` for a
  forward-only compile): the graph as readable Python, one line per node,
  each with a comment: role, shape, dtype, bytes, the plan's decision for a
  saved storage, what an inserted node does and which pass made it, and the
  predicted start and end of the op in the simulated step;
- ``graph{N}_plan.md``: the plan as a markdown table, one row per saved
  activation: bytes, decision, why, where it is produced and used, release
  and prefetch points;
- ``graph{N}_trace.json``: the predicted timeline as a Chrome/Perfetto trace
  (open it at https://ui.perfetto.dev or chrome://tracing), one track per
  resource: compute, host->device, device->host, CPU optimizer, SSD;
- with the Inductor executor, ``graph{N}_forward_driver.py`` and
  ``_backward_driver.py``: the generated function that calls the compiled segments
  and lohan's ops in order (``graph/segments.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.fx as fx

from .graph.meta import get_info
from .plan.problem import OpRef, Transfer
from .units import format_bytes
from .graph.pipeline import Graphs
from .report import GraphRecord, plan_trace_events
from .graph.shapes import nbytes_hint



def dump_driver(dump_dir: str, record: GraphRecord, phase: str, source: str) -> None:
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"graph{record.graph_id}_{phase}_driver.py")
    with open(path, "w") as f:
        f.write(f"# {record.name} {phase}: compute segments compiled by Inductor, lohan's ops between them\n")
        f.write(source)


def _fmt(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return str(a)
    return repr(a)


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"torch.ops.{t.namespace}.{t._opname}.{t._overloadname}"
    return getattr(t, "__qualname__", None) or str(t)


def python_line(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"{node.name} = next(inputs)"
    if node.op == "output":
        return f"return {_fmt(node.args[0])}"
    args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
    return f"{node.name} = {_target(node)}({', '.join(args)})"


class Annotator:
    """What to write beside each node: its facts, the plan's decision, predicted times."""

    def __init__(self, record: GraphRecord, plan: Any = None, problem: Any = None):
        self.record = record
        self.plan = plan
        self.problem = problem
        self.times: dict[tuple[str, str], tuple[float, float]] = {}
        self.transfer_times: dict[Transfer, tuple[float, float]] = {}
        if plan is not None and problem is not None and plan.prediction is not None:
            for iv in plan.prediction.timeline.intervals:
                if iv.resource == "compute" and isinstance(iv.name, OpRef):
                    op = problem.ops[iv.name.index]
                    self.times[(op.phase, op.name)] = (iv.start, iv.end)
                elif isinstance(iv.name, Transfer):
                    self.transfer_times[iv.name] = (iv.start, iv.end)

    def decision(self, storage: str | None) -> str | None:
        if self.plan is None or storage is None:
            return None
        d = self.plan.decisions.get(f"fw:{storage}")
        return d.action.value if d is not None else None

    def __call__(self, node: fx.Node, phase: str) -> str:
        info = get_info(node)
        parts: list[str] = []
        if info is not None:
            parts.append(info.action or info.role.value)
            if info.source:
                parts.append(info.source)
            if info.grad_of:
                names = [self._input_name(i) for i in info.grad_of]
                parts.append("grad of " + ", ".join(names))
            if info.storage_of and info.storage_of != node.name and not info.action:
                parts.append(f"view of {info.storage_of}")
            decided = self.decision(info.storage_of) if info.role.value == "saved" else None
            if decided:
                parts.append(f"plan: {decided}")
            if info.action in ("swap_in", "swap_out"):
                parts.append(self._transfer(info.action, info.storage_of))
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = "x".join(str(s) for s in val.shape) or "scalar"
            parts.append(f"{shape} {str(val.dtype).removeprefix('torch.')} {format_bytes(nbytes_hint(val))}")
        times = self.times.get((phase, node.name))
        if times is not None:
            parts.append(f"predicted {times[0] * 1e3:.3f}-{times[1] * 1e3:.3f} ms")
        if info is not None:
            parts.append(f"by {info.made_by}")
        return "  # " + ", ".join(parts) if parts else ""

    def _transfer(self, action: str, storage: str | None) -> str:
        name = Transfer(action, f"fw:{storage}")
        queue = "device->host" if action == "swap_out" else "host->device"
        t = self.transfer_times.get(name)
        text = f"on the {queue} copy queue"
        if t is not None:
            text += f", predicted {t[0] * 1e3:.3f}-{t[1] * 1e3:.3f} ms"
        if action == "swap_in" and self.plan is not None and self.problem is not None:
            d = self.plan.decisions.get(f"fw:{storage}")
            c = next((c for c in self.problem.candidates if c.key == f"fw:{storage}"), None)
            if d is not None and c is not None and d.prefetch_at is not None:
                text += f", prefetch {c.first_bw_use - d.prefetch_at} ops ahead"
        return text

    def _input_name(self, index: int) -> str:
        return f"input {index}"


def render(gm: fx.GraphModule, title: str, annotate: Annotator, phase: str) -> str:
    lines = [
        f"# {title}",
        "# Each line: the node as Python  # role or action, where it comes from, the plan's decision,",
        "# shape dtype bytes, the predicted start-end in the simulated step, and the pass that set it.",
        "",
        "def graph(inputs):",
    ]
    for node in gm.graph.nodes:
        lines.append("    " + python_line(node) + annotate(node, phase))
    return "\n".join(lines) + "\n"


def plan_table(plan: Any, problem: Any) -> str:
    head = (
        f"# Plan: policy {plan.policy}\n\n"
        f"predicted step {plan.prediction.step_seconds * 1e3:.3f} ms, device peak "
        f"{format_bytes(plan.prediction.peak_device_bytes)}, host peak "
        f"{format_bytes(plan.prediction.peak_host_bytes)}, exposed transfers "
        f"{plan.prediction.exposed_seconds * 1e3:.3f} ms, recomputation "
        f"{plan.prediction.recompute_seconds * 1e3:.3f} ms"
        + (f"; code run eagerly between forward and backward holds {format_bytes(problem.outside_bytes)} "
           "(measured), counted in the device peak" if problem.outside_bytes else "")
        + "\n\n"
        "| saved activation | bytes | decision | why | produced at op | last forward use | first backward use "
        "| swap-out waited after op | swap-in issued before op |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in problem.candidates:
        d = plan.decisions[c.key]
        rows.append(
            f"| {c.name} | {format_bytes(c.bytes)} | {d.action.value} | {d.reason or '-'} | {c.produced_at} "
            f"| {c.last_fw_use} | {c.first_bw_use} | {'' if d.release_at is None else d.release_at} "
            f"| {'' if d.prefetch_at is None else d.prefetch_at} |"
        )
    return head + "\n".join(rows) + "\n"


def dump_graphs(folder: str, record: GraphRecord, graphs: Graphs) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    planned = record.pass_report("plan_memory")
    plan = planned["plan"] if planned else None
    problem = planned["problem"] if planned else None
    annotate = Annotator(record, plan, problem)
    written = []

    def write(name: str, text: str) -> None:
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)

    for name, gm in graphs.items():
        kind = "inference" if graphs.inference and name == "fw" else name
        write(f"graph{record.graph_id}_{kind}.py", render(gm, f"{record.name}, {kind} graph", annotate, name))
    if plan is not None:
        write(f"graph{record.graph_id}_plan.md", plan_table(plan, problem))
        write(f"graph{record.graph_id}_trace.json", json.dumps({"traceEvents": plan_trace_events(plan)}, indent=1))
    return written
