"""On a GPU with vLLM: our FP8 block-scale experts against vLLM's Triton experts on
identical quantized weights, inputs and routing.

vLLM's side runs twice: ``fused_experts`` (``vllm_impl``), and the steps of ``TritonExperts.apply``
that ``--moe-backend triton`` serves (``vllm_modular``: its own activation quantization, Triton
GEMMs, ``silu_and_mul_per_block_quant`` and ``moe_sum``). Ours runs with the default
``accurate`` numerics and with ``vllm_triton`` numerics, which should equal ``vllm_modular``
bit for bit (``parity_equal``: the fraction of equal output elements).

Each is compared with our fp32 reference (``reference_fused_experts``: the kernels'
activation quantization, fp32 intermediates) and with the float64 sum on the dequantized
weights and unquantized activations (``exact_fused_experts``). It tells a bug (one side
far from both references) from a different choice of roundings (both equally far from
the exact sum, apart from each other). Usage::

    python scripts/vllm_layer_compare.py REPORT.json

Prints one line a shape and writes them all to ``REPORT.json``.
"""

from __future__ import annotations

import json
import sys

import torch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def vllm_modular(x: torch.Tensor, w, ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """The FP8 block-scale steps of vLLM's ``TritonExperts.apply`` (no LoRA, no expert map)."""
    import triton.language as tl
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.fused_moe import (
        _prepare_expert_assignment,
        invoke_fused_moe_triton_kernel,
        try_get_optimal_moe_config,
    )
    from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8

    t, h = x.shape
    num_experts, two_i, _ = w.w13.shape
    top_k = ids.shape[1]
    block = [128, 128]
    config = try_get_optimal_moe_config(w.w13.shape, w.w2.shape, top_k, "fp8_w8a8", t, block_shape=block)
    qx, qx_scale = per_token_group_quant_fp8(x, 128)
    sorted_ids, expert_ids, padded = _prepare_expert_assignment(
        ids, config, t, top_k, num_experts, None, block_shape=block
    )
    kinds = dict(
        compute_type=tl.bfloat16,
        use_fp8_w8a8=True,
        use_int8_w8a8=False,
        use_int8_w8a16=False,
        use_int4_w4a16=False,
        per_channel_quant=False,
        block_shape=block,
    )
    cache1 = torch.empty(t, top_k, two_i, dtype=torch.bfloat16, device=x.device)
    invoke_fused_moe_triton_kernel(
        qx, w.w13, cache1, qx_scale, w.w13_scale, None, sorted_ids, expert_ids, padded, False, top_k, config, **kinds
    )
    q2, q2_scale = ops.silu_and_mul_per_block_quant(
        cache1.view(-1, two_i), group_size=128, quant_dtype=torch.float8_e4m3fn
    )
    cache3 = torch.empty(t, top_k, h, dtype=torch.bfloat16, device=x.device)
    invoke_fused_moe_triton_kernel(
        q2, w.w2, cache3, q2_scale, w.w2_scale, topk_w, sorted_ids, expert_ids, padded, True, 1, config, **kinds
    )
    out = torch.empty(t, h, dtype=torch.bfloat16, device=x.device)
    ops.moe_sum(cache3, out)
    return out


def problem(weights_type, num_experts: int, hidden: int, inter: int, tokens: int, top_k: int):
    """Random experts quantized as ``weights_type``, bf16 inputs ``[T, H]``, distinct expert ids
    ``[T, k]`` int32 and softmaxed router weights, on the GPU."""
    dev = "cuda"
    w = weights_type.quantize(
        torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden**0.5,
        torch.randn(num_experts, hidden, inter, device=dev) / inter**0.5,
    )
    x = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, device=dev)[:top_k] for _ in range(tokens)]).to(torch.int32)
    topk_w = torch.rand(tokens, top_k, device=dev).softmax(-1)
    return w, x, ids, topk_w


def exact_output(w, x: torch.Tensor, ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """The float64 sum on ``w``'s dequantized experts and the unquantized ``x``."""
    from moe_backend.kernels.reference import exact_fused_experts

    deq = [w.dequantize_expert(e) for e in range(w.w13.shape[0])]
    return exact_fused_experts(x, torch.stack([d[0] for d in deq]), torch.stack([d[1] for d in deq]), ids, topk_w)


def compare(num_experts: int, hidden: int, inter: int, tokens: int, top_k: int) -> dict:
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from moe_backend import FP8BlockMoE, MoEConfig
    from moe_backend.expert_weights import FP8BlockWeights
    from moe_backend.kernels.reference import reference_fused_experts

    w, x, ids, topk_w = problem(FP8BlockWeights, num_experts, hidden, inter, tokens, top_k)
    layer = FP8BlockMoE(w, MoEConfig(num_experts=num_experts, top_k=top_k))
    ours = layer.experts(x, ids, topk_w)
    parity = FP8BlockMoE(w, MoEConfig(num_experts=num_experts, top_k=top_k), numerics="vllm_triton")
    ours_vllm = parity.experts(x, ids, topk_w)
    modular = vllm_modular(x, w, ids, topk_w)
    quant = fp8_w8a8_moe_quant_config(w1_scale=w.w13_scale, w2_scale=w.w2_scale, block_shape=[128, 128])
    theirs = fused_experts(x, w.w13, w.w2, topk_w, ids, quant_config=quant)
    ref = reference_fused_experts(x, w, ids, topk_w)
    exact = exact_output(w, x, ids, topk_w)
    return dict(
        E=num_experts,
        H=hidden,
        I=inter,
        T=tokens,
        k=top_k,
        kernel=layer.kernel_name(True),
        parity_equal=(ours_vllm == modular).float().mean().item(),
        parity_rel=relative(ours_vllm, modular),
        accurate_equal=(ours == modular).float().mean().item(),
        ours_vs_vllm_modular=relative(ours, modular),
        vllm_modular_vs_impl=relative(modular, theirs),
        ours_vllm_vs_exact=relative(ours_vllm, exact),
        ours_vs_vllm=relative(ours, theirs),
        ours_vs_ref=relative(ours, ref),
        vllm_vs_ref=relative(theirs, ref),
        ours_vs_exact=relative(ours, exact),
        vllm_vs_exact=relative(theirs, exact),
        ref_vs_exact=relative(ref, exact),
    )


def compare_per_tensor(num_experts: int, hidden: int, inter: int, tokens: int, top_k: int) -> dict:
    """FP8 per-tensor weights with static activation scales (ModelOpt FP8) against vLLM's Triton
    ``fused_experts`` (FP8 MMA accumulated over all of K; ours promotes to fp32 every 128)."""
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from moe_backend import FP8TensorMoE, MoEConfig
    from moe_backend.expert_weights import FP8TensorWeights

    w, x, ids, topk_w = problem(FP8TensorWeights, num_experts, hidden, inter, tokens, top_k)
    w.a13_scale = (x.float().abs().amax() / 448.0).reshape(1)
    w.a2_scale = torch.tensor([0.5 / 448.0], device=x.device)
    ours = FP8TensorMoE(w, MoEConfig(num_experts=num_experts, top_k=top_k)).experts(x, ids, topk_w)
    quant = fp8_w8a8_moe_quant_config(
        w1_scale=w.w13_scale, w2_scale=w.w2_scale, a1_scale=w.a13_scale, a2_scale=w.a2_scale
    )
    theirs = fused_experts(x, w.w13, w.w2, topk_w, ids, quant_config=quant)
    exact = exact_output(w, x, ids, topk_w)
    return dict(
        precision="fp8_tensor",
        E=num_experts,
        H=hidden,
        I=inter,
        T=tokens,
        k=top_k,
        ours_vs_vllm=relative(ours, theirs),
        ours_vs_exact=relative(ours, exact),
        vllm_vs_exact=relative(theirs, exact),
    )


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    torch.manual_seed(0)
    rows = []
    for shape in (
        (16, 1024, 256, 64, 4),
        (16, 256, 128, 3, 4),
        (32, 7168, 2048, 1, 8),
        (32, 7168, 2048, 16, 8),
        (32, 7168, 2048, 256, 8),
    ):
        rows.append(compare(*shape))
        print(json.dumps(rows[-1]), flush=True)
    for shape in ((16, 256, 128, 64, 4), (32, 7168, 2048, 16, 8), (32, 7168, 2048, 256, 8)):
        rows.append(compare_per_tensor(*shape))
        print(json.dumps(rows[-1]), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
