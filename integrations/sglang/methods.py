"""Our quantization methods for SGLang's FP8 and ModelOpt NVFP4 MoE layers.

SGLang's own methods do not hand an unknown runner backend to a runner (FP8 keeps
it as a "direct kernel" it has no kernel for), transform the loaded weights for
their kernels (DeepGEMM ue8m0 requantization, AMX packing on CPUs, NVFP4 scale
swizzling), and NVFP4 refuses every GPU below Blackwell unless its backend is
``auto`` or ``marlin``. With ``--moe-runner-backend moe_backend`` the quantization
configs' ``get_quant_method`` (hooked) hand MoE layers these subclasses instead:
they keep SGLang's parameter creation and weight loading (the checkpoint layout),
bind our layer over the loaded tensors, run our registered runner core, and
accept Hopper.
"""

from __future__ import annotations

from typing import Any, Dict

from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
from sglang.srt.layers.quantization.modelopt_quant import ModelOptNvFp4FusedMoEMethod

from moe_backend.expert_weights import ExpertWeights

from . import binding, runner
from .support import check_layer, selected, unsupported


class _MoEBackendMethod:
    """What both methods share: the runner (created with the layer) and ``apply``."""

    def create_moe_runner(self, layer: Any, moe_runner_config: Any) -> None:
        self.moe_runner_config = moe_runner_config
        self.runner = runner.make_runner(moe_runner_config)

    def get_moe_runner_backend(self, layer: Any) -> Any:
        return self.runner.runner_backend

    def get_moe_routing_method_type(self, layer: Any, requested_method: Any) -> Any:
        return requested_method

    def apply(self, layer: Any, dispatch_output: Any) -> Any:
        return self.runner.run(dispatch_output, None)


class MoEBackendFp8MoEMethod(_MoEBackendMethod, Fp8MoEMethod):
    """FP8 block-scale (DeepSeek-V3) and FP8 per-tensor MoE layers on moe_backend."""

    def __init__(self, quant_config: Any) -> None:
        super().__init__(quant_config)
        if self.use_mxfp8 or self.is_fp4_expert:
            raise unsupported(f"FP8 config with {'MXFP8' if self.use_mxfp8 else 'FP4'} experts")
        if not quant_config.is_checkpoint_fp8_serialized:
            raise unsupported("on-line FP8 quantization of a bf16 checkpoint (--quantization fp8 on bf16 weights)")
        if self.block_quant and list(self.weight_block_size) != [128, 128]:
            raise unsupported(f"FP8 block size {list(self.weight_block_size)} (128x128 only)")
        self.runner = None

    def process_weights_after_loading(self, layer: Any) -> None:
        weights: ExpertWeights
        if self.block_quant:
            weights = binding.fp8_block_weights(layer, ue8m0=self.quant_config.scale_fmt == "ue8m0")
        else:
            weights = binding.fp8_tensor_weights(layer, self.quant_config.activation_scheme == "static")
        binding.bind(layer, weights)


class MoEBackendModelOptNvFp4MoEMethod(_MoEBackendMethod, ModelOptNvFp4FusedMoEMethod):
    """ModelOpt NVFP4 MoE layers on moe_backend (W4A16 on Hopper, so no Blackwell gate).

    The name must contain "ModelOpt": SGLang's ``FusedMoE`` weight loader picks the
    per-tensor scale path for ModelOpt methods by their class name.
    """

    def __init__(self, quant_config: Any) -> None:
        # SGLang's __init__ only picks among its own runners and refuses non-Blackwell GPUs;
        # these are the attributes its weight creation and loading read.
        self.quant_config = quant_config
        self._lora_marlin = False
        self.enable_flashinfer_trtllm_moe = False
        self.use_flashinfer_trtllm_weight_layout = False
        self._cache_permute_indices: Dict[Any, Any] = {}
        self.runner = None
        if not quant_config.is_checkpoint_nvfp4_serialized:
            raise unsupported("on-line NVFP4 quantization of a bf16 checkpoint")

    def process_weights_after_loading(self, layer: Any) -> None:
        binding.bind(layer, binding.nvfp4_weights(layer))


#: Our quantization methods, for the start-up check that every MoE layer got one.
OUR_METHODS = (MoEBackendFp8MoEMethod, MoEBackendModelOptNvFp4MoEMethod)


def _fp8_get_quant_method(original, config, layer, prefix):
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    method = original(config, layer, prefix)
    if selected() and isinstance(layer, FusedMoE) and type(method) is Fp8MoEMethod:
        return MoEBackendFp8MoEMethod(config)
    return method


def _nvfp4_get_quant_method(original, config, layer, prefix):
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    # SGLang's own method refuses Hopper in its __init__, so ours replaces it before it is built.
    # An excluded MoE layer stays unquantized: the start-up check then refuses it by name.
    if selected() and isinstance(layer, FusedMoE) and not config.is_layer_excluded(prefix):
        return MoEBackendModelOptNvFp4MoEMethod(config)
    return original(config, layer, prefix)


def _check_layer_after_init(result, layer, *args, **kwargs):
    """AFTER hook on ``FusedMoE.__init__``: refuse, while the model is built, a layer we cannot serve."""
    if selected():
        check_layer(layer, OUR_METHODS)


#: hook target -> AROUND hook
AROUND_HOOKS = {
    "sglang.srt.layers.quantization.fp8.Fp8Config.get_quant_method": _fp8_get_quant_method,
    "sglang.srt.layers.quantization.modelopt_quant.ModelOptFp4Config.get_quant_method": _nvfp4_get_quant_method,
}

#: hook target -> AFTER hook
AFTER_HOOKS = {
    "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.__init__": _check_layer_after_init,
}
