"""Decode-heavy offline throughput in vLLM: ``moe_backend`` against vLLM's own MoE backend.

The model is DeepSeek-V3 at its real widths (hidden 7168, 256 routed experts of
intermediate 2048, top-8 in 8 groups, one shared expert, MLA with q_lora_rank 1536,
kv_lora_rank 512, 128 heads, vocab 129280) with few layers (``--layers``, default 5: one
dense layer, then 4 MoE layers, about 50 GiB in FP8), so that one 80 GB H100 holds it.
Only a ``config.json`` is written: vLLM makes the weights (``load_format="dummy"``).

Dummy weights give meaningless router logits, so by default vLLM's routing simulator
picks experts uniformly at random (``VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random``)
for both backends: every expert gets its share of tokens, as in a served model.
``--routing model`` keeps the model's router.

Each backend runs in its own process: ``LLM(..., moe_backend=NAME)`` with
``skip_tokenizer_init``, no torch.compile (``compilation_config.mode`` 0, for a short
start-up) and full CUDA graphs for decode batches up to ``--prompts``. After a warm-up
generate (first-call Triton compilation, graph replay paths), it times one
``generate`` of ``--prompts`` random prompts of ``--input-len`` tokens, each producing
exactly ``--output-len`` tokens (``ignore_eos``). Reference backends: ``triton`` for FP8
block (``--precision fp8``), ``marlin`` for NVFP4 (``--precision nvfp4``, vLLM's only
NVFP4 MoE on Hopper).

Usage::

    python scripts/vllm_throughput.py --report PATH [--precision fp8] [--layers 5]
        [--prompts 256] [--input-len 32] [--output-len 256]

Prints the report and writes it to ``--report`` as JSON (rewritten after each backend).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from vllm_runs import REFERENCE_BACKEND, RunBudget, add_run_options, run_child

#: DeepSeek-V3's config.json (layer count set by --layers; no MTP layer; no YaRN, which only
#: changes the rotary tables).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}
QUANTIZATION = {
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    # Attention and lm_head stay bf16, as in NVIDIA's DeepSeek-R1 NVFP4 checkpoints.
    "nvfp4": {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "ignore": ["lm_head", "model.layers.*.self_attn*"],
    },
}


def weight_bytes(config: dict, precision: str) -> dict:
    """Approximate bytes of the weights vLLM allocates (experts, dense linears, embeddings)."""
    h, i, e = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    heads, nope, rope, v = (
        config["num_attention_heads"],
        config["qk_nope_head_dim"],
        config["qk_rope_head_dim"],
        config["v_head_dim"],
    )
    q, kv = config["q_lora_rank"], config["kv_lora_rank"]
    layers, dense = config["num_hidden_layers"], config["first_k_dense_replace"]
    per_weight = 1.0 if precision == "fp8" else 0.5 + 1 / 16  # NVFP4: 4 bits + an e4m3 scale per 16
    attn_params = q * h + heads * (nope + rope) * q + (kv + rope) * h + heads * (nope + v) * kv + h * heads * v
    attn = attn_params * (1.0 if precision == "fp8" else 2.0)  # NVFP4 leaves attention in bf16
    experts = e * 3 * h * i * per_weight
    shared = config["n_shared_experts"] * 3 * h * i * per_weight
    dense_mlp = 3 * h * config["intermediate_size"] * per_weight
    embed = 2 * config["vocab_size"] * h * 2  # embed_tokens and lm_head in bf16
    moe_layers = layers - dense
    total = layers * attn + dense * dense_mlp + moe_layers * (experts + shared) + embed
    return {
        "total_gib": round(total / 2**30, 1),
        "experts_per_moe_layer_gib": round(experts / 2**30, 2),
        "moe_layers": moe_layers,
    }


def write_config(path: Path, layers: int, precision: str) -> dict:
    config = dict(DEEPSEEK_V3, num_hidden_layers=layers, quantization_config=QUANTIZATION[precision])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def child(spec: dict) -> None:
    """One backend (in its own process): start vLLM, warm up, time one generate."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    graph_sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s < spec["prompts"]} | {spec["prompts"]})
    started = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        load_format="dummy",
        moe_backend=spec["backend"],
        skip_tokenizer_init=True,
        max_model_len=spec["input_len"] + spec["output_len"] + 16,
        max_num_seqs=spec["prompts"],
        max_num_batched_tokens=spec["max_batched_tokens"],
        gpu_memory_utilization=spec["gpu_util"],
        enable_prefix_caching=False,
        seed=0,
        compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": graph_sizes},
    )
    startup = time.perf_counter() - started
    rng = random.Random(0)
    vocab = DEEPSEEK_V3["vocab_size"]
    prompts = [
        TokensPrompt(prompt_token_ids=[rng.randrange(2, vocab) for _ in range(spec["input_len"])])
        for _ in range(spec["prompts"])
    ]

    def params(n: int):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    started = time.perf_counter()
    llm.generate(prompts, params(16), use_tqdm=False)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    outputs = llm.generate(prompts, params(spec["output_len"]), use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    Path(spec["out"]).write_text(
        json.dumps(
            {
                "startup_s": round(startup, 1),
                "warmup_generate_s": round(warmup, 2),
                "elapsed_s": round(elapsed, 3),
                "generated_tokens": generated,
                "output_tokens_per_s": round(generated / elapsed, 1),
                "total_tokens_per_s": round((generated + spec["prompts"] * spec["input_len"]) / elapsed, 1),
                "graph_sizes": graph_sizes,
            }
        )
    )


def run_backend(spec: dict, log_path: Path, budget: RunBudget) -> dict:
    # vLLM's dummy weights draw scales in [-1e-3, 1e-3]; our containers refuse negative scales unless told
    extra = {"MOE_BACKEND_CHECK_SCALES": "0"}
    if spec["routing"] != "model":
        extra["VLLM_MOE_ROUTING_SIMULATION_STRATEGY"] = spec["routing"]
    return run_child(__file__, spec, log_path, budget, extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=False, help="JSON report path")
    parser.add_argument("--work", type=Path, help="directory for the config and logs (default: a temp dir)")
    parser.add_argument("--precision", choices=tuple(QUANTIZATION), default="fp8")
    parser.add_argument("--layers", type=int, default=5, help="decoder layers (the first is dense)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--max-batched-tokens",
        type=int,
        default=2048,
        help="vLLM max_num_batched_tokens (also our tuning warm-up's largest token count)",
    )
    parser.add_argument("--gpu-util", type=float, default=0.9, help="vLLM gpu_memory_utilization")
    parser.add_argument(
        "--routing",
        default="uniform_random",
        help="VLLM_MOE_ROUTING_SIMULATION_STRATEGY, or 'model' for the model's router",
    )
    parser.add_argument("--backends", nargs="+", help="default: moe_backend and the precision's reference")
    add_run_options(parser, child_timeout=270, budget_s=560)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    if args.report is None:
        parser.error("--report is required")

    budget = RunBudget(args.budget_s, args.child_timeout, reserve_s=0, min_run_s=60)
    work = args.work or Path(tempfile.mkdtemp(prefix="vllm_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work / "model", args.layers, args.precision)
    backends = args.backends or ["moe_backend", REFERENCE_BACKEND[args.precision]]
    report = {
        "precision": args.precision,
        "layers": args.layers,
        "prompts": args.prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "routing": args.routing,
        "max_num_batched_tokens": args.max_batched_tokens,
        "weights": weight_bytes(config, args.precision),
        "work": str(work),
        "backends": {},
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    for backend in backends:
        spec = {
            "model": str(work / "model"),
            "backend": backend,
            "prompts": args.prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "max_batched_tokens": args.max_batched_tokens,
            "gpu_util": args.gpu_util,
            "routing": args.routing,
            "out": str(work / f"{backend}.json"),
        }
        report["backends"][backend] = run_backend(spec, work / f"{backend}.log", budget)
        args.report.write_text(json.dumps(report, indent=2))
    rates = {b: r.get("output_tokens_per_s") for b, r in report["backends"].items()}
    if rates.get("moe_backend") and len(backends) > 1 and rates.get(backends[1]):
        report["speedup_vs_" + backends[1]] = round(rates["moe_backend"] / rates[backends[1]], 3)
    report["ok"] = all("error" not in r for r in report["backends"].values())
    args.report.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
