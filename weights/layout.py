"""Weight layout (shuffle) transforms between checkpoints and the kernels.

Every transform is a pure function returning a new contiguous tensor (or
container); each has an inverse, and the pair round-trips bit-exactly.

Row orders of the stacked gate/up matrix ``w13 [..., 2I, K]`` (and of its block
scales ``[..., 2I, K/16]``; its global scales ``[E, 2]`` follow along ``dim=-1``):

* ``[gate; up]``: the canonical order (vLLM, this package; DESIGN.md §3);
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

The NVFP4 SM90 kernel layout (:class:`NVFP4KernelWeights`, produced by
:func:`nvfp4_to_kernel_layout`) is documented on that class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .._checks import check_int, check_tensor
from ..expert_weights import ExpertShapes, NVFP4Weights
from ..quant.fp8 import FP8_DTYPE
from ..quant.nvfp4 import GROUP, pack_e2m1, unpack_e2m1

#: Codes per 32-bit word of the kernel layout.
WORD_CODES = 8
#: ``WORD_PERM[p]``: which element (of the word's 8 consecutive K elements) sits in
#: nibble ``p`` (bits ``4p .. 4p+3``) of a kernel word. In each 16-bit half the
#: first and last nibble trade places; see :class:`NVFP4KernelWeights` for why.
WORD_PERM = (3, 1, 2, 0, 7, 5, 6, 4)


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
    v = w.reshape(*shape[:d], 2, half // group, group, *shape[d + 1:])
    return v.transpose(d, d + 1).reshape(shape).contiguous()


def deinterleave_gated_rows(w: torch.Tensor, group: int = 1, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`interleave_gated_rows`: ``A0, B0, A1, B1, ... -> [A; B]``."""
    check_int("group", group, minimum=1)
    d, half = _check_stacked("w", w, dim, group)
    shape = w.shape
    v = w.reshape(*shape[:d], half // group, 2, group, *shape[d + 1:])
    return v.transpose(d, d + 1).reshape(shape).contiguous()


def _permute_word_nibbles(packed: torch.Tensor, perm: Tuple[int, ...]) -> torch.Tensor:
    """Within each group of 4 bytes (8 codes) of ``packed [..., K/2]``: new nibble ``p`` =
    old element ``perm[p]``."""
    codes = unpack_e2m1(packed)
    codes = codes.reshape(*codes.shape[:-1], -1, WORD_CODES)[..., list(perm)]
    return pack_e2m1(codes.reshape(*packed.shape[:-1], -1))


def pack_kernel_words(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt packed codes ``[..., N, K/2]`` uint8 -> kernel words ``[..., N, K/8]`` int32.

    Word ``j`` of a row holds the codes of elements ``8j .. 8j+7``, element
    ``8j + WORD_PERM[p]`` in bits ``4p .. 4p+3`` (little-endian). ``K`` must be a
    multiple of 8.
    """
    check_tensor("packed", packed, dtype=torch.uint8, contiguous=False)
    if packed.dim() < 1 or packed.shape[-1] % (WORD_CODES // 2):
        raise ValueError(
            f"packed: expected [..., K/2] with K a multiple of {WORD_CODES}, got shape {tuple(packed.shape)}"
        )
    return _permute_word_nibbles(packed, WORD_PERM).view(torch.int32)


def unpack_kernel_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_kernel_words`: ``[..., N, K/8]`` int32 -> ``[..., N, K/2]`` uint8."""
    check_tensor("words", words, dtype=torch.int32, contiguous=False)
    if words.dim() < 1:
        raise ValueError(f"words: expected at least 1 dimension, got shape {tuple(words.shape)}")
    inverse = tuple(sorted(range(WORD_CODES), key=lambda p: WORD_PERM[p]))
    return _permute_word_nibbles(words.contiguous().view(torch.uint8), inverse)


@dataclass
class NVFP4KernelWeights(ExpertShapes):
    """NVFP4 experts in the layout of the SM90 W4A16 kernel (``kernels/sm90/nvfp4_*``).

    * ``w13 [E, 2I, H/8]`` int32, rows ``[gate; up]``; ``w2 [E, H, I/8]`` int32.
      Each row is the checkpoint row (K contiguous) regrouped in 32-bit words of
      8 codes (:func:`pack_kernel_words`): word ``j`` covers elements
      ``8j .. 8j+7``, nibble ``p`` (bits ``4p..4p+3``, bit ``4p+3`` the sign) holds
      element ``8j + WORD_PERM[p]``, ``WORD_PERM = (3, 1, 2, 0, 7, 5, 6, 4)``. With it
      a thread turns one word into 8 bf16 weights with 32-bit mask/shift operations
      on the nibbles at bits 12-15 and 28-31 of the word shifted left by 0, 4, 8, 12
      (two bf16 per operation, no byte shuffles), and the kernel's in-register
      interleave of those 8 results lands every weight at its K position. A 16-byte
      vector is 4 words: 32 weights, two scale groups.
    * ``w13_scale [E, 2I, H/16]``, ``w2_scale [E, H, I/16]`` float8_e4m3fn: the
      checkpoint's linear block scales, unchanged (one per 16 K elements; 16 groups
      are one 16-byte vector).
    * ``w13_scale_2 [E, 2]`` fp32 (gate's, up's global scale), ``w2_scale_2 [E]`` fp32,
      unchanged; the kernel applies them to its fp32 accumulators.

    Size: ``0.5 + 1/16`` bytes a weight, as in the checkpoint.
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w13_scale_2: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w2_scale_2: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("w13", self.w13, dtype=torch.int32, ndim=3)
        e, two_i, h_words = self.w13.shape
        i = two_i // 2
        h = h_words * WORD_CODES
        dev = self.w13.device
        check_tensor("w2", self.w2, dtype=torch.int32, shape=(e, h, i // WORD_CODES), device=dev)
        if two_i % 2 or i % GROUP or h % GROUP or i == 0 or h == 0:
            raise ValueError(f"w13/w2: expected 2I rows with I and H positive multiples of {GROUP}, "
                             f"got w13 {tuple(self.w13.shape)}, w2 {tuple(self.w2.shape)}")
        check_tensor("w13_scale", self.w13_scale, dtype=FP8_DTYPE, shape=(e, two_i, h // GROUP), device=dev)
        check_tensor("w13_scale_2", self.w13_scale_2, dtype=torch.float32, shape=(e, 2), device=dev)
        check_tensor("w2_scale", self.w2_scale, dtype=FP8_DTYPE, shape=(e, h, i // GROUP), device=dev)
        check_tensor("w2_scale_2", self.w2_scale_2, dtype=torch.float32, shape=(e,), device=dev)



def nvfp4_to_kernel_layout(weights: NVFP4Weights) -> NVFP4KernelWeights:
    """Canonical ModelOpt NVFP4 experts -> the SM90 kernel layout (codes regrouped, scales kept)."""
    if not isinstance(weights, NVFP4Weights):
        raise TypeError(f"weights: expected NVFP4Weights, got {type(weights).__name__}")
    return NVFP4KernelWeights(
        pack_kernel_words(weights.w13), weights.w13_scale.contiguous(), weights.w13_scale_2.contiguous(),
        pack_kernel_words(weights.w2), weights.w2_scale.contiguous(), weights.w2_scale_2.contiguous())


def nvfp4_from_kernel_layout(kernel_weights: NVFP4KernelWeights) -> NVFP4Weights:
    """Inverse of :func:`nvfp4_to_kernel_layout`."""
    if not isinstance(kernel_weights, NVFP4KernelWeights):
        raise TypeError(f"kernel_weights: expected NVFP4KernelWeights, got {type(kernel_weights).__name__}")
    k = kernel_weights
    return NVFP4Weights(unpack_kernel_words(k.w13), k.w13_scale.contiguous(), k.w13_scale_2.contiguous(),
                        unpack_kernel_words(k.w2), k.w2_scale.contiguous(), k.w2_scale_2.contiguous())
