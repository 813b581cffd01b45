"""Element-stride arithmetic the GPU backends share to choose a copy's indexing: whether a view
is dense in flat (C) order, and the largest element offset it reaches."""

from __future__ import annotations

from collections.abc import Sequence


def is_dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether element i in flat C order sits at offset i (dims of extent 1 may have any
    stride: their index is always 0)."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def last_offset(shape: Sequence[int], strides: Sequence[int]) -> int:
    """The largest element offset a view of ``shape`` and non-negative ``strides`` reaches."""
    return sum((size - 1) * stride for size, stride in zip(shape, strides))
