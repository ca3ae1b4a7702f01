"""Positional skip-wise training (PoSE, Zhu et al. 2023, "PoSE: Efficient Context Window
Extension of LLMs via Positional Skip-wise Training", sec. 3.2).

A training row keeps the *base* window of ``L_c`` consecutive tokens, but its position ids
jump: the row is cut into ``N`` chunks and chunk ``i`` is shifted by a skip bias ``u_i``, drawn
so that ``0 = u_0 <= u_1 <= ... <= u_{N-1} <= L_t - L_c``. The model then sees relative
distances up to the target length ``L_t`` at the compute of the base window -- the cheap way
to a longer context on a CPU. The text and its labels are untouched; only positions move.
"""

from __future__ import annotations

import random


def skip_positions(length: int, target: int, chunks: int, rng: random.Random) -> list[int]:
    """Position ids for ``length`` consecutive tokens whose largest id stays below ``target``.

    Chunk sizes are uniform over the cut points; each chunk's bias is uniform between the
    previous chunk's bias and the largest allowed (the paper's sampling), so short and long
    jumps are both seen."""
    if length <= 0:
        return []
    budget = max(0, target - length)
    n = max(1, min(chunks, length))
    cuts = sorted(rng.sample(range(1, length), n - 1)) if n > 1 else []
    bounds = [0, *cuts, length]
    positions: list[int] = []
    bias = 0
    for i in range(n):
        if i > 0:
            bias = rng.randint(bias, budget)
        positions.extend(range(bounds[i] + bias, bounds[i + 1] + bias))
    return positions
