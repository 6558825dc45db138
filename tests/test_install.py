"""Installed as a user would: the entry point, and a non-editable ``pip install .``."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USE_BACKEND_BY_NAME = """
import sys, torch
assert "lohan_compile" not in sys.modules
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
cm = torch.compile(model, backend="lohan")
cm(torch.randn(3, 4)).sum().backward()
assert all(p.grad is not None for p in model.parameters())
import lohan_compile
print("OK", lohan_compile.__file__, lohan_compile.last_report().summary()["kept_bytes"])
"""


def test_backend_found_by_name_without_importing_the_package(tmp_path):
    env = dict(os.environ, LOHAN_EXECUTOR="fx")  # finding the backend is the point, not Inductor
    out = subprocess.run(
        [sys.executable, "-c", USE_BACKEND_BY_NAME], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


@pytest.mark.slow
def test_non_editable_install_builds_and_runs(tmp_path):
    """``pip install .`` into a fresh environment: backend, passes and the C++ build all work."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    # torch and the test dependencies come from the environment running the tests, which may be
    # a virtual environment itself (the README's set-up): its site-packages is not the system's
    import torch

    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer_env.pth").write_text(str(Path(torch.__file__).resolve().parent.parent) + "\n")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", ".venv*"))
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)  # the installed copy must not need the source tree

    check = USE_BACKEND_BY_NAME + """
import lohan_compile.passes, lohan_compile.ops, torch
assert "site-packages" in lohan_compile.__file__ and "site-packages" in lohan_compile.passes.__file__
print("FP", lohan_compile.ops.fingerprint(torch.arange(8)))
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), LOHAN_EXECUTOR="fx")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # ninja
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(env_dir) in out.stdout  # the venv's copy, not the editable checkout
    assert "FP " in out.stdout
