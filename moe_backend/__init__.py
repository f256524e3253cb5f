"""moe_backend: fused Mixture-of-Experts layers (FP8 block, FP8 per-tensor, NVFP4, bf16)
for serving engines, with DeepSeek-V3 routing, routing replay and a torch reference."""

from .expert_weights import (
    PRECISIONS,
    BF16Weights,
    ExpertWeights,
    FP8BlockWeights,
    FP8TensorWeights,
    NVFP4Weights,
)
from .kernels.reference import reference_fused_experts
from .kernels.registry import KernelUnavailableError, available_kernels, select_kernel
from .layer import LAYER_TYPES, BF16MoE, FP8BlockMoE, FP8TensorMoE, MoEConfig, MoELayer, NVFP4MoE
from .routing import RoutingConfig, pack_topk, unpack_topk

# The one place the version is written: pyproject.toml reads it from here (dynamic version).
__version__ = "0.1.0"

__all__ = [
    "PRECISIONS",
    "LAYER_TYPES",
    "BF16MoE",
    "BF16Weights",
    "ExpertWeights",
    "FP8BlockMoE",
    "FP8BlockWeights",
    "FP8TensorMoE",
    "FP8TensorWeights",
    "KernelUnavailableError",
    "MoEConfig",
    "MoELayer",
    "NVFP4MoE",
    "NVFP4Weights",
    "RoutingConfig",
    "available_kernels",
    "pack_topk",
    "reference_fused_experts",
    "select_kernel",
    "unpack_topk",
    "__version__",
]
