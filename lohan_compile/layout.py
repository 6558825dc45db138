"""The one check of a tensor layout that the planner, the fake kernels and the host tier share."""

from __future__ import annotations

from typing import Any, Sequence


def dense_layout(shape: Sequence[Any], stride: Sequence[Any]) -> bool:
    """c10's is_non_overlapping_and_dense: contiguous up to a permutation of dimensions (as the
    output of a fused attention kernel), so a swap copies it as one block and gives it back with
    the same strides. Plain ints, or symbolic sizes (which guard as they are compared)."""
    required = 1
    for i in sorted(range(len(shape)), key=lambda i: (1, 0) if shape[i] < 2 else (0, stride[i])):
        if shape[i] < 2:
            return True
        if stride[i] != required:
            return False
        required *= shape[i]
    return True
