"""``MoEBackendExperts``: vLLM's modular experts interface over :meth:`MoELayer.experts`.

vLLM's router has already picked ``topk_ids``/``topk_weights``; its
prepare/finalize step hands us the unquantized bf16 activations
(``expects_unquantized_inputs``: our kernels quantize per token themselves)
and copies our output, which is already weighted and reduced over the top-k
(``TopKWeightAndReduceNoOP``). No workspace from vLLM: our kernels keep their
own buffers, sized for the engine's max tokens.
"""

from __future__ import annotations

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    kFp8Dynamic128Sym,
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8Static128BlockSym,
    kFp8StaticTensorSym,
    kNvfp4Dynamic,
    kNvfp4Static,
)
from vllm.platforms import current_platform

from .convert import binding_for

#: (weight key, activation keys) we serve; NVFP4 runs W4A16, so any activation key.
_SCHEMES = {
    kFp8Static128BlockSym: (kFp8Dynamic128Sym,),
    kFp8StaticTensorSym: (kFp8StaticTensorSym, kFp8DynamicTensorSym, kFp8DynamicTokenSym),
    kNvfp4Static: (kNvfp4Dynamic, None),
}


class MoEBackendExperts(mk.FusedMoEExpertsModular):
    """Fused experts of moe_backend (FP8 block, FP8 per-tensor, NVFP4), standard activation format."""

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        # The CPU runs the torch reference (tests); GPUs run what the kernel table selects.
        return current_platform.is_cuda() or current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return activation_key in _SCHEMES.get(weight_key, ())

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        # Global ids in the standard layout: TP, EP, or DP+EP behind an all-gather.
        # EPLB remaps ids to physical replicas after routing: not supported.
        from .support import ALL2ALL_BACKENDS

        p = moe_parallel_config
        return (
            not p.enable_eplb
            and p.pcp_size == 1
            and (not p.use_all2all_kernels or p.all2all_backend in ALL2ALL_BACKENDS)
        )

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        """No vLLM workspace; the output is ``[M, K]`` (tokens x hidden)."""
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation,
        global_num_experts: int,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input: bool,
    ) -> None:
        """Write ``output [T, H]`` bf16 for ``hidden_states [T, H]`` bf16 and the global top-k ``[T, k]``.

        With routed-experts capture on, the ids come back through our routing-replay
        output (int16 ``[R >= T, k]``) and are handed to vLLM's capturer from there.
        """
        binding = binding_for(w1)
        ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
        weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
        if binding.capture_fn is None:
            binding.layer.experts(hidden_states, ids, weights, out=output)
            return None
        binding.layer.forward_routed(hidden_states, (ids, weights), routing_replay_out=binding.replay, out=output)
        assert binding.replay is not None  # set together with capture_fn (capture.py)
        binding.capture_fn(binding.replay[: hidden_states.shape[0]])
        return None
