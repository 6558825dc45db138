import pytest
import torch

import lohan_compile as lohan
from lohan_compile.options import Options
from lohan_compile.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096),
        ("4096", 4096),
        ("6GiB", 6 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 GB", 1_500_000_000),
        ("2 kib", 2048),
        ("1TiB", 2**40),
        ("100B", 100),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6G", "six GiB", "-1GiB", "1.2.3MB", "", 0, -5, 1.5, True, None, [1]])
def test_malformed_sizes_say_what_is_accepted(bad):
    with pytest.raises(ValueError) as e:
        parse_bytes(bad, name="memory_budget")
    msg = str(e.value)
    assert "memory_budget" in msg
    if bad not in (0, -5):
        assert "GiB" in msg  # the accepted forms are listed


def test_ambiguous_unit_suggests_both_readings():
    with pytest.raises(ValueError, match="GiB.*GB|ambiguous"):
        parse_bytes("6G")


def test_unknown_key_names_valid_keys_with_did_you_mean():
    with pytest.raises(ValueError) as e:
        Options(memory_budgt="6GiB")
    msg = str(e.value)
    assert "did you mean 'memory_budget'" in msg.lower()
    for key in ("memory_budget", "optimizer", "hardware", "offload_params", "ssd_dir",
                "host_memory_budget", "policy", "dump_dir"):
        assert key in msg


def test_defaults_and_parsed_values(tmp_path):
    o = Options(memory_budget="6GiB", host_memory_budget=2**30, ssd_dir=tmp_path, policy="keep-all")
    assert o.memory_budget == 6 * 2**30 and o.host_memory_budget == 2**30
    assert o.ssd_dir == str(tmp_path) and o.policy == "keep-all"
    d = Options()
    assert d.memory_budget is None and d.optimizer is None and d.hardware == "auto"
    assert d.offload_params == "auto" and d.policy == "auto"
    # the tests pin the fx executor (conftest); users get Inductor unless LOHAN_EXECUTOR says fx
    assert d.executor == "fx"
    from lohan_compile import settings

    with settings.EXECUTOR.override("inductor"):
        assert Options().executor == "inductor"
    assert settings.EXECUTOR.default == "inductor"


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("policy", "swap_all", "did you mean 'swap-all'"),
        ("offload_params", 1, "offload_params=1"),
        ("offload_params", "yes", "choose one of"),
        ("executor", "inductr", "did you mean 'inductor'"),
        ("mode", "max_autotune", "did you mean"),
        ("optimizer", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "CPUAdamW"),
        ("hardware", "rtx9090", "hardware="),
        ("disable_passes", 3, "pass names"),
        ("debug", "yes", "True, False or None"),
        ("tune_plans", None, "expected True or False"),
    ],
)
def test_malformed_values_raise_value_error(key, value, fragment):
    with pytest.raises(ValueError) as e:
        Options(**{key: value})
    assert fragment.lower() in str(e.value).lower()


def test_ssd_dir_must_be_an_existing_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        Options(ssd_dir=f)
    with pytest.raises(ValueError, match="does not exist"):
        Options(ssd_dir=tmp_path / "missing")


def test_mode_from_torch_compile_is_accepted_and_checked():
    assert Options.coerce(None, mode="max-autotune").mode == "max-autotune"
    assert Options.coerce({"executor": "fx"}, mode=None).mode == "default"
    with pytest.raises(ValueError, match="conflicts"):
        Options.coerce({"mode": "max-autotune"}, mode="reduce-overhead")
    with pytest.raises(ValueError):
        Options.coerce(None, mode="fastest")
    with pytest.raises(ValueError, match="dict of lohan options"):
        Options.coerce(["memory_budget"])


def test_bad_options_surface_at_first_call_with_the_message():
    cm = torch.compile(torch.nn.Linear(2, 2), backend="lohan", options={"polcy": "auto"})
    with pytest.raises(Exception) as e:
        cm(torch.randn(1, 2))
    assert "did you mean 'policy'" in str(e.value).lower()


def test_mode_argument_reaches_the_backend():
    cm = torch.compile(torch.nn.Linear(2, 2), backend="lohan", mode="max-autotune-no-cudagraphs")
    out = cm(torch.randn(3, 2))
    assert out.shape == (3, 2)


def test_options_not_yet_supported_are_refused_not_ignored():
    cm = torch.compile(torch.nn.Linear(2, 2), backend="lohan", options={"policy": "zero-infinity"})
    with pytest.raises(Exception, match="cannot honour"):
        cm(torch.randn(3, 2))


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert format_bytes(None) == "-"


def test_options_object_is_accepted_by_the_backend():
    opts = lohan.Options(executor="fx", debug=True)
    cm = torch.compile(torch.nn.Linear(2, 2), backend="lohan", options=opts)
    cm(torch.randn(3, 2)).sum().backward()
    assert lohan.last_report() is not None


def test_cpu_adamw_is_the_valid_optimizer_option():
    model = torch.nn.Linear(2, 2)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3)
    assert Options(optimizer=opt).optimizer is opt
