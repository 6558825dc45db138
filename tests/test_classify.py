"""Node roles come from AOTAutograd's metadata, never from node names."""

import torch
import torch.nn.functional as F

import lohan_compile as lohan
from lohan_compile.graph.meta import Role, get_info
from lohan_compile.graph.pipeline import Pass, Pipeline
from lohan_compile.passes import default_passes
from models import MLP, ConvBN, Block, tiny_llama


def capture_graphs(model, run, passes=None):
    """Compile and run ``model``; return the Graphs each compile produced."""
    import lohan_compile.passes as passes_module

    captured = []
    base = passes or default_passes()

    def keep(graphs, facts):
        captured.append((graphs, facts))
        return graphs, {}

    original = passes_module.default_pipeline
    passes_module.default_pipeline = lambda: Pipeline(base + [Pass("capture", keep, inference=True)])
    try:
        run(torch.compile(model, backend="lohan"))
    finally:
        passes_module.default_pipeline = original
    return captured


def roles(gm):
    return {n: get_info(n).role for n in gm.graph.nodes}


def test_placeholder_roles_and_gradients_of_parameters():
    model = ConvBN()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    [(graphs, facts)] = capture_graphs(model, lambda cm: cm(x).sum().backward())
    joint = graphs.joint
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    by_role = {}
    for n in placeholders:
        by_role.setdefault(get_info(n).role, []).append(n)
    assert len(by_role[Role.PARAM]) == len(list(model.parameters()))
    assert len(by_role[Role.BUFFER]) == len(list(model.buffers()))
    assert len(by_role[Role.INPUT]) == 1 and get_info(by_role[Role.INPUT][0]).requires_grad
    assert len(by_role[Role.TANGENT]) == 1

    # every gradient output names the input it belongs to, and the shapes agree
    params = {facts.inputs[get_info(n).input_index].index: n for n in by_role[Role.PARAM]}
    grads = [n for n in joint.graph.nodes if get_info(n).grad_of]
    covered = set()
    for g in grads:
        for idx in get_info(g).grad_of:
            covered.add(idx)
            target = next(n for n in placeholders if get_info(n).input_index == idx)
            assert g.meta["val"].shape == target.meta["val"].shape
    x_index = get_info(by_role[Role.INPUT][0]).input_index
    assert covered == set(params) | {x_index}
    sources = [get_info(n).source for n in by_role[Role.PARAM]]
    assert any("conv" in s and "weight" in s for s in sources)


def test_roles_do_not_depend_on_node_names():
    """Swap the telling names around (primals <-> tangents); every role stays."""

    def scramble(graphs, facts):
        for i, n in enumerate(graphs.joint.graph.nodes):
            if n.op != "output":
                n._rename(f"tangents_{i}" if n.name.startswith("primals") else f"primals_{i}")
        graphs.joint.recompile()
        return graphs, {}

    x = torch.randn(4, 32)
    plain = capture_graphs(MLP(), lambda cm: cm(x).sum().backward())
    torch._dynamo.reset()
    scrambled = capture_graphs(
        MLP(), lambda cm: cm(x).sum().backward(), passes=[Pass("scramble", scramble)] + default_passes()
    )
    r1 = [get_info(n).role for n in plain[0][0].joint.graph.nodes]
    r2 = [get_info(n).role for n in scrambled[0][0].joint.graph.nodes]
    assert r1 == r2
    names = [n.name for n in scrambled[0][0].joint.graph.nodes if get_info(n).role is Role.PARAM]
    assert all(name.startswith("tangents_") for name in names)


def test_forward_and_backward_roles_follow_partitioner_tags():
    [(graphs, _)] = capture_graphs(Block(), lambda cm: cm(torch.randn(2, 8, 64)).sum().backward())
    for n in graphs.fw.graph.nodes:
        if n.op == "call_function":
            assert get_info(n).role in (Role.FORWARD, Role.SAVED)
    assert any(get_info(n).role is Role.BACKWARD for n in graphs.bw.graph.nodes)


def test_saved_activations_are_deduplicated_and_input_views_are_not_activations():
    x = torch.randn(16, 32)
    [(graphs, _)] = capture_graphs(MLP(), lambda cm: cm(x).sum().backward())
    saved = [n for n in graphs.fw.graph.nodes if get_info(n).role is Role.SAVED]
    views_of_params = [n for n in saved if get_info(n).saved_input_view]
    activations = {get_info(n).storage_of for n in saved if not get_info(n).saved_input_view}
    # relu (plus its detach alias), fc2's output (gelu's input) and gelu's output
    assert len(activations) == 3
    assert len(views_of_params) == 2  # the transposed weights of fc2 and head
    # 3 activations of 16x64 fp32
    assert lohan.last_report().summary()["kept_bytes"] == 3 * 16 * 64 * 4
    # the backward placeholders of saved values carry the same facts
    bw_saved = [n for n in graphs.bw.graph.nodes if n.op == "placeholder" and get_info(n).role is Role.SAVED]
    assert {get_info(n).storage_of for n in bw_saved} >= activations


def test_model_checkpointing_shows_up_as_recomputed_bytes():
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.ckpt = ckpt
            self.a = torch.nn.Linear(32, 64)
            self.b = torch.nn.Linear(64, 32)

        def inner(self, y):
            return self.b(F.gelu(self.a(y)))

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False) if self.ckpt else self.inner(x)

    summaries = {}
    for ckpt in (False, True):
        torch._dynamo.reset()
        torch.compile(Net(ckpt), backend="lohan")(torch.randn(8, 32)).sum().backward()
        summaries[ckpt] = lohan.last_report().summary()
    assert summaries[False]["recomputed_bytes"] == 0
    assert summaries[True]["recomputed_bytes"] > 0  # the checkpointed region runs again in backward
    assert summaries[True]["kept_bytes"] < summaries[False]["kept_bytes"]


def test_inference_graph_roles():
    with torch.no_grad():
        [(graphs, facts)] = capture_graphs(tiny_llama(), lambda cm: cm(input_ids=torch.randint(0, 128, (1, 8))))
    assert graphs.inference
    rs = set(roles(graphs.fw).values())
    assert Role.PARAM in rs and Role.INPUT in rs and Role.TANGENT not in rs and Role.BACKWARD not in rs


def test_saved_tensors_pair_with_backward_placeholders_under_dynamic_shapes():
    """Backward takes saved sizes before saved tensors: pairing must go by kind, not position."""
    from lohan_compile.graph.saved import SavedValues

    x = torch.randn(6, 32)
    torch._dynamo.mark_dynamic(x, 0)
    [(graphs, _)] = capture_graphs(MLP(), lambda cm: cm(x).sum().backward())
    saved = SavedValues(graphs.fw, graphs.bw)
    assert saved.bw_syms, "a dynamic batch size is saved for backward"
    for fw_value, placeholder in saved.tensor_pairs():
        assert fw_value.meta["val"].shape == placeholder.meta["val"].shape
        if get_info(fw_value).role is Role.SAVED:
            assert get_info(placeholder).storage_of == get_info(fw_value).storage_of
