"""On a Hopper GPU with SGLang: our experts inside SGLang's MoE layer against SGLang's own runner.

One SGLang ``FusedMoE`` per precision on DeepSeek-V3 shapes (256 routed experts plus the
fused shared expert, top-8 + 1, H 7168, I 2048, ``routed_scaling_factor`` 2.5), built with
SGLang's own quantization config and runner (FP8 block-scale: ``triton``; NVFP4: ``auto``,
which is Marlin W4A16 on Hopper) and loaded with the same random quantized experts. Ours
runs on that layer's tensors through the plugin's binding (``binding.bind`` / ``binding.run``:
what the registered runner core calls), with the top-k SGLang's runner receives, so both
apply the router weights and the scaling factor by SGLang's rules. Works with SGLang 0.5.15
(the torch 2.11 GPU machine; it has no runner-core registry, so the layer itself keeps
SGLang's runner and ours is called beside it) and 0.5.23.

Per token count: relative L2 difference ours vs SGLang, each vs our fp32 reference
(``reference_fused_experts``), and the median CUDA-event time of both. Usage::

    python scripts/sglang_layer_compare.py REPORT.json [--experts 257] [--tokens 1,16,128,1024,4096]
        [--tune]

Prints one JSON line per row and writes them all to ``REPORT.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

H, I, TOP_K, SCALING = 7168, 2048, 9, 2.5  # top-k counts the fused shared expert


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model_dir(num_experts: int) -> str:
    """config.json of a DeepSeek-V3 with these MoE shapes (SGLang's ServerArgs reads it; no weights)."""
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                "model_type": "deepseek_v3",
                "hidden_size": H,
                "intermediate_size": 18432,
                "moe_intermediate_size": I,
                "num_hidden_layers": 4,
                "num_attention_heads": 128,
                "num_key_value_heads": 128,
                "n_routed_experts": num_experts - 1,
                "num_experts_per_tok": TOP_K - 1,
                "n_shared_experts": 1,
                "n_group": 8,
                "topk_group": 4,
                "routed_scaling_factor": SCALING,
                "first_k_dense_replace": 3,
                "vocab_size": 129280,
                "q_lora_rank": 1536,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "max_position_embeddings": 4096,
                "torch_dtype": "bfloat16",
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "weight_block_size": [128, 128],
                    "activation_scheme": "dynamic",
                },
            },
            f,
        )
    return path


def select_runner(model_dir: str, backend: str) -> None:
    """Publish SGLang's server config with ``--moe-runner-backend backend`` (0.5.15 and 0.5.23 differ here)."""
    from sglang.srt import runtime_context
    from sglang.srt.layers.moe import utils
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=model_dir, moe_runner_backend=backend)
    if hasattr(runtime_context, "publish"):  # 0.5.23
        runtime_context.publish(args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0))
        utils.initialize_moe_config()
    else:  # 0.5.15
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(args)
        utils.initialize_moe_config(args)


def init_distributed() -> None:
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, backend="nccl", distributed_init_method=f"tcp://127.0.0.1:{port}"
    )
    if "tensor_model_parallel_size" in inspect.signature(initialize_model_parallel).parameters:
        initialize_model_parallel(tensor_model_parallel_size=1)
    else:
        initialize_model_parallel()


def quantized_experts(precision: str, num_experts: int, chunk: int = 16):
    """Random experts quantized in chunks of ``chunk`` (fp32 masters for all 257 would take 45 GB)."""
    from moe_backend.expert_weights import WEIGHT_TYPES

    parts = []
    for start in range(0, num_experts, chunk):
        n = min(chunk, num_experts - start)
        w13 = torch.randn(n, 2 * I, H, device="cuda") / H**0.5
        w2 = torch.randn(n, H, I, device="cuda") / I**0.5
        if precision == "nvfp4":
            # One largest magnitude in gate and up: equal global scales, which SGLang's ModelOpt
            # path assumes (it keeps gate's and warns "w1_weight_scale_2 must match ...").
            peak = w13.abs().amax(dim=(1, 2))
            w13[:, 0, 0], w13[:, I, 0] = peak, peak
        parts.append(WEIGHT_TYPES[precision].quantize(w13, w2))
        del w13, w2
    fields = {name: torch.cat([getattr(p, name) for p in parts]) for name in parts[0].tensors()}
    extra = {"ue8m0": False} if precision == "fp8_block" else {}
    return WEIGHT_TYPES[precision](**fields, **extra)


def sglang_layer(precision: str, num_experts: int, weights) -> Any:
    """SGLang's FusedMoE with its own quantization method, loaded with ``weights`` and processed."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    if precision == "fp8_block":
        from sglang.srt.layers.quantization.fp8 import Fp8Config

        quant = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic", weight_block_size=[128, 128])
        names = {
            "w13_weight": "w13",
            "w2_weight": "w2",
            "w13_weight_scale_inv": "w13_scale",
            "w2_weight_scale_inv": "w2_scale",
        }
    else:
        from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config

        quant = ModelOptFp4Config(is_checkpoint_nvfp4_serialized=True, group_size=16, exclude_modules=[])
        names = {
            "w13_weight": "w13",
            "w2_weight": "w2",
            "w13_weight_scale": "w13_scale",
            "w2_weight_scale": "w2_scale",
            "w13_weight_scale_2": "w13_scale_2",
            "w2_weight_scale_2": "w2_scale_2",
        }
    with torch.device("cuda"):
        layer = FusedMoE(
            num_experts=num_experts,
            hidden_size=H,
            intermediate_size=I,
            layer_id=3,
            top_k=TOP_K,
            num_fused_shared_experts=1,
            params_dtype=torch.bfloat16,
            quant_config=quant,
            prefix="model.layers.3.mlp.experts",
            routed_scaling_factor=SCALING,
        )
    params = dict(layer.named_parameters())
    for param, field in names.items():
        params[param].data.copy_(getattr(weights, field).reshape(params[param].shape))
    for name in ("w13_input_scale", "w2_input_scale"):
        if name in params:
            params[name].data.fill_(1.0)
    return layer


def bind_ours(precision: str, layer: Any):
    """Our layer over the SGLang layer's loaded tensors (before SGLang's kernels repack them)."""
    from types import SimpleNamespace

    from moe_backend.integrations.sglang import binding

    # Marlin repacks NVFP4 in place: ours keeps the checkpoint layout, so it reads a copy.
    snapshot = SimpleNamespace(**{n: p.data.clone() for n, p in layer.named_parameters()})
    weights = (
        binding.fp8_block_weights(snapshot, ue8m0=False)
        if precision == "fp8_block"
        else binding.nvfp4_weights(snapshot)
    )
    binding.bind(layer, weights)
    return binding.binding_of(layer)


def routing(tokens: int, num_experts: int, fused_in_topk: bool):
    """SGLang's top-k as its TopK hands it over: 8 distinct routed ids, weights summing to one (times the
    scaling factor when SGLang folds it in), then the shared expert with the weight that cancels any
    later scaling (``fused_shared_expert_weight``)."""
    routed = num_experts - 1
    ids = torch.stack([torch.randperm(routed, device="cuda")[: TOP_K - 1] for _ in range(tokens)]).to(torch.int32)
    w = torch.rand(tokens, TOP_K - 1, device="cuda")
    w = w / w.sum(-1, keepdim=True) * (SCALING if fused_in_topk else 1.0)
    shared_w = 1.0 if fused_in_topk else 1.0 / SCALING
    ids = torch.cat([ids, torch.full((tokens, 1), routed, dtype=torch.int32, device="cuda")], 1)
    w = torch.cat([w, torch.full((tokens, 1), shared_w, device="cuda")], 1)
    return ids, w


def runner_name(layer: Any) -> str:
    """The runner SGLang's quantization method chose (0.5.15 keeps it only on the method)."""
    backend = getattr(getattr(layer.quant_method, "runner", None), "runner_backend", None)
    return getattr(backend, "value", None) or type(layer.quant_method).__name__


def median_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def compare(precision: str, num_experts: int, token_counts: List[int], tune: bool, model_dir: str) -> List[Dict]:
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from moe_backend.integrations.sglang import binding
    from moe_backend.kernels.reference import reference_fused_experts

    select_runner(model_dir, "triton" if precision == "fp8_block" else "auto")
    weights = quantized_experts(precision, num_experts)
    layer = sglang_layer(precision, num_experts, weights)
    if precision == "nvfp4" and runner_name(layer) == "marlin" and layer.should_fuse_routed_scaling_factor_in_topk:
        # SGLang < 0.5.23 folds routed_scaling_factor into the top-k for every ModelOpt NVFP4 layer
        # while its Marlin runner multiplies by it again (2.5^2 on the routed experts; fixed by
        # sgl-project/sglang#31762). Compare under the fixed rule, which 0.5.23 follows: on Marlin the
        # runner scales and the top-k does not. Read before bind_ours: the binding follows this flag.
        layer.should_fuse_routed_scaling_factor_in_topk = False
        print(
            "SGLang NVFP4 on Marlin: routed scaling moved from the top-k to the runner (sglang#31762)", file=sys.stderr
        )
    ours = bind_ours(precision, layer)
    layer.quant_method.process_weights_after_loading(layer)
    if tune:
        started = time.perf_counter()
        ours.layer.warmup(max(token_counts))
        print(f"tuned {precision} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    rows = []
    for tokens in token_counts:
        ids, w = routing(tokens, num_experts, layer.should_fuse_routed_scaling_factor_in_topk)
        x = torch.randn(tokens, H, device="cuda").to(torch.bfloat16)
        topk = StandardTopKOutput(w, ids, torch.zeros(tokens, num_experts, device="cuda"))
        theirs = layer(x.clone(), topk)  # SGLang's runner may work in place
        mine = binding.run(ours, x, ids, w)
        row = dict(
            precision=precision,
            sglang_runner=runner_name(layer),
            E=num_experts,
            H=H,
            I=I,
            k=TOP_K,
            T=tokens,
            kernel=ours.layer.kernel_name(True),
            ours_vs_sglang=relative(mine, theirs),
            routed_scaling_in_runner=ours.routed_scaling_factor,
        )
        if tokens <= 256:
            scaled = w * ours.routed_scaling_factor if ours.routed_scaling_factor else w
            ref = reference_fused_experts(x, weights, ids, scaled)
            row.update(ours_vs_ref=relative(mine, ref), sglang_vs_ref=relative(theirs, ref))
        row.update(
            sglang_ms=median_ms(lambda x=x, topk=topk: layer(x.clone(), topk)),
            ours_ms=median_ms(lambda x=x, ids=ids, w=w: binding.run(ours, x, ids, w)),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    parser.add_argument("--experts", type=int, default=257, help="local experts, the fused shared one included")
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--precisions", default="fp8_block,nvfp4")
    parser.add_argument("--tune", action="store_true", help="run our tuning warm-up first")
    args = parser.parse_args()
    import sglang

    torch.manual_seed(0)
    init_distributed()
    model_dir = _model_dir(args.experts)
    rows: List[Dict] = []
    for precision in args.precisions.split(","):
        try:
            rows += compare(precision, args.experts, [int(t) for t in args.tokens.split(",")], args.tune, model_dir)
            torch.cuda.empty_cache()  # the layers of one precision are gone once compare returns
        except Exception as err:  # one precision's failure (e.g. a missing compiled kernel) is a result too
            rows.append(dict(precision=precision, error=f"{type(err).__name__}: {err}"))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.report, "w") as f:
        json.dump(
            {
                "sglang": sglang.__version__,
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(),
                "rows": rows,
            },
            f,
            indent=1,
        )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
