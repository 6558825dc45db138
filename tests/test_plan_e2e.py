"""Planning on real models: eager-equal results, measured peak within budget, prediction close."""

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.measure import measure_device_peak
from lohan_compile.plan.problem import Action
from models import assert_same_state, tiny_gpt2, tiny_llama, train_side_by_side


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def make():
    return tiny_llama(layers=3)


def batch():
    return torch.randint(0, 128, (4, 96), generator=torch.Generator().manual_seed(3))


def measured_peak(options, steps=2):
    """Peak device bytes of the last of ``steps`` training steps, as the step report measures it
    (the device counter; the profiler agrees, see test_counter_and_profiler_agree)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    cm = torch.compile(model, backend="lohan", options=options)
    ids = batch()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        lm_loss(cm, ids).backward()
    report = lohan.last_report()
    return report.summary()["measured_peak_bytes"], report


def sgd_side_by_side(eager, model, compiled, batches):
    """Train ``eager`` and ``model`` (through ``compiled``) side by side with SGD, one batch a
    step, each step's loss equal; yields lohan's report of each step."""
    opt_e, opt_c = torch.optim.SGD(eager.parameters(), lr=1e-2), torch.optim.SGD(model.parameters(), lr=1e-2)
    for ids in batches:
        expected = lm_loss(eager, ids)
        expected.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        loss = lm_loss(compiled, ids)
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        yield lohan.last_report()


def test_counter_and_profiler_agree():
    """The step report's measured peak (device counter) and DESIGN.md's profiler method see
    the same allocations: the rise of each over the level at the start of the step is equal."""
    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        model = make()
        return model, torch.compile(model, backend="lohan"), batch()

    def step(state):
        model, cm, ids = state
        model.zero_grad(set_to_none=True)
        lm_loss(cm, ids).backward()

    from lohan_compile.runtime import device

    state = build()
    step(state)  # compile outside the measurement
    model, cm, ids = state
    model.zero_grad(set_to_none=True)
    device.reset_peak()
    start = device.allocated()
    prof = measure_device_peak(lambda: state, step, steps=1)
    counter_rise = lohan.last_report().summary()["measured_peak_bytes"] - sum(
        lohan.last_report().graphs[0].uncounted_inputs.values()
    ) - start
    assert prof.peak_bytes - prof.start_bytes == counter_rise


@pytest.fixture(scope="module")
def unplanned():
    lohan.hardware.auto()  # measured once, outside any profiled step
    return measured_peak({})


def test_keep_all_prediction_matches_measurement(unplanned):
    peak, report = unplanned
    predicted = report.summary()["predicted_peak_bytes"]
    assert abs(predicted - peak) <= 0.10 * peak


@pytest.mark.parametrize("fraction", [0.93, 0.86])
def test_budget_is_met_and_predicted(unplanned, fraction):
    budget = int(unplanned[0] * fraction)
    peak, report = measured_peak({"memory_budget": budget})
    summary = report.summary()
    assert peak <= budget
    assert abs(summary["predicted_peak_bytes"] - peak) <= 0.10 * peak
    assert summary["budget_bytes"] == budget
    assert summary["swapped_bytes"] + summary["recomputed_bytes"] > 0
    # the copy engine moved exactly what the plan swaps, each way
    assert summary["d2h_bytes"] == summary["h2d_bytes"] == summary["swapped_bytes"]


def test_gradients_accumulated_on_the_device_are_planned_in_every_micro_batch(unplanned):
    """Without a lohan optimizer, gradients stay on the device and micro-batches accumulate
    into ``.grad``: from the second micro-batch on, the step begins with a whole set of
    gradients held and makes another beside it. Every micro-batch's measured peak stays within the budget
    (the first included), and the accumulated gradients equal eager's."""
    budget = int(unplanned[0] * 0.86)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make()
    compiled = make()
    compiled.load_state_dict(eager.state_dict())
    cm = torch.compile(compiled, backend="lohan", options={"memory_budget": budget})
    g = torch.Generator().manual_seed(5)
    micro = [torch.randint(0, 128, (4, 96), generator=g) for _ in range(3)]
    peaks = []
    for ids in micro:
        lm_loss(cm, ids).backward()
        peaks.append(lohan.last_report().summary()["measured_peak_bytes"])
        lm_loss(eager, ids).backward()
    assert max(peaks) <= budget, (peaks, budget)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.inductor
def test_budget_is_met_under_inductor(unplanned):
    """Inductor fuses and frees inside its segments; lohan's ops and what crosses them stay
    where the plan put them: the measured peak stays within the budget."""
    import dataclasses

    budget = int(unplanned[0] * 0.6)
    # a link fast enough that auto swaps (the measured profile of a loaded machine could make
    # it prefer torch's min-cut partition, which auto under Inductor does not plan: Inductor runs
    # its recomputation chains above the prediction, README "Status")
    hw = dataclasses.replace(lohan.hardware.auto(), matmul_flops=130e9, memory_bandwidth=37e9, op_overhead_s=1e-5,
                             d2h_bandwidth=12e9, h2d_bandwidth=12e9, compute_slowdown={"d2h": 0.67, "h2d": 0.67},
                             queue_slowdown={"d2h": 3.6, "h2d": 3.6})  # as measured on a quiet 2-core machine
    peak, report = measured_peak({"memory_budget": budget, "executor": "inductor", "hardware": hw})
    summary = report.summary()
    assert all(g.executor == "inductor" and g.segments for g in report.graphs)
    assert peak <= budget, (peak, budget, summary)
    assert summary["plans"] in (["default/greedy"], ["default/greedy-recompute"])  # auto's own plan
    assert summary["swapped_bytes"] + summary["recomputed_bytes"] > 0
    assert summary["d2h_bytes"] == summary["h2d_bytes"] == summary["swapped_bytes"]


@pytest.mark.inductor
def test_a_plan_inductor_would_run_past_the_budget_is_made_again_before_any_step(unplanned, caplog):
    """Inductor, fusing torch's min-cut recomputation chains, holds their inputs longer than
    the fx order the simulator follows: that plan would run above its prediction, past the
    budget. Each segment's peak is measured against the plan's model of its nodes when it is
    compiled, and the graph is planned again holding each segment's excess while its nodes
    run, before the first step: every step is within the budget (issue 22, defect 5)."""
    budget = int(unplanned[0] * 0.7)
    options = {"memory_budget": budget, "executor": "inductor", "policy": "torch-min-cut"}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    cm = torch.compile(model, backend="lohan", options=options)
    ids = batch()
    peaks = []
    with caplog.at_level("INFO", logger="lohan_compile"):
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            lm_loss(cm, ids).backward()
            peaks.append(lohan.last_report().summary()["measured_peak_bytes"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("Inductor's segments hold" in m for m in messages), messages
    assert not any("past memory_budget" in m for m in messages), messages  # no step ran over
    report = lohan.last_report()
    graph = report.graphs[0]
    planned = graph.pass_report("plan_memory")
    held = {(op.phase, op.name): op.scratch_bytes for op in planned["problem"].ops}
    assert graph.segment_scratch and max(graph.segment_scratch.values()) > 0.01 * budget
    # the plan that runs holds every excess its segments were measured with, at their nodes
    assert all(held[k] >= v for k, v in graph.segment_scratch.items() if k in held), graph.segment_scratch
    assert max(peaks) <= budget, (peaks, budget)
    # within 10% of what ran
    assert abs(report.summary()["predicted_peak_bytes"] - peaks[-1]) <= 0.10 * peaks[-1]


def test_without_the_compile_time_measurement_the_runtime_still_learns_the_excess(unplanned, caplog, monkeypatch):
    """The backstop: a plan that runs above its prediction past the budget (here: segments not
    measured when compiled) is made again holding the excess the runtime measured."""
    from lohan_compile.backend.compiler import GraphCompiler

    monkeypatch.setattr(GraphCompiler, "probes_segments", property(lambda self: False))
    budget = int(unplanned[0] * 0.7)
    options = {"memory_budget": budget, "executor": "inductor", "policy": "torch-min-cut"}
    with caplog.at_level("WARNING", logger="lohan_compile"):
        peak, report = measured_peak(options, steps=6)
    over = [r for r in caplog.records if "past memory_budget" in r.getMessage()]
    assert len(over) == 1, [r.getMessage() for r in caplog.records]
    planned = report.graphs[0].pass_report("plan_memory")
    assert planned["executor_excess_bytes"] > 0.01 * budget
    assert peak <= budget, (peak, budget)


def test_planned_training_equals_eager_bitwise():
    batches = [batch() for _ in range(3)]
    # the budget covers the whole device, the eager copy trained beside it included
    train_side_by_side(make, batches[:2], lm_loss, lr=1e-3)
    budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.9)
    torch._dynamo.reset()
    le, lc, eager, compiled = train_side_by_side(make, batches, lm_loss, options={"memory_budget": budget}, lr=1e-3)
    for a, b in zip(le, lc):
        assert torch.equal(a, b)
    assert_same_state(eager, compiled)
    report = lohan.last_report()
    summary = report.summary()
    # something moved: swapped or recomputed by the plan, or recomputed by the min-cut partition
    # that auto also considers (which one is faster depends on this machine's profile)
    assert summary["swapped_bytes"] + summary["recomputed_bytes"] > 0
    assert summary["measured_peak_bytes"] <= budget


def test_budget_below_any_plan_raises_budget_error_with_the_smallest(unplanned):
    torch._dynamo.reset()
    cm = torch.compile(make(), backend="lohan", options={"memory_budget": int(unplanned[0] * 0.3)})
    with pytest.raises(Exception) as e:
        lm_loss(cm, batch()).backward()
    # torch wraps compile errors; the BudgetError itself is the wrapper's inner exception
    err = getattr(e.value, "inner_exception", e.value)
    assert lohan.BudgetError.within(e.value) is err  # what the demo and the benches use to find it
    err.__traceback__ = None
    del cm, e  # the model (and frames of the traceback holding it) would count against the next budget
    assert isinstance(err, lohan.BudgetError), repr(err)
    assert err.smallest_feasible_bytes > int(unplanned[0] * 0.3)
    # the budget it names is feasible
    peak, _ = measured_peak({"memory_budget": err.smallest_feasible_bytes})
    assert peak <= err.smallest_feasible_bytes


def test_recompute_all_on_a_graph_breaking_model_is_exact():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(3)]
    le, lc, eager, compiled = train_side_by_side(tiny_gpt2, batches, lm_loss, options={"policy": "recompute-all"}, lr=1e-3)
    for a, b in zip(le, lc):
        assert torch.equal(a, b)
    assert_same_state(eager, compiled)
    report = lohan.last_report()
    assert len(report.graphs) >= 2 and report.summary()["recomputed_bytes"] > 0


def _checkpointed_llama():
    model = tiny_llama(layers=2)
    model.gradient_checkpointing_enable()
    return model


def _half_frozen_llama():
    model = tiny_llama(layers=2)
    for name, p in model.named_parameters():
        if "mlp" in name or "embed" in name:
            p.requires_grad_(False)
    return model


def _autocast_loss(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return lm_loss(model, ids)


@pytest.mark.parametrize(
    "make_model, loss",
    [(_checkpointed_llama, lm_loss), (_half_frozen_llama, lm_loss), (lambda: tiny_llama(layers=2), _autocast_loss)],
    ids=["hf-gradient-checkpointing", "frozen-parameters", "autocast-bf16"],
)
def test_what_users_combine_with_planning_keeps_working(make_model, loss):
    """Planned (recompute-all) training equals aot_eager's bitwise, and eager within tolerance."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    ref = train_side_by_side(make_model, batches, loss, backend="aot_eager", lr=1e-3)
    torch._dynamo.reset()
    out = train_side_by_side(make_model, batches, loss, options={"policy": "recompute-all"}, lr=1e-3)
    for a, b in zip(ref[1], out[1]):
        assert torch.equal(a, b)
    assert_same_state(ref[3], out[3])
    assert_same_state(out[2], out[3], exact=False, atol=1e-4)
    assert lohan.last_report().summary()["recomputed_bytes"] > 0


def test_sequence_lengths_that_change_every_step_stay_within_one_budget():
    lengths = [32, 48, 96, 64, 128, 80]
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 128, (4, t), generator=g) for t in lengths]
    # the budget: 70% of what the longest batch needs unplanned (eager copy beside it included)
    train_side_by_side(make, [batches[4]], lm_loss, lr=1e-3)
    budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.7)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make()
    import copy

    model = copy.deepcopy(eager)
    cm = torch.compile(model, backend="lohan", options={"memory_budget": budget})
    opt_e, opt_c = torch.optim.AdamW(eager.parameters(), lr=1e-3), torch.optim.AdamW(model.parameters(), lr=1e-3)
    peaks = []
    for ids in batches:
        for m, opt in ((eager, opt_e), (cm, opt_c)):
            loss = lm_loss(m, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if m is eager:
                expected = loss.detach()
            else:
                torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        peaks.append(lohan.last_report().summary()["measured_peak_bytes"])
    assert max(peaks) <= budget, (peaks, budget)
    assert_same_state(eager, model, exact=False, atol=1e-5)
    assert any(g.symbolic for g in lohan.last_report().graphs)


@pytest.mark.parametrize("fits", [True, False], ids=["reused", "traced-again"])
def test_a_size_growth_is_planned_again_without_tracing_again(fits, monkeypatch):
    """A re-plan for a larger size runs lohan's passes on the joint graph AOTAutograd traced
    before (its partitions reused) and runs inside the callable AOTAutograd made then: no
    AOTAutograd compile, results equal to eager, the budget kept. A new plan that does not fit
    that callable (here: told it saves other kinds of values) is traced again, as exact."""
    import copy

    from torch._dynamo.utils import counters

    from lohan_compile.backend import compiler

    if not fits:
        calls = iter(range(10**6))
        interface = compiler.aot.saved_interface
        monkeypatch.setattr(compiler.aot, "saved_interface", lambda *a: (interface(*a), next(calls)))
    g = torch.Generator().manual_seed(12)
    batches = [torch.randint(0, 128, (4, t), generator=g) for t in (32, 48, 128, 128, 200)]
    train_side_by_side(make, [batches[3]], lm_loss, lr=1e-3)
    budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.7)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make()
    model = copy.deepcopy(eager)
    cm = torch.compile(model, backend="lohan", options={"memory_budget": budget, "executor": "fx"})
    traced, graphs, peaks = [], [], []
    for report in sgd_side_by_side(eager, model, cm, batches):
        traced.append(counters["aot_autograd"]["total"])
        graphs.append(report.graphs[0])
        peaks.append(report.summary()["measured_peak_bytes"])
    # the second length compiles the graph with symbolic sizes; the third re-plans it (for 1.5x
    # its size), the fifth again
    assert graphs[1].symbolic and graphs[2] is not graphs[1] and graphs[3] is graphs[2] and graphs[4] is not graphs[3]
    if fits:
        assert traced[2] == traced[1], "the re-plan traced the graph again"
        assert graphs[2].pass_report("partition_graph")["partitions_reused"] >= 1
        # each re-plan plans the partition the plan before ran alone (it still fits), and makes
        # no partition: the symbolic graph's first plan recorded its partition even where
        # everything fit kept, and nothing was weighed
        first, weighed, again = (graphs[i].pass_report("partition_graph") for i in (1, 2, 4))
        assert first.get("partition") is not None, first["partitioner"]
        for replanned in (weighed, again):
            assert replanned["partition"] == first["partition"], replanned
            assert "the plan before chose" in replanned["partitioner"] and replanned["partitions_made"] == 0, replanned
    else:
        assert traced[2] > traced[1]
    assert max(peaks) <= budget, (peaks, budget)
    assert_same_state(eager, model, exact=False, atol=1e-5)


@pytest.mark.parametrize("refused", [False, True], ids=["weighed", "refused"])
def test_a_replan_weighs_the_partitions_once_the_steps_could_have_lost_what_weighing_costs(refused, monkeypatch):
    """A re-plan keeps the partition the plan before ran (weighed against none: everything fit
    kept) and reports the most weighing could gain per step; once the steps run since could
    have lost what weighing costs, the graph is planned again with every partition weighed.
    (Here weighing is taken to cost next to nothing: one step's loss pays for it.) Where the
    weighing finds no plan that fits (told so here), the plan running stays. Results equal
    eager's, the budget kept."""
    import copy
    import sys

    from lohan_compile.backend import replan
    from lohan_compile.errors import BudgetError

    defer = replan.Replanning._defer_weighing
    reports, peaks = [], []
    if refused:
        module = sys.modules["lohan_compile.passes.partition_graph"]
        as_before, prefer = module._as_before, module.prefer_min_cut
        armed = []

        def kept_alone(*args, **kwargs):
            armed.append(True)  # (the weighing comes after the re-plan that kept its partition)
            return as_before(*args, **kwargs)

        def refuse(*args, **kwargs):
            if armed:
                armed.append(len(reports))  # (the step it was refused at)
                raise BudgetError("no plan fits (the test says)", smallest_feasible_bytes=None)
            return prefer(*args, **kwargs)

        monkeypatch.setattr(module, "_as_before", kept_alone)
        monkeypatch.setattr(module, "prefer_min_cut", refuse)

    def cheap(self):
        self.weigh_cost_s = 1e-9  # (one step's loss pays for it)
        report = self.record.pass_report("partition_graph") or {}
        if report.get("weighed") is False and "gain_bound_s" in report:
            # (whether this small model's plan is predicted more than 2% slower than keeping
            # everything, past which weighing could gain, depends on what the process holds)
            report["gain_bound_s"] = max(report["gain_bound_s"], 1e-4)
        defer(self)

    monkeypatch.setattr(replan.Replanning, "_defer_weighing", cheap)
    g = torch.Generator().manual_seed(12)
    batches = [torch.randint(0, 128, (4, t), generator=g) for t in (32, 48, 128, 128, 128, 128)]
    train_side_by_side(make, [batches[3]], lm_loss, lr=1e-3)
    budget = int(lohan.last_report().summary()["predicted_peak_bytes"] * 0.5)  # (the plan's: not the process's)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make()
    model = copy.deepcopy(eager)
    cm = torch.compile(model, backend="lohan", options={"memory_budget": budget, "executor": "fx",
                                                      "hardware": "rtx4090"})  # (predictions not this machine's)
    for report in sgd_side_by_side(eager, model, cm, batches):
        reports.append(report.graphs[0].pass_report("partition_graph"))
        peaks.append(report.summary()["measured_peak_bytes"])
    first, kept, weighed = reports[1], reports[2], reports[4]
    assert first["weighed"] is False, first["partitioner"]  # (everything fit kept at 48 tokens)
    assert "the plan before chose" in kept["partitioner"] and kept["weighed"] is False, kept["partitioner"]
    assert kept["gain_bound_s"] > 0 and kept["weighed_after_steps"] == 1, kept
    assert reports[3] is kept  # (its one step)
    if refused:
        assert set(armed[1:]) == {4}, armed  # (at the step it was due, not at every step after)
        assert reports[4] is kept and reports[5] is kept
    else:
        assert weighed is not kept and "the plan before chose" not in weighed["partitioner"], weighed["partitioner"]
        assert "keep_all_step_s" in weighed, weighed  # (prefer_min_cut weighed it)
        assert reports[5] is weighed or "the plan before chose" in reports[5]["partitioner"]
    assert max(peaks) <= budget, (peaks, budget)
    assert_same_state(eager, model, exact=False, atol=1e-5)


def test_torch_min_cut_baseline_meets_the_budget_and_equals_eager(unplanned):
    """The "torch-min-cut" policy: torch's partitioner with its activation budget searched to
    fit ours; gradients equal eager's, the peak within the budget; too small a budget raises."""
    budget = int(unplanned[0])  # min-cut saves little on this model: more than ~3% less misses
    peak, report = measured_peak({"memory_budget": budget, "policy": "torch-min-cut"})
    assert peak <= budget
    part = report.graphs[0].pass_report("partition_graph")
    assert part["partitioner"] == "torch min-cut"
    fraction, predicted = part["fractions_tried"][-1]
    assert fraction == part["activation_memory_budget"] and predicted <= budget
    assert report.graphs[0].pass_report("plan_memory")["plan"].policy == "torch-min-cut"
    batches = [batch() for _ in range(2)]
    torch._dynamo.reset()
    le, lc, eager, compiled = train_side_by_side(
        make, batches, lm_loss, options={"memory_budget": budget, "policy": "torch-min-cut"}, lr=1e-3)
    for a, b in zip(le, lc):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert_same_state(eager, compiled, exact=False, atol=1e-4)
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        measured_peak({"memory_budget": int(unplanned[0] * 0.5), "policy": "torch-min-cut"}, steps=1)
    inner = e.value
    while inner is not None and not isinstance(inner, lohan.BudgetError):
        inner = inner.__cause__ or getattr(inner, "inner_exception", None)
    assert isinstance(inner, lohan.BudgetError) and inner.smallest_feasible_bytes


def _gpt2_256():
    """GPT-2 with a hidden size whose matmuls make auto recompute some of them (on the RTX 4090 preset)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=256, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def test_recomputation_before_the_wait_of_what_it_reads_is_exact():
    """auto recomputes a GELU product from a value it swaps; the plan recomputes it before its
    first real use, but the rewrite put it before the value's first reader, a view, which came
    before the swapped value's wait: apply_plan moves the recomputation after the wait (the
    compile failed with "reads ... before the plan waits for it"). Gradients equal eager's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lohan_compile.runtime import device

    device.install()  # counted alike alone and after other tests (only the compiled model is alive)

    def model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(1))
    options = {"hardware": "rtx4090"}

    def compiled_step(**more):
        torch._dynamo.reset()
        compiled = model()
        loss = lm_loss(torch.compile(compiled, backend="lohan", options={**options, **more}), ids)
        loss.backward()
        return loss.detach(), compiled

    compiled_step(policy="keep-all")
    keep = lohan.last_report().graphs[0].predicted_peak_bytes
    # (a budget at which auto's plan, on a preset's speeds, recomputes from a swapped value)
    lc, compiled = compiled_step(memory_budget=int(keep * 0.55))
    moved = sum(g.pass_report("apply_plan")["recomputations_after_waits"] for g in lohan.last_report().graphs)
    assert moved, "no recomputation read a swapped value before its wait: this test needs another budget"
    eager = model()
    le = lm_loss(eager, ids)
    le.backward()
    assert torch.equal(le.detach(), lc)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_gelu_is_recomputed_whole_from_the_matmul_output_and_exactly():
    """GPT-2's GELU (``gelu_new``: pow, mul, add, mul, tanh, add, mul) saves four results for
    backward. Each is recomputed by a chain of its ops from the one value a matmul made, not
    only where its single op reads saved values: all four go under recompute-all, none of
    their recomputations reads another's, and gradients equal eager's bitwise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=2, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = model()
    cm = torch.compile(compiled, backend="lohan", options={"policy": "recompute-all", "executor": "fx"})
    lc = lm_loss(cm, ids)
    lc.backward()
    eager = model()
    le = lm_loss(eager, ids)
    le.backward()
    assert torch.equal(le.detach(), lc.detach())
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad), name
    planned = lohan.last_report().graphs[0].pass_report("plan_memory")
    plan, problem = planned["plan"], planned["problem"]
    by_key = {c.key: c for c in problem.candidates}
    recomputed = [c for c in problem.candidates if plan.decisions[c.key].action is Action.RECOMPUTE]
    gelu = [c for c in recomputed if any(op.startswith("tanh") for op in c.recompute_ops)]
    assert len(gelu) >= 3, [c.recompute_ops for c in recomputed]  # tanh, 1 + tanh, the product
    # what the chains' intermediates hold while they run is planned (under fx, two of GELU's
    # at once): the prediction is never below the measured peak, and close to it
    summary = lohan.last_report().summary()
    measured, predicted = summary["measured_peak_bytes"], summary["predicted_peak_bytes"]
    assert measured <= predicted <= 1.12 * measured, (predicted, measured)
    assert max(len(c.recompute_ops) for c in gelu) >= 6
    for c in gelu:
        assert all(plan.decisions[n].action is not Action.RECOMPUTE for n in c.recompute_needs)
        assert all(n not in by_key or by_key[n].recompute_seconds is None or "mm" in by_key[n].name
                   for n in c.recompute_needs)


def test_recomputation_that_reads_a_swapped_value_is_exact(monkeypatch):
    """auto recomputes a value from a saved view of a storage it swaps (a linear layer's output
    from its layer norm's output; in GPT-3 shaped models, GELU's input): backward rebuilds that
    view from the swapped-in storage and recomputes from it. Gradients equal eager's bitwise.
    (On the default partition, where auto's plan does that: for this model and budget it
    prefers torch's min-cut partition, which saves other values.)"""
    import copy
    import importlib

    from lohan_compile.runtime import device

    partition = importlib.import_module("lohan_compile.passes.partition_graph")
    monkeypatch.setattr(partition, "prefer_min_cut", lambda *args: None)

    device.install()  # count the eager copy's memory in both compiles below, as resident
    ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(13))
    options = {"hardware": "rtx4090"}  # a preset: the plan does not depend on this machine's speeds

    def step(budget):
        torch._dynamo.reset()
        torch.manual_seed(0)
        eager = _gpt2_256()
        compiled = copy.deepcopy(eager)
        cm = torch.compile(compiled, backend="lohan", options={**options, "memory_budget": budget})
        losses = []
        for model in (cm, eager):  # eager's gradients are not on the device while lohan plans
            loss = lm_loss(model, ids)
            loss.backward()
            losses.append(loss.detach())
        return losses, eager, compiled

    step(None)
    # the model's graph (the loss is a second one): a budget that moves part of its saved
    # activations off the device, whatever else the device holds
    model_graph = lohan.last_report().graphs[0]
    saved = sum(c.bytes for c in model_graph.pass_report("plan_memory")["problem"].candidates)
    budget = model_graph.predicted_peak_bytes - int(0.5 * saved)
    (lc, le), eager, compiled = step(budget)
    assert torch.equal(le, lc)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.equal(a.grad, b.grad), name
    reads_swapped = []
    for graph in lohan.last_report().graphs:
        planned = graph.pass_report("plan_memory")
        plan, problem = planned["plan"], planned["problem"]
        reads_swapped += [
            (c.key, need) for c in problem.candidates if plan.decisions[c.key].action is Action.RECOMPUTE
            for need in c.recompute_needs if plan.decisions[need].action is Action.SWAP
        ]
    assert reads_swapped, "the plan no longer recomputes from a swapped value: this test needs another budget"


def test_a_graph_breaking_model_predicts_its_step_peak_within_the_budget():
    """GPT-2 runs two graphs per step (its loss is the second): each graph's prediction counts
    what the device held when it was planned, so the step's predicted peak is the highest of
    them, within the budget, and close to the measured peak (the sum of every graph's peak and
    the others' saved values overstated it past the budget)."""
    def run(options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_gpt2(layers=2)
        cm = torch.compile(model, backend="lohan", options=options)
        ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(3))
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            lm_loss(cm, ids).backward()
        return lohan.last_report()

    unplanned = run({}).summary()["measured_peak_bytes"]
    budget = int(0.8 * unplanned)
    report = run({"memory_budget": budget})
    summary = report.summary()
    assert summary["graphs"] == 2
    assert summary["predicted_peak_bytes"] <= budget
    assert summary["measured_peak_bytes"] <= budget
    assert abs(summary["predicted_peak_bytes"] - summary["measured_peak_bytes"]) <= 0.10 * summary["measured_peak_bytes"]


def test_a_graph_breaking_model_holds_the_smallest_budget_its_error_names():
    """A budget no plan fits names the smallest that does, for a step of two graphs too (GPT-2's
    loss is the second, compiled during the first step beside what the first graph saved): the
    step run at the named budget (and a rounding's margin) stays within it. A retry may name a
    larger budget once the second graph is known; it must then hold (a first plan that filled
    the room the second graph needed once made every retry name a larger budget again; with the
    fx executor, which these tests use, the first name holds)."""
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(3))

    def run(budget):
        def build():
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = tiny_gpt2(layers=2)
            return model, torch.compile(model, backend="lohan", options={"memory_budget": budget})

        def step(state):
            model, cm = state
            model.zero_grad(set_to_none=True)
            lm_loss(cm, ids).backward()

        return measure_device_peak(build, step, steps=3).peak_bytes, lohan.last_report().summary()

    named, names = 1 << 20, []
    for _ in range(3):  # (the first try names a budget; at most one more name after it)
        budget = int(named * 1.002)
        try:
            peak, summary = run(budget)
            break
        except Exception as e:  # noqa: BLE001 - the BudgetError, wrapped by torch at compile time
            err = lohan.BudgetError.within(e)
            assert err is not None and err.smallest_feasible_bytes, e
            assert err.smallest_feasible_bytes > named, "a larger budget named a smaller one"
            named = err.smallest_feasible_bytes
            names.append(named)
    else:
        pytest.fail(f"every budget named failed: {names}")
    assert summary["graphs"] == 2
    assert peak <= budget, (peak, budget, names)
    assert summary["predicted_peak_bytes"] <= budget


def test_a_trial_keeps_the_simulators_choice_unless_another_plan_wins_round_by_round():
    from lohan_compile.backend.replan import _trial_winner

    a = [1.0, 1.0, 1.3, 1.3, 1.3]  # the machine slowed after two rounds
    # b's median (1.05) is below a's (1.3), yet it was slower in four rounds of five
    assert _trial_winner({"a": a, "b": [1.05, 1.05, 1.35, 1.35, 0.7]}, 0.97) == "a"
    # faster in every round, by less than the margin: noise as far as a trial can tell
    assert _trial_winner({"a": a, "b": [0.98 * t for t in a]}, 0.97) == "a"
    c = [0.95 * t for t in a]
    assert _trial_winner({"a": a, "b": [0.98 * t for t in a], "c": c}, 0.97) == "c"
    assert _trial_winner({"a": a, "d": [0.5 * t for t in a], "c": c}, 0.97) == "d"
    assert _trial_winner({"a": a}, 0.97) == "a"
    # the first noisy: both others beat it, and the one faster than the other round by round
    # (x: y over x has median 1.08) is kept; ranked by their ratios to the noisy first, y
    # (0.67) would have beaten x (0.75)
    first = [1.0, 1.0, 2.0, 1.0, 2.0]
    x, y = [0.94, 0.78, 0.60, 0.75, 0.74], [0.68, 0.67, 0.77, 0.81, 0.81]
    assert _trial_winner({"a": first, "y": y, "x": x}, 0.97) == "x"


def test_auto_times_its_close_plans_keeps_the_fastest_and_stays_exact(monkeypatch):
    """A trial (``tune_plans``): every plan of auto's within the margin is compiled, warmed up
    and run in turn; the simulator's choice stays unless another ran faster by a margin. Switching plans between
    steps changes nothing in the numbers, and each plan keeps the budget."""
    from lohan_compile.backend.replan import Replanning
    from lohan_compile.plan.policies import AUTO_FAMILIES

    # every plan that fits is close enough; one warm-up step and one timed step each
    monkeypatch.setattr(Replanning, "TRIAL_MARGIN", 1e9)
    monkeypatch.setattr(Replanning, "TRIAL_WARMUP", 1)
    monkeypatch.setattr(Replanning, "TRIAL_STEPS", 1)
    g = torch.Generator().manual_seed(5)
    # enough steps for a trial that starts again at the second step (planned again once the
    # loop is seen dropping the logits): warm-up, compile and a timed step for each of 3 plans
    batches = [torch.randint(0, 128, (4, 96), generator=g) for _ in range(10)]
    # plain SGD: no optimizer state appears after the first step, so nothing re-plans
    losses, models, plans_run, peaks = {}, {}, [], []
    for name in ("eager", "unplanned", "tuned", "untuned"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = models[name] = make()
        options = ({"memory_budget": budget, "tune_plans": name == "tuned"}
                   if name in ("tuned", "untuned") else None)
        run = model if name == "eager" else torch.compile(model, backend="lohan", options=options)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        losses[name] = []
        for ids in batches[: 1 if name == "unplanned" else None]:
            loss = lm_loss(run, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.detach())
            if name == "tuned":
                s = lohan.last_report().summary()
                plans_run.extend(s["plans"])
                peaks.append(s["measured_peak_bytes"])
        if name == "unplanned":
            budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.9)
        elif name != "eager":
            summary, (graph,) = lohan.last_report().summary(), lohan.last_report().graphs
            for a, b in zip(losses["eager"], losses[name]):
                assert torch.equal(a, b)
            assert_same_state(models["eager"], model)
        if name == "tuned":
            (trials,) = summary["plan_trials"]
            # the close plans in order of predicted step (less any that would no longer fit)
            assert 2 <= len(trials) <= Replanning.TRIAL_PLANS and set(trials) <= set(plans_run)
            for v in trials:
                partition, family = v.split("/")
                assert partition in ("default", "min-cut") and family in AUTO_FAMILIES + ("keep-all",)
            # the first (the simulator's choice) stays unless another ran faster by the margin
            first, fastest = next(iter(trials)), min(trials, key=trials.get)
            kept = fastest if trials[fastest] < Replanning.TRIAL_SWITCH * trials[first] else first
            assert summary["plans"] == [kept] and plans_run[-1] == kept
            assert max(peaks) <= budget, (list(zip(plans_run, peaks)), budget)
        if name == "untuned":
            assert summary["plan_trials"] == [{}] and graph.variants and not graph.trials


def test_a_trial_calibrates_each_plan_once(monkeypatch):
    """A trial swaps its plans in and out with what goes with each: a plan is simulated again
    with its measured op times (calibrated) once, not at every step the trial brings it back."""
    from lohan_compile.backend.replan import Replanning

    monkeypatch.setattr(Replanning, "TRIAL_MARGIN", 1e9)
    monkeypatch.setattr(Replanning, "TRIAL_WARMUP", 1)
    monkeypatch.setattr(Replanning, "TRIAL_STEPS", 4)  # (each plan runs long enough to be timed)
    calibrated = []
    calibrate = Replanning._calibrate
    monkeypatch.setattr(Replanning, "_calibrate", lambda self: (calibrated.append(self.record), calibrate(self)))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (4, 96), generator=g)
    budget = None
    for options in (None, "tuned"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = make()
        run = torch.compile(model, backend="lohan",
                            options=None if options is None else {"memory_budget": budget, "tune_plans": True})
        for _ in range(1 if options is None else 60):
            lm_loss(run, ids).backward()
            model.zero_grad(set_to_none=True)
            if options is not None and lohan.last_report().summary()["plan_trials"] != [{}]:
                break  # the trial is over
        if options is None:
            budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.9)
    assert lohan.last_report().summary()["plan_trials"] != [{}], "no trial ended in 60 steps"
    assert calibrated and max(sum(r is record for r in calibrated) for record in calibrated) == 1


def test_what_compiling_left_behind_holds_no_device_memory_into_later_steps():
    """dynamo's trace of a graph-breaking model leaves reference cycles holding the first
    step's real tensors (GPT-2's outputs and cache); the backend collects them after the
    first step, so later steps start from the same device level as the first (with
    automatic garbage collection off, nothing else would)."""
    import gc

    from lohan_compile.runtime import device

    device.install()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (16, 64), generator=g)
    torch.manual_seed(0)
    model = tiny_gpt2(layers=2)
    lm_loss(model, ids).backward()  # an eager step first, as a user checking the model would
    model.zero_grad(set_to_none=True)
    gc.collect()
    start = device.allocated()
    cm = torch.compile(model, backend="lohan", options={"memory_budget": 200 << 20, "policy": "swap-all"})
    gc.disable()
    try:
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            lm_loss(cm, ids).backward()
        model.zero_grad(set_to_none=True)
        left = device.allocated() - start
    finally:
        gc.enable()
    assert left < 64 << 10, left
    summary = lohan.last_report().summary()
    assert abs(summary["predicted_peak_bytes"] / summary["measured_peak_bytes"] - 1) <= 0.1


class LossAndLogits(torch.nn.Module):
    """Returns its loss and its logits, as a Hugging Face model does; the logits are nothing
    backward needs (cross-entropy saves its own log-softmax)."""

    def __init__(self, d=128, vocab=2048, layers=4):
        super().__init__()
        self.body = torch.nn.Sequential(*(
            torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
            for _ in range(layers)))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, x, y):
        logits = self.head(self.body(x))
        return torch.nn.functional.cross_entropy(logits, y), logits


def test_outputs_the_step_drops_before_backward_are_planned_as_gone():
    """The plan first assumes the user holds every forward output through backward; a loop
    that keeps only the loss drops the logits (4 MiB here) before backward starts. The runtime
    sees it at the first backward: the next steps predict their peak without them, within 10%
    of the measured peak, and auto, whose first plan had to move activations for the logits'
    room, plans again and keeps everything. A loop that holds the logits keeps the first plan."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 128, generator=g), torch.randint(0, 2048, (512,), generator=g)

    def train(options, hold, steps=3):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LossAndLogits()
        cm = torch.compile(model, backend="lohan", options=options)
        summaries = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            loss, logits = cm(x, y)
            if not hold:
                del logits
            loss.backward()
            summaries.append(lohan.last_report().summary())
            logits = None
        return summaries

    logits_bytes = 512 * 2048 * 4
    dropped = train({}, hold=False)
    held = train({}, hold=True)
    # nothing seen yet at the first step (what else the device holds differs by a few KiB)
    assert dropped[0]["predicted_peak_bytes"] == pytest.approx(held[0]["predicted_peak_bytes"], rel=0.01)
    assert dropped[-1]["predicted_peak_bytes"] <= held[-1]["predicted_peak_bytes"] - 0.9 * logits_bytes
    assert held[-1]["measured_peak_bytes"] >= dropped[-1]["measured_peak_bytes"] + 0.9 * logits_bytes
    for s in (dropped[-1], held[-1]):
        assert abs(s["predicted_peak_bytes"] / s["measured_peak_bytes"] - 1) <= 0.10, s

    # a budget keeping everything meets only once the logits are known to be gone
    budget = int(dropped[-1]["predicted_peak_bytes"] * 1.02)
    assert held[-1]["predicted_peak_bytes"] > budget
    options = {"memory_budget": budget, "tune_plans": False}
    first, *_, last = train(options, hold=False, steps=4)
    assert first["swapped_bytes"] + first["recomputed_bytes"] > 0
    assert last["swapped_bytes"] == last["recomputed_bytes"] == 0
    assert last["measured_peak_bytes"] <= budget
    assert abs(last["predicted_peak_bytes"] / last["measured_peak_bytes"] - 1) <= 0.10
    held = train(options, hold=True, steps=3)
    assert held[-1]["swapped_bytes"] + held[-1]["recomputed_bytes"] > 0
    assert held[-1]["measured_peak_bytes"] <= budget


def _eager_loss(h, head):
    """A loss computed outside the compiled model (as TRL's SFTTrainer does, through its chunked
    LM head): a 4 MiB scratch buffer, allocated and freed while the graph's saved activations
    are held."""
    scratch = torch.ones(1024 * 1024)
    return head(h * scratch[:1]).square().mean()


class Body(torch.nn.Module):
    def __init__(self, d=256, layers=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def test_memory_that_eager_code_holds_between_forward_and_backward_is_planned_from_then_on():
    """The step's peak is the graph's saved activations plus the eager loss's scratch. lohan
    cannot see the scratch before it runs; once measured (after the first step, whose
    compile-time garbage is still held) the graph is planned again holding it there, and every
    step from then on keeps the budget."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(512, 256, generator=g) for _ in range(6)]

    def peaks(options):
        torch._dynamo.reset()
        torch.manual_seed(0)
        body, head = Body(), torch.nn.Linear(256, 8)
        cm = torch.compile(body, backend="lohan", options=options)
        out = []
        for x in xs:
            _eager_loss(cm(x), head).backward()
            out.append(lohan.last_report().summary()["measured_peak_bytes"])
        return out

    unplanned = max(peaks({"executor": "fx"}))
    budget = int(unplanned * 0.85)
    planned = peaks({"executor": "fx", "memory_budget": budget})
    record = lohan.last_report().runs[0].graph
    assert record.pass_report("plan_memory")["problem"].outside_bytes >= 4 * 2**20
    assert lohan.last_report().summary()["outside_bytes"][0] >= 4 * 2**20  # the report says so
    assert max(planned[2:]) <= budget, (planned, budget)
    # the loss reads the forward's output while it allocates, and drops it only then: the plan
    # holds the output beside the outside code's bytes (one 512 KiB activation), as the step does
    last = lohan.last_report().summary()
    assert last["predicted_peak_bytes"] == pytest.approx(last["measured_peak_bytes"], rel=0.01), last
