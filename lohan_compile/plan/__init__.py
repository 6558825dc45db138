"""The planning wing: graph-free, and importing it does not import torch.

- ``problem``: the problem and plan types (``Problem``, ``Candidate``, ``Plan``,
  ``Transfer``, ...), plain data;
- ``profile``: ``HardwareProfile`` and the presets;
- ``schedule``: the one just-in-time scheduler (when copies are issued and waited for);
- ``program``: a plan's step program and its prediction;
- ``simulate``: the discrete-event simulator of a step program;
- ``policies``: keep / swap / recompute policies and ``solve``.

Its tests build problems from plain lists (``tests/test_planner.py``).
"""
