"""Expert parallelism on two GPUs: vLLM serving a tiny DeepSeek-V3 (FP8 block) with
``tensor_parallel_size=2, enable_expert_parallel=True``, its ``triton`` MoE backend against ``moe_backend``.

Each GPU holds half of every MoE layer's experts (vLLM's contiguous ``linear`` placement: rank 0
experts ``[0, E/2)``, rank 1 ``[E/2, E)``), runs them on all tokens of the step with the global
top-k, and vLLM all-reduces the two halves. Three runs, each in its own process group
(``vllm_runs.run_child``):

* ``triton``: vLLM's own Triton fused MoE (the reference);
* ``moe_backend`` with ``MOE_BACKEND_NUMERICS=vllm_triton`` (checked): every greedy sequence and every
  routed-experts row (all MoE layers, captured from our routing replay) equal to ``triton``'s; our experts
  serve the MoE layers; the two ranks' tuning warm-ups hold experts ``[0, E/2)`` and ``[E/2, E)`` of E
  and are keyed on the engine's max tokens;
* ``moe_backend_accurate``, the default numerics, whose kernels do tune (reported: token agreement with
  ``triton``; checked: the same per-rank warm-up and routed-experts shape).

What differs from the single-GPU runs (``vllm_e2e.py``): the checkpoint (:data:`EP_DIMS`) has
``moe_intermediate_size`` 256, so the shared expert, which tensor parallelism splits in two, keeps
whole 128-row FP8 blocks on each rank, and 8 attention heads (4 a rank, as the single-GPU runs);
vLLM's custom all-reduce is off (NCCL's serves, CUDA-graph capturable), and NVLink multicast stays
off in NCCL, PyTorch and vLLM (:data:`MULTICAST_OFF`).

Needs two CUDA GPUs, vLLM (0.26 to 0.33) with this package installed (entry point
``vllm.general_plugins``). Usage::

    python scripts/vllm_ep2.py WORK_DIR [--report PATH] [--prompts 16] [--max-tokens 32] [--eager]

The JSON report (default ``WORK_DIR/ep2.json``) is rewritten after every run; exits non-zero
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from vllm_e2e import (
    MAX_NUM_BATCHED_TOKENS,
    generate,
    make_checkpoints,
    prompts,
    routed_shape_problems,
    token_agreement,
)
from vllm_runs import RunBudget, add_run_options, run_child

EP_SIZE = 2
#: ``LLM`` arguments of every run: two GPUs, experts split between them, NCCL for the all-reduce.
ENGINE_ARGS = {"tensor_parallel_size": EP_SIZE, "enable_expert_parallel": True, "disable_custom_all_reduce": True}
#: The GPU machines require NVLink multicast off (also in a child's own environment).
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
}
#: On top of vllm_e2e's MLA dims: the shared expert's 256 rows split over two ranks in whole 128-row
#: FP8 blocks, and each rank keeps the 4 attention heads the single-GPU runs had.
EP_DIMS = {"moe_intermediate_size": 256, "num_attention_heads": 8}
#: FP8 weight blocks are 128 x 128: vLLM refuses a tensor-parallel split that cuts one.
FP8_BLOCK = 128
#: Run name -> (``moe_backend``, extra environment). The first is the reference.
RUNS = {
    "triton": ("triton", {}),
    "moe_backend": ("moe_backend", {"MOE_BACKEND_NUMERICS": "vllm_triton"}),
    "moe_backend_accurate": ("moe_backend", {}),
}
#: The plugin's per-rank warm-up line (``integrations/vllm/warmup.py``).
WARMUP_LINE = re.compile(
    r"tuning warm-up of (\d+) MoE layers for up to (\d+) tokens took ([\d.]+) s "
    r"\(rank (\d+), experts (.+)\)$"
)


def tp_block_problems(config: dict, tp: int) -> List[str]:
    """The FP8 block linears of a DeepSeek-V3 ``config`` that a ``tp``-way split would cut inside a block."""
    heads = config["num_attention_heads"]
    split = {
        "q_b_proj rows": heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]),
        "kv_b_proj rows": heads * (config["qk_nope_head_dim"] + config["v_head_dim"]),
        "o_proj columns": heads * config["v_head_dim"],
        "dense MLP intermediate": config["intermediate_size"],
        "shared expert intermediate": config["moe_intermediate_size"] * config["n_shared_experts"],
    }
    return [
        f"{name}: {size} over {tp} ranks is not whole {FP8_BLOCK}-blocks"
        for name, size in split.items()
        if size % (tp * FP8_BLOCK)
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="?", help="working directory (checkpoint, run outputs, logs)")
    parser.add_argument("--report", type=Path, help="where to write the JSON report (default WORK/ep2.json)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager=True)")
    add_run_options(parser, child_timeout=240, budget_s=560)
    return parser


def rank_warmups(lines: List[str]) -> Dict[int, dict]:
    """The plugin's warm-up lines (vLLM log) -> rank -> layers, max tokens, seconds, expert range."""
    out = {}
    for line in lines:
        m = WARMUP_LINE.search(line)
        if m:
            layers, tokens, seconds, rank, experts = m.groups()
            out[int(rank)] = {
                "layers": int(layers),
                "max_tokens": int(tokens),
                "seconds": float(seconds),
                "experts": experts,
            }
    return out


def warmup_problems(warmups: Dict[int, dict], num_experts: int, moe_layers: int, max_tokens: int) -> List[str]:
    """What is wrong with the ranks' warm-ups: each of the :data:`EP_SIZE` ranks must warm up every MoE
    layer for ``max_tokens`` over its own contiguous share of the experts (empty: nothing)."""
    problems = []
    share = num_experts // EP_SIZE
    for rank in range(EP_SIZE):
        got = warmups.get(rank)
        if got is None:
            problems.append(f"rank {rank}: no tuning warm-up logged")
            continue
        want = {
            "layers": moe_layers,
            "max_tokens": max_tokens,
            "experts": f"[{rank * share}, {(rank + 1) * share}) of {num_experts}",
        }
        problems += [
            f"rank {rank}: {key} {got[key]!r}, expected {value!r}" for key, value in want.items() if got[key] != value
        ]
    problems += [f"rank {rank}: not an EP rank" for rank in warmups if rank >= EP_SIZE]
    return problems


def compare(ours: dict, ref: dict, token_prompts: List[List[int]], config: dict) -> dict:
    """Our run against the reference run: sequences and routed experts equal, routed shape, warm-ups."""
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    a, b = ours["outputs"], ref["outputs"]
    return {
        "served_by_moe_backend": bool(ours["served_by_moe_backend"]) and not ref["served_by_moe_backend"],
        "identical_sequences": sum(x["tokens"] == y["tokens"] for x, y in zip(a, b, strict=True)),
        "token_agreement": token_agreement(a, b),
        "routed_experts_equal": sum(x["routed_experts"] == y["routed_experts"] for x, y in zip(a, b, strict=True)),
        "routed_shape_problems": routed_shape_problems(a, token_prompts, config, b),
        "rank_warmups": rank_warmups(ours["tuning_warmup"]),
        "warmup_problems": warmup_problems(
            rank_warmups(ours["tuning_warmup"]), config["n_routed_experts"], moe_layers, MAX_NUM_BATCHED_TOKENS
        ),
    }


def checks(entry: dict, parity: bool, prompts_count: int) -> Dict[str, bool]:
    """The pass/fail checks of one of our runs' :func:`compare` entry (``parity``: the vllm_triton run)."""
    out = {
        "served": entry["served_by_moe_backend"],
        "routed_shape": not entry["routed_shape_problems"],
        "rank_warmups": not entry["warmup_problems"],
    }
    if parity:
        out["identical_sequences"] = entry["identical_sequences"] == prompts_count
        out["routed_experts_equal"] = entry["routed_experts_equal"] == prompts_count
    return out


def run_spec(model: Path, backend: str, token_prompts: List[List[int]], args: argparse.Namespace, out: Path) -> dict:
    """The ``vllm_e2e.generate`` spec of one run, with the EP engine arguments."""
    return {
        "model": str(model),
        "backend": backend,
        "prompts": token_prompts,
        "max_tokens": args.max_tokens,
        "eager": args.eager,
        "out": str(out),
        "engine_args": ENGINE_ARGS,
    }


def versions() -> dict:
    try:
        import torch
        import vllm

        return {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "gpus": torch.cuda.device_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    except Exception as err:  # noqa: BLE001  the report says why
        return {"error": f"{type(err).__name__}: {err}"}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child is not None:
        generate(args.child)
        return 0
    if args.work is None:
        parser.error("WORK_DIR is required")
    budget = RunBudget(args.budget_s, args.child_timeout, reserve_s=5, min_run_s=60)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report_path = args.report or work / "ep2.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "settings": {
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "eager": args.eager,
            "engine_args": ENGINE_ARGS,
            "env": MULTICAST_OFF,
            "dims": EP_DIMS,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        },
        "versions": versions(),
        "runs": {},
        "checks": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report_path.write_text(json.dumps(report, indent=2))

    model = make_checkpoints(work, ["fp8"], EP_DIMS)["fp8"]
    config = json.loads((model / "config.json").read_text())
    report["checkpoint_problems"] = tp_block_problems(config, EP_SIZE)
    if report["checkpoint_problems"]:
        report["ok"] = False
        save()
        raise SystemExit(f"the checkpoint cannot be split over {EP_SIZE} ranks: {report['checkpoint_problems']}")
    token_prompts = prompts(args.prompts, config["vocab_size"])
    runs = {}
    for name, (backend, env) in RUNS.items():
        runs[name] = run_child(
            __file__,
            run_spec(model, backend, token_prompts, args, work / f"{name}.json"),
            work / f"{name}.log",
            budget,
            {**MULTICAST_OFF, **env},
        )
        report["runs"][name] = {
            "backend": backend,
            "env": env,
            **{k: v for k, v in runs[name].items() if k != "outputs"},
        }
        save()
    ref = runs["triton"]
    for name in ("moe_backend", "moe_backend_accurate"):
        if "error" in ref or "error" in runs[name]:
            report["checks"][name] = {"ran": False}
            continue
        entry = compare(runs[name], ref, token_prompts, config)
        report["runs"][name].update(entry)
        report["checks"][name] = checks(entry, name == "moe_backend", len(token_prompts))
    report["ok"] = all(all(c.values()) for c in report["checks"].values())
    save()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
