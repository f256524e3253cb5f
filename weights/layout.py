"""Weight layout (shuffle) transforms between checkpoints, engines and FlashInfer.

Every transform is a pure function returning a new contiguous tensor (or
container); each has an inverse, and the pair round-trips bit-exactly.

Row orders of the stacked gate/up matrix ``w13 [..., 2I, K]`` (and of its block
scales ``[..., 2I, K/16]``; its global scales ``[E, 2]`` follow along ``dim=-1``):

* ``[gate; up]``: the canonical order (vLLM, this package; docs/design.md §3.1);
* ``[up; gate]``: FlashInfer's TRT-LLM MoE kernels — :func:`swap_gate_up`
  converts either way (it is its own inverse);
* gated-row interleave: FlashInfer's ``reorder_rows_for_gated_act_gemm``
  (TRT-LLM ``reorderRowsForGatedActGemm``) maps rows ``[A; B]`` (two halves of
  ``I`` rows) to ``A0, B0, A1, B1, ...``: output row ``2i`` is input row ``i``,
  output row ``2i + 1`` is input row ``I + i``. FlashInfer applies it to its
  ``[up; gate]`` matrix, giving ``up0, gate0, up1, gate1, ...``.
  :func:`interleave_gated_rows` does this with groups of ``group`` rows
  (``group=1`` is FlashInfer's convention); :func:`deinterleave_gated_rows`
  undoes it.

FP8 kernels (``moe_backend.kernels.sm90.fp8_*``) read the canonical layout
unchanged: ``w13 [E, 2I, H]`` e4m3 rows ``[gate; up]``, ``w2 [E, H, I]``, and the
scales exactly as :class:`~moe_backend.expert_weights.FP8BlockWeights` /
``FP8TensorWeights`` hold them; they need no transform.

The NVFP4 SM90 kernel layout belongs to its kernels:
:mod:`moe_backend.kernels.sm90.nvfp4_layout`.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._checks import check_int, check_tensor


def _check_dim(name: str, t: torch.Tensor, dim: int) -> int:
    check_int(name, dim)
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"{name}: expected a dimension of a {t.dim()}-D tensor, got {dim}")
    return dim % t.dim()


def _check_stacked(name: str, t: torch.Tensor, dim: int, group: int) -> Tuple[int, int]:
    """Validate that ``t`` stacks two halves along ``dim`` whose length ``group`` divides."""
    check_tensor(name, t, contiguous=False)
    d = _check_dim("dim", t, dim)
    n = t.shape[d]
    if n % (2 * group):
        raise ValueError(
            f"{name}: expected an even number of rows along dim {dim} (two halves) divisible by "
            f"2 * group = {2 * group}, got shape {tuple(t.shape)}"
        )
    return d, n // 2


def swap_gate_up(w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``[A; B] -> [B; A]`` along ``dim``: ``[gate; up] <-> [up; gate]`` (its own inverse).

    Use ``dim=-2`` for ``w13 [E, 2I, H/2]`` codes and ``w13_scale [E, 2I, H/16]``,
    ``dim=-1`` for the per-half global scales ``w13_scale_2 [E, 2]``.
    """
    d, half = _check_stacked("w", w, dim, 1)
    a, b = w.split(half, dim=d)
    return torch.cat([b, a], dim=d)


def interleave_gated_rows(w: torch.Tensor, group: int = 1, dim: int = -2) -> torch.Tensor:
    """``[A; B] -> A[0:g], B[0:g], A[g:2g], B[g:2g], ...`` along ``dim`` (``g = group``).

    ``group=1`` is FlashInfer's ``reorder_rows_for_gated_act_gemm``. ``w`` has ``2I``
    rows along ``dim`` with ``group`` dividing ``I``; the result has the same shape.
    """
    check_int("group", group, minimum=1)
    d, half = _check_stacked("w", w, dim, group)
    shape = w.shape
    # [.., 2, I/g, g, ..] -> [.., I/g, 2, g, ..]
    v = w.reshape(*shape[:d], 2, half // group, group, *shape[d + 1 :])
    return v.transpose(d, d + 1).reshape(shape).contiguous()


def deinterleave_gated_rows(w: torch.Tensor, group: int = 1, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`interleave_gated_rows`: ``A0, B0, A1, B1, ... -> [A; B]``."""
    check_int("group", group, minimum=1)
    d, half = _check_stacked("w", w, dim, group)
    shape = w.shape
    v = w.reshape(*shape[:d], half // group, 2, group, *shape[d + 1 :])
    return v.transpose(d, d + 1).reshape(shape).contiguous()
