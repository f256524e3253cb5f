"""Build one real vLLM MoE layer on the CPU with ``--moe-backend moe_backend`` and check it.

Run as a script (one process per precision: vLLM plugins load once per process)::

    VLLM_TARGET_DEVICE=cpu python layer_check.py {fp8_block,nvfp4}

It builds vLLM's FusedMoE layer (gloo, world size 1) with the precision's
quantization config, loads quantized weights into its parameters, runs vLLM's
``process_weights_after_loading`` and the modular-kernel ``apply``, and prints
one JSON line: the experts class vLLM selected and the largest difference from
``moe_backend.reference_fused_experts`` on the same weights.
"""

import json
import os
import socket
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402

E, K, H, I, T = 8, 2, 256, 256, 7


def _init_vllm():
    """A world of one gloo rank (needs the vLLM config set)."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
    )
    initialize_model_parallel(1, 1)
    # The GPU model runner sets up the workspace manager that modular kernels take their
    # buffers from; vLLM 0.26 asserts on it here (0.33 gets by without it).
    from vllm.v1.worker import workspace

    if not workspace.is_workspace_manager_initialized():
        workspace.init_workspace_manager(torch.device("cpu"))


def _quant_config(precision):
    if precision == "nvfp4":
        from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

        return ModelOptNvFp4Config(quant_method="NVFP4", is_checkpoint_nvfp4_serialized=True)
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    # 0.26 defaults is_checkpoint_fp8_serialized to False and refuses blocks without it; 0.33 to True.
    return Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128])


def _load(layer, precision, weights):
    """Copy our quantized container into vLLM's parameters, in the checkpoint's layout."""
    p = {n: t.data for n, t in layer.named_parameters()}
    p["w13_weight"].copy_(weights.w13)
    p["w2_weight"].copy_(weights.w2)
    if precision == "fp8_block":
        p["w13_weight_scale_inv"].copy_(weights.w13_scale)
        p["w2_weight_scale_inv"].copy_(weights.w2_scale)
    else:
        for name in ("w13_weight_scale", "w13_weight_scale_2", "w2_weight_scale", "w2_weight_scale_2"):
            p[name].copy_(getattr(weights, name.replace("_weight", "")))
        p["w13_input_scale"].fill_(1.0)
        p["w2_input_scale"].fill_(1.0)


def main(precision):
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config import KernelConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(kernel_config=KernelConfig(moe_backend="moe-backend"))):
        _init_vllm()
        print(json.dumps(_check(precision)))


def _check(precision):
    import vllm.model_executor.layers.fused_moe as fused_moe

    from moe_backend import reference_fused_experts
    from moe_backend.expert_weights import WEIGHT_TYPES

    factory = getattr(fused_moe, "FusedMoEFactory", None) or fused_moe.FusedMoE
    runner = factory(
        num_experts=E,
        top_k=K,
        hidden_size=H,
        intermediate_size=I,
        params_dtype=torch.bfloat16,
        quant_config=_quant_config(precision),
        prefix="model.layers.3.mlp.experts",
    )
    layer = getattr(runner, "routed_experts", runner)
    torch.manual_seed(0)
    # Gate and up get different magnitudes so NVFP4's two global scales differ.
    w13 = torch.cat([torch.randn(E, I, H) * 0.05, torch.randn(E, I, H) * 0.02], 1)
    weights = WEIGHT_TYPES[precision].quantize(w13, torch.randn(E, H, I) * 0.05)
    _load(layer, precision, weights)
    layer.quant_method.process_weights_after_loading(layer)

    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, K), dtype=torch.int32)
    topk_weights = torch.rand(T, K)
    out = layer.quant_method.apply(layer, x, topk_weights, ids, None, None)
    ref = reference_fused_experts(x, weights, ids, topk_weights)
    return {
        "experts": type(layer.quant_method.moe_kernel.fused_experts).__name__,
        "max_abs_diff": (out.float() - ref.float()).abs().max().item(),
        "ref_max": ref.float().abs().max().item(),
    }


if __name__ == "__main__":
    main(sys.argv[1])
