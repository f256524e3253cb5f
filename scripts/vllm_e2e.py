"""End to end on a GPU: vLLM serving a tiny DeepSeek-V3 with ``moe_backend="moe_backend"``.

For each flavour (FP8 block, NVFP4) it runs vLLM offline twice, each in its own
process (plugins load once per process; each run frees its GPU memory):

* ours: ``LLM(model=..., moe_backend="moe_backend", enable_return_routed_experts=True)``;
* vLLM's own backend on the same checkpoint: Triton for FP8 block, Marlin for NVFP4;

and compares the greedy tokens of a fixed batch of prompts. Then it recomputes
the routing of every MoE layer for each (prompt + generated) sequence with
transformers' DeepSeek-V3 on the same checkpoint (``moe_backend.accuracy``;
float64, our ``noaux_tc`` selection) and compares it with the routed experts
vLLM returned from our routing-replay output.

Needs a CUDA GPU, vLLM (0.26 to 0.33) with this package installed (entry point
``vllm.general_plugins``) and transformers. Usage::

    python scripts/vllm_e2e.py /tmp/e2e [--prompts 8] [--max-tokens 32]

Prints one JSON report and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REFERENCE_BACKEND = {"fp8": "triton", "nvfp4": "marlin"}
#: Fractions that must agree. Greedy tokens of two FP8/NVFP4 kernels can part after a near-tie,
#: so sequences are compared up to their first difference; routing is recomputed in float64,
#: so a selection at a near-tie may flip.
MIN_TOKEN_AGREEMENT = 0.9
MIN_ROUTING_AGREEMENT = 0.97


def make_checkpoints(out: Path) -> Dict[str, Path]:
    """bf16 (the recomputation's base), FP8 block and NVFP4 tiny DeepSeek-V3 checkpoints."""
    subprocess.run([sys.executable, "-m", "moe_backend.cli", "make-checkpoint", str(out / "ckpt"),
                    "--formats", "bf16", "fp8", "nvfp4"], check=True)
    return {f: out / "ckpt" / f for f in ("bf16", "fp8", "nvfp4")}


def prompts(n: int, vocab: int, seed: int = 0) -> List[List[int]]:
    """``n`` seeded prompts of 8 to 40 token ids (the tiny checkpoints ship no tokenizer)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(8, 41))] for _ in range(n)]


def generate(model: Path, backend: str, token_prompts: List[List[int]], max_tokens: int, out: Path) -> None:
    """One vLLM run (called in a child process): greedy token ids, and routed experts for ours."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ours = backend == "moe_backend"
    # moe_backend= (not kernel_config={...}): vLLM validates kernel_config before plugins load.
    llm = LLM(model=str(model), moe_backend=backend, skip_tokenizer_init=True, max_model_len=256,
              gpu_memory_utilization=0.5, enable_return_routed_experts=ours, seed=0)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False))
    record = []
    for r in results:
        c = r.outputs[0]
        routed = getattr(c, "routed_experts", None)
        if routed is None:
            routed = getattr(r, "routed_experts", None)
        record.append({"tokens": list(c.token_ids),
                       "routed_experts": None if routed is None else routed.tolist()})
    out.write_text(json.dumps(record))


def run_child(model: Path, backend: str, token_prompts, max_tokens: int, out: Path) -> list:
    spec = json.dumps({"model": str(model), "backend": backend, "prompts": token_prompts,
                       "max_tokens": max_tokens, "out": str(out)})
    subprocess.run([sys.executable, __file__, "--child", spec], check=True, env=dict(os.environ))
    return json.loads(out.read_text())


def token_agreement(ours: list, ref: list) -> float:
    """Fraction of generated positions equal up to each sequence's first difference."""
    same = total = 0
    for a, b in zip(ours, ref):
        n = min(len(a["tokens"]), len(b["tokens"]))
        first = next((i for i in range(n) if a["tokens"][i] != b["tokens"][i]), n)
        same += first
        total += n
    return same / max(total, 1)


def recompute_routing(bf16: Path, ckpt: Path, sequences: List[List[int]]) -> List[Dict[int, list]]:
    """Per sequence, MoE layer index -> ``[len, k]`` expert ids from transformers + our routing (float64)."""
    import torch

    from moe_backend.accuracy import checkpoint_model

    model = checkpoint_model(bf16, ckpt, torch.device("cuda"), serve=True)
    captured: Dict[int, torch.Tensor] = {}
    for idx, block in enumerate(model.model.layers):
        mlp = block.mlp
        if not hasattr(mlp, "layer"):
            continue
        layer = mlp.layer

        def forward(hidden, logits, _layer=layer, _forward=layer.forward, _idx=idx, **kw):
            ids, _ = _layer.config.routing.select(logits, _layer.config.top_k, _layer.correction_bias)
            captured[_idx] = ids.cpu()
            return _forward(hidden, logits, **kw)

        layer.forward = forward
    result = []
    with torch.no_grad():
        for seq in sequences:
            captured.clear()
            model(torch.tensor([seq], device="cuda"))
            result.append({i: t.tolist() for i, t in captured.items()})
    return result


def routing_agreement(routed: list, recomputed: List[Dict[int, list]], positions: List[int]) -> float:
    """Fraction of (token, MoE layer) whose expert sets match; vLLM rows cover ``positions[i]`` tokens."""
    same = total = 0
    for rows, ref, n in zip(routed, recomputed, positions):
        for layer, ids in ref.items():
            for t in range(n):
                same += set(rows[t][layer]) == set(ids[t])
                total += 1
    return same / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        generate(Path(spec["model"]), spec["backend"], spec["prompts"], spec["max_tokens"], Path(spec["out"]))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    ckpts = make_checkpoints(args.out)
    vocab = json.loads((ckpts["bf16"] / "config.json").read_text())["vocab_size"]
    token_prompts = prompts(args.prompts, vocab)
    report, ok = {}, True
    for flavour, ref_backend in REFERENCE_BACKEND.items():
        ours = run_child(ckpts[flavour], "moe_backend", token_prompts, args.max_tokens,
                         args.out / f"{flavour}-moe_backend.json")
        ref = run_child(ckpts[flavour], ref_backend, token_prompts, args.max_tokens,
                        args.out / f"{flavour}-{ref_backend}.json")
        sequences = [p + o["tokens"] for p, o in zip(token_prompts, ours)]
        # vLLM returns routing for the prompt and every generated token but the last.
        positions = [len(s) - 1 for s in sequences]
        recomputed = recompute_routing(ckpts["bf16"], ckpts[flavour], sequences)
        tokens = token_agreement(ours, ref)
        routing = None if ours[0]["routed_experts"] is None else \
            routing_agreement([o["routed_experts"] for o in ours], recomputed, positions)
        report[flavour] = {"reference": ref_backend, "token_agreement": tokens, "routing_agreement": routing}
        ok &= tokens >= MIN_TOKEN_AGREEMENT and routing is not None and routing >= MIN_ROUTING_AGREEMENT
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
