"""Expert weight containers, one per precision, in the canonical layout (docs/design.md §3.1).

Every container holds the local experts of one layer: ``w13`` with rows
``[gate; up]`` (``2I`` rows, ``H`` columns) and ``w2`` (``H`` rows, ``I`` columns),
plus the scales its format needs. Containers validate themselves on
construction and dequantize one expert at a time (the reference never
materializes all experts in fp32).

Scale rule (checked once, at construction; the forward path never reads a scale's value):
a scale of one whole matrix (FP8 per-tensor weight and activation scales, NVFP4 global
scales) must be finite and > 0; a block scale (FP8 128x128, NVFP4 e4m3 per 16) must be
finite and >= 0 (0 is what an all-zero block quantizes to). Anything else raises
``ValueError`` naming the field and the first bad index. ``$MOE_BACKEND_CHECK_SCALES=0``
skips these value checks, for engines' dummy-weight benchmarks whose random scales are
negative (vLLM's ``load_format="dummy"``); the shapes and dtypes are still checked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch

from ._checks import check_bool, check_int, check_scale_values, check_tensor
from .quant import fp8, nvfp4

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp8_block", "fp8_tensor", "nvfp4")
#: Set to "0" to skip the scale value checks (dummy weights); "1" or unset: check.
CHECK_SCALES_ENV = "MOE_BACKEND_CHECK_SCALES"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_master(w13: object, w2: object) -> None:
    """Float master weights for ``quantize``: ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (the sizes are
    checked by the container built from them)."""
    check_tensor("w13", w13, dtype=_FLOATS, ndim=3, contiguous=False)
    assert isinstance(w13, torch.Tensor)  # check_tensor refused anything else
    check_tensor("w2", w2, dtype=_FLOATS, ndim=3, device=w13.device, contiguous=False)


#: Master-weight elements quantized at once: the quantizers' fp32 temporaries stay near 1 GiB each
#: instead of several copies of all experts (DeepSeek-V3's w13 alone is 30 GB in fp32).
QUANTIZE_CHUNK_ELEMENTS = 1 << 28


def _by_expert_chunks(quantize: Callable[..., Tuple[torch.Tensor, ...]], w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``quantize(w)`` for ``w [E, N, K]``, run on groups of whole experts and joined along E.

    Exact: every quantizer here scales each expert matrix on its own.
    """
    per = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, w[0].numel())) if w.shape[0] else 1
    if per >= w.shape[0]:
        return quantize(w)
    parts = [quantize(w[j : j + per]) for j in range(0, w.shape[0], per)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


class ExpertShapes:
    """Shapes read off ``w13 [E, 2I, *]`` and ``w2 [E, H, *]`` of a dataclass of tensors, and its size;
    shared by the canonical containers and kernel layouts."""

    # Declared for the type checker only: the @dataclass subclasses define these fields.
    __dataclass_fields__: ClassVar[Dict[str, Any]]
    w13: torch.Tensor
    w2: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[1]

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def tensors(self) -> dict:
        """Name -> tensor for every tensor field (None fields omitted)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes the weights and scales occupy."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class ExpertWeights(ExpertShapes):
    """Base class: shapes and the per-expert dequantization every format provides."""

    precision: ClassVar[str]
    #: Every H and I must be a multiple of this (fp8 block: whole 128-blocks).
    size_multiple: ClassVar[int] = 16

    def __post_init__(self) -> None:
        self.validate()

    def _check_sizes(self, e: int, h: int, i: int) -> None:
        m = self.size_multiple
        if e < 1:
            raise ValueError(f"w13: expected at least one expert, got shape {tuple(self.w13.shape)}")
        if h % m or i % m or h == 0 or i == 0:
            raise ValueError(
                f"w13/w2: {self.precision} needs hidden and intermediate sizes that are positive "
                f"multiples of {m}, got H={h}, I={i}"
            )

    def _check_scales(self, *, matrix: Tuple[str, ...] = (), block: Tuple[str, ...] = ()) -> None:
        """Apply the scale rule (module docstring) to the ``matrix`` and ``block`` scale fields."""
        setting = os.environ.get(CHECK_SCALES_ENV, "1")
        if setting not in ("0", "1", ""):
            raise ValueError(f"{CHECK_SCALES_ENV}: expected '0' or '1', got {setting!r}")
        if setting == "0":
            logger.debug("%s=0: scale values of %s not checked", CHECK_SCALES_ENV, type(self).__name__)
            return
        for names, allow_zero in ((matrix, False), (block, True)):
            for name in names:
                if getattr(self, name) is not None:
                    check_scale_values(name, getattr(self, name), allow_zero=allow_zero)

    def _check_pair(
        self, w13_cols: Callable[[int], int], w2_cols: Callable[[int], int], dtype: torch.dtype
    ) -> Tuple[int, int, int]:
        """Validate ``w13 [E, 2I, w13_cols(H)]`` and ``w2 [E, H, w2_cols(I)]``; return (E, H, I)."""
        check_tensor("w13", self.w13, dtype=dtype, ndim=3)
        e, two_i = self.w13.shape[:2]
        if two_i % 2:
            raise ValueError(f"w13: expected an even row count [gate; up], got shape {tuple(self.w13.shape)}")
        i = two_i // 2
        check_tensor("w2", self.w2, dtype=dtype, ndim=3, device=self.w13.device)
        h = self.w2.shape[1]
        check_tensor("w13", self.w13, shape=(e, 2 * i, w13_cols(h)))
        check_tensor("w2", self.w2, shape=(e, h, w2_cols(i)))
        self._check_sizes(e, h, i)
        return e, h, i

    # -- to be provided -----------------------------------------------------------------
    def validate(self) -> None:
        raise NotImplementedError

    def dequantize_expert(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(w13 [2I, H], w2 [H, I])`` of local expert ``e`` (in ``[0, E)``)."""
        raise NotImplementedError

    def _check_expert(self, e: int) -> int:
        check_int("e", e, minimum=0)
        if e >= self.num_experts:
            raise ValueError(f"e: expected a local expert in [0, {self.num_experts}), got {e}")
        return e

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor) -> "ExpertWeights":
        """Build from float master weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]``."""
        raise NotImplementedError


@dataclass
class BF16Weights(ExpertWeights):
    """Unquantized experts: ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` bfloat16."""

    w13: torch.Tensor
    w2: torch.Tensor
    precision: ClassVar[str] = "bf16"

    def validate(self) -> None:
        self._check_pair(lambda h: h, lambda i: i, torch.bfloat16)

    def dequantize_expert(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_expert(e)
        return self.w13[e].float(), self.w2[e].float()

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor) -> "BF16Weights":
        _check_master(w13, w2)
        return cls(w13.to(torch.bfloat16).contiguous(), w2.to(torch.bfloat16).contiguous())


@dataclass
class FP8BlockWeights(ExpertWeights):
    """DeepSeek-V3 FP8: e4m3 weights with one fp32 scale per 128x128 block.

    ``w13 [E, 2I, H]`` e4m3, ``w13_scale [E, 2I/128, H/128]`` fp32,
    ``w2 [E, H, I]`` e4m3, ``w2_scale [E, H/128, I/128]`` fp32; H and I multiples of 128.
    Activations are quantized dynamically per token per 128 channels (power-of-two
    scales when ``ue8m0``).
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    ue8m0: bool = False
    precision: ClassVar[str] = "fp8_block"
    size_multiple: ClassVar[int] = fp8.BLOCK

    def validate(self) -> None:
        e, h, i = self._check_pair(lambda h: h, lambda i: i, fp8.FP8_DTYPE)
        b = fp8.BLOCK
        check_tensor(
            "w13_scale",
            self.w13_scale,
            dtype=torch.float32,
            shape=(e, _cdiv(2 * i, b), _cdiv(h, b)),
            device=self.device,
        )
        check_tensor(
            "w2_scale", self.w2_scale, dtype=torch.float32, shape=(e, _cdiv(h, b), _cdiv(i, b)), device=self.device
        )
        check_bool("ue8m0", self.ue8m0)
        self._check_scales(block=("w13_scale", "w2_scale"))

    def dequantize_expert(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_expert(e)
        return (
            fp8.dequantize_fp8_block(self.w13[e], self.w13_scale[e]),
            fp8.dequantize_fp8_block(self.w2[e], self.w2_scale[e]),
        )

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor, ue8m0: bool = False) -> "FP8BlockWeights":
        _check_master(w13, w2)
        q13, s13 = _by_expert_chunks(fp8.quantize_fp8_block, w13)
        q2, s2 = _by_expert_chunks(fp8.quantize_fp8_block, w2)
        return cls(q13, s13, q2, s2, ue8m0)


@dataclass
class FP8TensorWeights(ExpertWeights):
    """FP8 with one fp32 scale per expert matrix (ModelOpt FP8 and generic checkpoints).

    ``w13 [E, 2I, H]`` e4m3 with ``w13_scale [E]``, ``w2 [E, H, I]`` e4m3 with
    ``w2_scale [E]``. ``a13_scale`` / ``a2_scale`` (fp32 ``[1]``) are static
    activation scales for the GEMM1 / GEMM2 inputs; when absent the activations
    are quantized dynamically per token per 128 channels, which is more accurate
    than one dynamic scale per tensor and needs no cross-token reduction.

    Checkpoints that store gate's and up's scales apart (ModelOpt FP8) are requantized
    to the larger of the two at load (``moe_backend.weights.loader.merge_w13_scales``).
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    a13_scale: Optional[torch.Tensor] = None
    a2_scale: Optional[torch.Tensor] = None
    precision: ClassVar[str] = "fp8_tensor"

    def validate(self) -> None:
        e, _, _ = self._check_pair(lambda h: h, lambda i: i, fp8.FP8_DTYPE)
        check_tensor("w13_scale", self.w13_scale, dtype=torch.float32, shape=(e,), device=self.device)
        check_tensor("w2_scale", self.w2_scale, dtype=torch.float32, shape=(e,), device=self.device)
        for name in ("a13_scale", "a2_scale"):
            if getattr(self, name) is not None:
                check_tensor(name, getattr(self, name), dtype=torch.float32, shape=(1,), device=self.device)
        self._check_scales(matrix=("w13_scale", "w2_scale", "a13_scale", "a2_scale"))

    def dequantize_expert(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_expert(e)
        return (
            fp8.dequantize_fp8_per_tensor(self.w13[e], self.w13_scale[e]),
            fp8.dequantize_fp8_per_tensor(self.w2[e], self.w2_scale[e]),
        )

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor) -> "FP8TensorWeights":
        _check_master(w13, w2)
        q13, s13 = _by_expert_chunks(fp8.quantize_fp8_per_tensor, w13)
        q2, s2 = _by_expert_chunks(fp8.quantize_fp8_per_tensor, w2)
        return cls(q13, s13, q2, s2)


@dataclass
class NVFP4Weights(ExpertWeights):
    """ModelOpt NVFP4 experts in the checkpoint's linear layout.

    ``w13 [E, 2I, H/2]`` uint8 (two e2m1 codes a byte, low nibble first),
    ``w13_scale [E, 2I, H/16]`` e4m3, ``w13_scale_2 [E, 2]`` fp32 (gate's and up's
    global scales, each applied exactly), ``w2 [E, H, I/2]`` uint8,
    ``w2_scale [E, H, I/16]`` e4m3, ``w2_scale_2 [E]`` fp32. Activations stay bf16
    on Hopper (W4A16).
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w13_scale_2: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w2_scale_2: torch.Tensor
    precision: ClassVar[str] = "nvfp4"

    def validate(self) -> None:
        e, h, i = self._check_pair(lambda h: h // 2, lambda i: i // 2, torch.uint8)
        g = nvfp4.GROUP
        check_tensor("w13_scale", self.w13_scale, dtype=fp8.FP8_DTYPE, shape=(e, 2 * i, h // g), device=self.device)
        check_tensor("w13_scale_2", self.w13_scale_2, dtype=torch.float32, shape=(e, 2), device=self.device)
        check_tensor("w2_scale", self.w2_scale, dtype=fp8.FP8_DTYPE, shape=(e, h, i // g), device=self.device)
        check_tensor("w2_scale_2", self.w2_scale_2, dtype=torch.float32, shape=(e,), device=self.device)
        self._check_scales(matrix=("w13_scale_2", "w2_scale_2"), block=("w13_scale", "w2_scale"))

    def dequantize_expert(self, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_expert(e)
        i = self.intermediate_size
        gate = nvfp4.dequantize_nvfp4(self.w13[e, :i], self.w13_scale[e, :i], self.w13_scale_2[e, 0])
        up = nvfp4.dequantize_nvfp4(self.w13[e, i:], self.w13_scale[e, i:], self.w13_scale_2[e, 1])
        w2 = nvfp4.dequantize_nvfp4(self.w2[e], self.w2_scale[e], self.w2_scale_2[e])
        return torch.cat([gate, up]), w2

    @classmethod
    def quantize(cls, w13: torch.Tensor, w2: torch.Tensor) -> "NVFP4Weights":
        _check_master(w13, w2)
        i = w13.shape[1] // 2
        gate_q, gate_s, gate_g = _by_expert_chunks(nvfp4.quantize_nvfp4, w13[:, :i])
        up_q, up_s, up_g = _by_expert_chunks(nvfp4.quantize_nvfp4, w13[:, i:])
        q2, s2, g2 = _by_expert_chunks(nvfp4.quantize_nvfp4, w2)
        return cls(
            torch.cat([gate_q, up_q], 1), torch.cat([gate_s, up_s], 1), torch.stack([gate_g, up_g], 1), q2, s2, g2
        )


WEIGHT_TYPES = {cls.precision: cls for cls in (BF16Weights, FP8BlockWeights, FP8TensorWeights, NVFP4Weights)}
