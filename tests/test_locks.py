"""Locks a collection can re-enter: a weakref callback that takes a lock runs on whichever
thread collects, possibly one inside that lock (``keys.key_for`` allocates while it holds it:
bench/plan_scaling.py hung there)."""

import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import gc
    import torch
    from lohan_compile.runtime import keys

    p = torch.nn.Parameter(torch.zeros(1))
    keys.key_for(p)
    cycle = [p]
    cycle.append(cycle)  # freed only by a collection
    del p, cycle
    with keys._lock:
        gc.collect()  # the dead parameter's callback takes keys._lock, on this thread
    print("ok")
""")


def test_a_collection_while_a_runtime_lock_is_held_does_not_deadlock():
    run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
