"""Dumps can be read back: every inserted node is annotated; the trace is valid JSON with its tracks."""

import json

import torch

import lohan_compile as lohan
from lohan_compile.report import TRACKS
from models import tiny_llama


def test_dump_of_a_planned_graph(tmp_path):
    torch.manual_seed(0)
    cm = torch.compile(tiny_llama(), backend="lohan", options={"dump_dir": str(tmp_path), "policy": "recompute-all"})
    ids = torch.randint(0, 128, (2, 16))
    cm(input_ids=ids, labels=ids).loss.backward()
    gid = lohan.last_report().graphs[0].graph_id
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"graph{gid}_{k}" for k in ("bw.py", "fw.py", "joint.py", "plan.md", "trace.json")] + [
        "step_memory.png",  # predicted against measured device memory
        "step_trace.json",  # the step's measured timeline
    ]
    bw = (tmp_path / f"graph{gid}_bw.py").read_text()
    compile(bw, "bw.py", "exec")
    recomputed = [line for line in bw.splitlines() if "# recompute" in line]
    plan = (tmp_path / f"graph{gid}_plan.md").read_text()
    # each recomputed value's ops (a chain of them where it was made through unsaved values)
    planned = lohan.last_report().graphs[0].pass_report("plan_memory")
    ops = [name for c in planned["problem"].candidates
           if planned["plan"].decisions[c.key].action.value == "recompute" for name in c.recompute_ops]
    assert len(recomputed) == len(ops) >= plan.count("| recompute |") > 0
    assert all("by apply_plan" in line for line in recomputed)
    fw = (tmp_path / f"graph{gid}_fw.py").read_text()
    assert "plan: keep" in fw and "predicted" in fw
    trace = json.loads((tmp_path / f"graph{gid}_trace.json").read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert tracks == set(TRACKS.values())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)
    assert any(e["name"].startswith("recompute:") for e in spans)


def test_measured_trace_of_a_step_with_gradient_offloading(tmp_path):
    from models import MLP

    torch.manual_seed(0)
    model = MLP()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2)
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt, "dump_dir": str(tmp_path)})
    for _ in range(3):
        cm(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    trace = json.loads((tmp_path / "step_trace.json").read_text())
    events = trace["traceEvents"]
    processes = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert "measured" in processes and any(p.startswith("predicted") for p in processes)
    measured = [e for e in events if e["ph"] == "X" and e["pid"] == 2]
    names = {e["name"].split()[0] for e in measured}
    # compute and the optimizer's work, side by side (each gradient's statistics are taken on the
    # device as it leaves, in the graph)
    assert {"graph", "update"} <= names
    assert lohan.last_report().optimizer_events
    # every chunk the copy engine moved, on its direction's track: as many bytes as the counters
    tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name" and e["pid"] == 2}
    moved = {}
    for e in measured:
        if tracks[e["tid"]] in ("device->host", "host->device"):
            moved[tracks[e["tid"]]] = moved.get(tracks[e["tid"]], 0) + e["args"]["bytes"]
    summary = lohan.last_report().summary()
    assert moved["device->host"] == summary["d2h_bytes"] > 0
    assert moved["host->device"] == summary["h2d_bytes"] > 0


def test_every_inserted_node_is_annotated_and_the_memory_plot_is_written(tmp_path):
    """Swaps and gradient offloading in one graph: every lohan op in the dumps names its pass
    and what it does; the memory curves and their PNG are there."""
    import re

    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 32))
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    cm = torch.compile(model, backend="lohan", options={"dump_dir": str(tmp_path), "policy": "swap-all",
                                                        "optimizer": opt})
    for _ in range(2):
        cm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    report = lohan.last_report()
    gid = report.graphs[0].graph_id
    text = {k: (tmp_path / f"graph{gid}_{k}.py").read_text() for k in ("fw", "bw")}
    inserted = [line for t in text.values() for line in t.splitlines() if "torch.ops.lohan." in line]
    assert inserted
    for line in inserted:
        assert re.search(r"# \w+.*by (apply_plan|offload_grads)", line), line
    bw = text["bw"]
    decisions = report.decisions()
    swapped = sum(1 for d in decisions if d["decision"] == "swap")
    assert bw.count("lohan.swap_in.default") == swapped > 0
    offload = report.graphs[0].pass_report("offload_grads")
    assert bw.count("# grad_out,") == offload["grad_copies"] > 0
    assert bw.count("lohan.weight_ready.default") == offload["offloaded"]
    assert text["fw"].count("lohan.weight_wait.default") == offload["offloaded"]
    # predicted and measured memory over the step, and the PNG drawn from them
    curves = report.memory_curves()
    measured = curves["measured"]
    predicted = curves[f"predicted, graph {gid}"]
    assert measured and predicted
    assert max(b for _, b in measured) == report.summary()["measured_peak_bytes"]
    assert max(b for _, b in predicted) == report.graphs[0].predicted_peak_bytes
    png = (tmp_path / "step_memory.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_torch_logs_prints_a_summary_per_graph():
    """TORCH_LOGS="+lohan_compile" goes through torch's logging: one paragraph per graph."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, lohan_compile\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "cm = torch.compile(m, backend='lohan', options={'policy': 'swap-all', 'hardware': 'rtx4090'})\n"
        "cm(torch.randn(4, 8)).sum().backward()\n"
    )
    env = {**os.environ, "TORCH_LOGS": "+lohan_compile"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "lohan graph" in line and "passes:" in line]
    assert len(lines) == 1, out.stderr
    assert "policy swap-all" in lines[0] and "predicted step" in lines[0]
    assert "plan:" in out.stderr  # the debug level adds the plan table
