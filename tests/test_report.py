"""last_report(): one training step across its graphs, with the keys DESIGN.md promises."""

import torch

import lohan_compile as lohan
from lohan_compile.report import SUMMARY_KEYS
from models import MLP, tiny_gpt2


def test_summary_has_every_promised_key():
    cm = torch.compile(MLP(), backend="lohan")
    cm(torch.randn(4, 32)).sum().backward()
    summary = lohan.last_report().summary()
    for key in SUMMARY_KEYS:
        assert key in summary
    # without a budget nothing moves: traffic is zero; the plan's prediction is reported
    assert summary["predicted_peak_bytes"] > summary["kept_bytes"] > 0 and summary["predicted_step_s"] > 0
    assert summary["d2h_bytes"] == 0 and summary["h2d_bytes"] == 0
    assert summary["swapped_bytes"] == 0
    assert summary["budget_bytes"] is None


def test_each_step_is_reported_on_its_own():
    cm = torch.compile(MLP(), backend="lohan")
    for _ in range(3):
        cm(torch.randn(4, 32)).sum().backward()
        report = lohan.last_report()
        assert [r.phase for r in report.runs] == ["forward", "backward"]
    # a step with two forwards before one combined backward is still one step
    loss = cm(torch.randn(4, 32)).sum() + cm(torch.randn(4, 32)).sum()
    before = lohan.last_report()
    loss.backward()
    after = lohan.last_report()
    assert after is not before
    assert [r.phase for r in after.runs].count("forward") == 2


def test_report_adds_up_graphs_of_a_graph_breaking_model():
    cm = torch.compile(tiny_gpt2(), backend="lohan")
    ids = torch.randint(0, 128, (2, 16))
    cm(input_ids=ids, labels=ids).loss.backward()
    report = lohan.last_report()
    per_graph = [r.bytes_of(r.graph.kept_bytes_expr) for r in report.runs if r.phase == "forward"]
    assert len(per_graph) >= 2 and all(v > 0 for v in per_graph)
    assert report.summary()["kept_bytes"] == sum(per_graph)
    table = report.to_table()
    for g in report.graphs:
        assert g.name in table
    assert "kept_bytes" in table
