"""Index-value checks run on the stream right before an interpreted launch.

A GPU kernel trusts its indices.  In Triton's interpreter an out-of-range index dereferences
raw process memory (wrong results or a crash of the whole run), so in interpreter mode the
values are checked first, on the worker thread, when earlier queued work has produced them.
"""

from __future__ import annotations

import numpy as np


def _within(name: str, values: np.ndarray, low: int, high: int) -> None:
    values = np.asarray(values)
    if values.size and (values.min() < low or values.max() >= high):
        raise ValueError(f"{name} must lie in [{low}, {high}); got {values.ravel()[:16].tolist()}")


def check_rows(op: str, index: np.ndarray, n_target: int) -> None:
    if op == "set_rows":
        _within("slots", index, -1, n_target)
        used = index[index >= 0]
        if len(np.unique(used)) != len(used):
            raise ValueError(f"slots must be distinct apart from -1; got {index[:16].tolist()}")
    else:
        _within("rows", index, 0, n_target)


def check_kv_rotate(block_indices, deltas, num_blocks: int, lut_rows: int) -> None:
    _within("block_indices", block_indices, 0, num_blocks)
    if len(np.unique(block_indices)) != len(block_indices):
        raise ValueError(f"block_indices={block_indices.tolist()} must not repeat a block")
    _within("deltas", deltas, 0, lut_rows)


def check_paged(total_q: int, num_blocks: int, block_size: int, block_table, seq_lens,
                q_start) -> None:
    n_seqs, max_blocks = block_table.shape
    _within("paged.seq_lens", seq_lens, 0, max_blocks * block_size + 1)
    q_lens = np.diff(q_start)
    if q_start[0] != 0 or q_start[-1] != total_q or (q_lens < 0).any():
        raise ValueError(f"paged.q_start={q_start.tolist()} must rise from 0 to n_q={total_q}")
    if (q_lens > seq_lens).any():
        raise ValueError(f"query counts {q_lens.tolist()} must not exceed "
                         f"seq_lens={seq_lens.tolist()}")
    for s in range(n_seqs):
        used = block_table[s, : -(-int(seq_lens[s]) // block_size)]
        _within(f"paged.block_table[{s}]", used, 0, num_blocks)
