"""The model state's bytes, as the runtime holds them and ``lohan plan`` counts them: one
definition for both, so that a plan's traffic is the runtime's.

- ``STREAM_MIN_BYTES``: weights of at least this many bytes are streamed with
  ``offload_params`` (fetched before each use, freed after); smaller ones (norms, most biases)
  stay on the device.
- ``STATE_BYTES_PER_PARAM``: fp32 master weight and the two moments of AdamW.
- ``staging_blocks``: what an update beyond host memory stages in host memory at once, and
  ``packed_budget``: the host budget that holds given blocks as the host tier's arena packs them.
"""

from __future__ import annotations

STREAM_MIN_BYTES = 64 * 1024
STATE_BYTES_PER_PARAM = 12
FP32 = 4


def staging_blocks(largest_params: int, weight_itemsize: int) -> list[int]:
    """The host blocks an update stages when everything else of the step may be on SSD, for
    updates of one parameter at a time whose largest has ``largest_params`` elements: its three
    fp32 state tensors three times over (read ahead, updated, written back), two fp32 gradients
    (the one updated and the next one read), two fp32 roll-back copies being made, two updated
    weights (written, and on their way to SSD or the device), and 64 KiB of small buffers."""
    return [FP32 * largest_params] * (9 + 2 + 2) + [weight_itemsize * largest_params] * 2 + [64 << 10]


def arena_chunk_bytes(budget: int) -> int:
    """The chunk the host tier's arena grows by under host budget ``budget``: an eighth of it,
    1 to 256 MiB."""
    return max(1 << 20, min(256 << 20, budget // 8))


def packed_budget(blocks: list[int]) -> int:
    """The smallest host budget that holds ``blocks`` however they are placed: packed first-fit
    into the arena's chunks (``arena_chunk_bytes`` of that budget), with a chunk's room to spare
    for each block (what a block that does not fit the rest of a chunk leaves unused at worst)."""
    blocks = sorted((-(-n // 4096) * 4096 for n in blocks if n > 0), reverse=True)
    budget = sum(blocks)
    while True:
        chunk = arena_chunk_bytes(budget)
        free: list[int] = []  # room left in each chunk
        total = 0
        for b in blocks:
            i = next((i for i, room in enumerate(free) if room >= b), None)
            if i is None:
                size = max(chunk, b)
                free.append(size - b)
                total += size
            else:
                free[i] -= b
        if total <= budget:
            return budget
        budget = total
