"""Token-count buckets for autotuning, keyed on the engine's serving max tokens (docs/design.md §8.1).

The "hybrid" spacing is dense where tactics change quickly (small batches) and
sparse where they do not::

    phase 1  1, 2, 4, ..., 256            powers of two
    phase 2  512, 768, ..., 2048          steps of 256
    phase 3  2560, 3072, 3584, 4096       steps of 512
    phase 4  8192, 16384, ...             powers of two

``max_num_tokens`` (the engine's largest batch) is always a bucket, and no
bucket exceeds it: the engine's max is the cap, never a constant. With
``min_num_tokens > 1`` the list is the full list from 1 restricted to
``[min, max]``, so the buckets and the mapping agree (10 maps to 16, and 16 is
a bucket). Every function here is host-only integer arithmetic.
"""

from __future__ import annotations

from typing import List

from .._checks import check_int

_PHASE1_END = 256  # powers of two up to here
_PHASE2_STEP, _PHASE2_END = 256, 2048
_PHASE3_STEP, _PHASE3_END = 512, 4096


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def next_hybrid(x: int) -> int:
    """Smallest value of the unbounded hybrid sequence that is ``>= x`` (``x >= 1``)."""
    if x <= _PHASE1_END:
        return _next_pow2(x)
    if x <= _PHASE2_END:
        return _round_up(x, _PHASE2_STEP)
    if x <= _PHASE3_END:
        return _round_up(x, _PHASE3_STEP)
    return _next_pow2(x)


def _check_range(max_num_tokens: int, min_num_tokens: int) -> None:
    check_int("max_num_tokens", max_num_tokens, minimum=1)
    check_int("min_num_tokens", min_num_tokens, minimum=1)
    if min_num_tokens > max_num_tokens:
        raise ValueError(f"min_num_tokens: expected at most max_num_tokens ({max_num_tokens}), got {min_num_tokens}")


def buckets(max_num_tokens: int, min_num_tokens: int = 1) -> List[int]:
    """The sorted buckets in ``[min_num_tokens, max_num_tokens]``; ``max_num_tokens`` is the last.

    >>> buckets(300)
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    >>> buckets(100, min_num_tokens=10)
    [16, 32, 64, 100]
    """
    _check_range(max_num_tokens, min_num_tokens)
    out = []
    # Walk the full list from 1 (not from min: see the module docstring).
    value = 1
    while value < max_num_tokens:
        if value >= min_num_tokens:
            out.append(value)
        value = next_hybrid(value + 1)
    out.append(max_num_tokens)
    return out


def map_to_bucket(num_tokens: int, max_num_tokens: int, min_num_tokens: int = 1) -> int:
    """The bucket serving a batch of ``num_tokens`` (``>= 0``): the smallest bucket ``>= num_tokens``,
    capped at ``max_num_tokens`` (a larger batch maps to ``max_num_tokens``; see
    :func:`map_to_bucket_uncapped` for the bucket it would have). Always a member of
    ``buckets(max_num_tokens, min_num_tokens)``; 0 and counts below ``min_num_tokens`` map
    to the first bucket.
    """
    _check_range(max_num_tokens, min_num_tokens)
    check_int("num_tokens", num_tokens, minimum=0)
    return min(next_hybrid(max(num_tokens, min_num_tokens)), max_num_tokens)


def map_to_bucket_uncapped(num_tokens: int, max_num_tokens: int, min_num_tokens: int = 1) -> int:
    """Like :func:`map_to_bucket`, but a batch above ``max_num_tokens`` maps to the smallest
    value ``>= num_tokens`` of the hybrid list continued beyond the max (``buckets(max)``
    followed by the hybrid values above ``max``): the bucket a warm-up with a larger max
    would tune, never a hard-coded cap.
    """
    capped = map_to_bucket(num_tokens, max_num_tokens, min_num_tokens)  # validates the arguments
    return capped if num_tokens <= max_num_tokens else next_hybrid(num_tokens)
