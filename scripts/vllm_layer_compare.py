"""On a GPU with vLLM: our FP8 block-scale experts against vLLM's Triton ``fused_experts`` on
identical quantized weights, inputs and routing.

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


def compare(num_experts: int, hidden: int, inter: int, tokens: int, top_k: int) -> dict:
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from moe_backend import FP8BlockMoE, MoEConfig
    from moe_backend.expert_weights import FP8BlockWeights
    from moe_backend.kernels.reference import exact_fused_experts, reference_fused_experts

    dev = "cuda"
    w = FP8BlockWeights.quantize(torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden ** 0.5,
                                 torch.randn(num_experts, hidden, inter, device=dev) / inter ** 0.5)
    x = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, device=dev)[:top_k] for _ in range(tokens)]).to(torch.int32)
    topk_w = torch.rand(tokens, top_k, device=dev).softmax(-1)
    layer = FP8BlockMoE(w, MoEConfig(num_experts=num_experts, top_k=top_k))
    ours = layer.experts(x, ids, topk_w)
    quant = fp8_w8a8_moe_quant_config(w1_scale=w.w13_scale, w2_scale=w.w2_scale, block_shape=[128, 128])
    theirs = fused_experts(x, w.w13, w.w2, topk_w, ids, quant_config=quant)
    ref = reference_fused_experts(x, w, ids, topk_w)
    deq = [w.dequantize_expert(e) for e in range(num_experts)]
    exact = exact_fused_experts(x, torch.stack([d[0] for d in deq]), torch.stack([d[1] for d in deq]), ids, topk_w)
    return dict(E=num_experts, H=hidden, I=inter, T=tokens, k=top_k, kernel=layer.kernel_name(True),
                ours_vs_vllm=relative(ours, theirs), ours_vs_ref=relative(ours, ref), vllm_vs_ref=relative(theirs, ref),
                ours_vs_exact=relative(ours, exact), vllm_vs_exact=relative(theirs, exact),
                ref_vs_exact=relative(ref, exact))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    torch.manual_seed(0)
    rows = []
    for shape in ((16, 1024, 256, 64, 4), (32, 7168, 2048, 16, 8), (32, 7168, 2048, 256, 8)):
        rows.append(compare(*shape))
        print(json.dumps(rows[-1]), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
