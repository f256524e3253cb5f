"""Hopper (SM90) Triton kernels: FP8 fused experts (block-scaled and per-tensor)."""

from .fp8_moe import CONFIG_KEYS, default_config, fused_experts_fp8

__all__ = ["fused_experts_fp8", "default_config", "CONFIG_KEYS"]
