"""End to end on a GPU: vLLM serving a tiny DeepSeek-V3 with ``moe_backend="moe_backend"``.

For each flavour (FP8 block, NVFP4, ModelOpt FP8 per-tensor) it runs vLLM offline twice, each in its own
process (plugins load once per process; each run frees its GPU memory):

* ours: ``LLM(model=..., moe_backend="moe_backend", enable_return_routed_experts=True)``;
* vLLM's own backend on the same checkpoint: ``triton`` for FP8 (block and per-tensor), ``marlin`` for NVFP4
  (vLLM's only NVFP4 MoE on Hopper), also returning its routed experts;

and checks, per flavour:

* ``exact_agreement`` (checked): on vLLM's backend's sequences, its greedy tokens and our
  teacher-forced top-1 (below) against the top-1 of the float64 model on the dequantized
  checkpoint (transformers' DeepSeek-V3, ``moe_backend.cli.accuracy``), position by position.
  Ours must not be worse than vLLM's backend by more than ``MAX_WORSE_Z`` standard errors
  (McNemar's test over the positions where exactly one of them agrees). (The whole served stack,
  bf16 attention and FP8 dense layers included, parts from the float64 model, so the
  accuracy harness's MoE-only rates do not apply here; both sides share these inputs.)
* ``teacher_forced_agreement`` (checked): vLLM's own backend generates greedily; our backend then
  scores those sequences (``prompt_logprobs``) and its top-1 next token at every generated
  position is compared with the token vLLM's backend chose there. Two backends that agree with
  the exact model at rates ``a`` and ``b`` agree with each other at least ``a + b - 1`` of the
  time (``predicted_floor``); checked against that floor less ``SLACK``;
* ``token_agreement`` (reported): the free-running greedy tokens, equal up to each sequence's
  first difference; ``first_token_equal``;
* ``vllm_triton_numerics`` (FP8 block; checked): a third run of ours with
  ``MOE_BACKEND_NUMERICS=vllm_triton``, which rounds as vLLM's Triton experts do: its free-running
  greedy tokens must equal those of vLLM's ``triton`` backend in every sequence;
* ``routed_shape_ok``: our routed experts come back as ``[prompt + generated - 1, layers, top_k]``
  with expert ids in range and zeros for the dense layers;
* ``capture_agreement``: the (token, MoE layer) expert sets returned through our routing
  replay equal those vLLM's own capture returns with its backend, over the shared prefix,
  per MoE layer. Checked on the first MoE layer (identical inputs there: must be 1.0;
  ``capture_mismatches`` lists the rows that differ); later layers see the two backends'
  different roundings and are reported;
* ``routing_agreement``: on vLLM's backend's sequences, its captured expert sets and ours (from
  the teacher-forced scoring run) against a recomputation of the routing with transformers'
  DeepSeek-V3 on the same checkpoint with our MoE layers (float64 around them, our
  ``noaux_tc`` selection). Checked as ``exact_agreement``.

The checkpoints keep DeepSeek-V3's MLA head dimensions (kv_lora_rank 512, rope 64, nope 128,
v 128): vLLM 0.26's only MLA prefill backend on Hopper (FlashAttention) accepts no others.
Start-up is kept short: no torch.compile (``compilation_config.mode`` 0) but full CUDA
graphs for decode batches of 1 to 16 (``FULL_DECODE_ONLY``), so our kernels still run under
graph replay; ``--eager`` turns graphs off too.

Needs a CUDA GPU, vLLM (0.26 to 0.33) and this package installed (entry point
``vllm.general_plugins``), and transformers. Usage::

    python scripts/vllm_e2e.py WORK_DIR [--report PATH] [--prompts 8] [--max-tokens 32]

WORK_DIR gets the checkpoints, each run's tokens and log; the JSON report goes to
``--report`` (default ``WORK_DIR/report.json``), rewritten after every step so that a run
cut short still leaves what it measured. Prints the report; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from vllm_runs import REFERENCE_BACKEND, RunBudget, add_run_options, run_child as run_vllm_child

#: Flavours with a ``MOE_BACKEND_NUMERICS`` that reproduces the reference backend bit for bit.
PARITY_NUMERICS = {"fp8": "vllm_triton"}
#: How much lower than the predicted floor the teacher-forced agreement may be.
SLACK = 0.02
#: Ours may trail vLLM's backend in a paired agreement by at most this many standard errors
#: (McNemar's z over the discordant items; 3: a false alarm about once in 700 checks).
MAX_WORSE_Z = 3.0
#: DeepSeek-V3's MLA dimensions, on top of make-checkpoint's tiny sizes.
MLA_DIMS = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
#: Decode batch sizes captured as CUDA graphs (the prompts run as one batch of --prompts).
GRAPH_SIZES = [1, 2, 4, 8, 16]
#: The engine's ``max_num_batched_tokens``: what our tuning warm-up is keyed on.
MAX_NUM_BATCHED_TOKENS = 512


def make_checkpoints(
    work: Path, formats: Sequence[str] = ("bf16", *REFERENCE_BACKEND), dims: Optional[Dict[str, int]] = None
) -> Dict[str, Path]:
    """Tiny DeepSeek-V3 checkpoints under ``work/ckpt`` (default: bf16, the recomputation's base, FP8 block,
    NVFP4 and ModelOpt FP8 per-tensor) with :data:`MLA_DIMS` and ``dims`` (config.json sizes) set."""
    sizes = [
        a for name, value in {**MLA_DIMS, **(dims or {})}.items() for a in (f"--{name.replace('_', '-')}", str(value))
    ]
    subprocess.run(
        [sys.executable, "-m", "moe_backend.cli", "make-checkpoint", str(work / "ckpt"), "--formats", *formats, *sizes],
        check=True,
    )
    return {f: work / "ckpt" / f for f in formats}


def prompts(n: int, vocab: int, seed: int = 0) -> List[List[int]]:
    """``n`` seeded prompts of 8 to 40 token ids (the tiny checkpoints ship no tokenizer)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(8, 41))] for _ in range(n)]


def generate(spec: dict) -> None:
    """One vLLM run (in a child process): greedy token ids and routed experts of every prompt
    (``spec["engine_args"]``: more ``LLM`` arguments, e.g. the parallel layout)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    compilation = {
        "mode": 0,
        "cudagraph_mode": "NONE" if spec["eager"] else "FULL_DECODE_ONLY",
        "cudagraph_capture_sizes": GRAPH_SIZES,
    }
    started = time.perf_counter()
    # moe_backend= (not kernel_config={...}): vLLM validates kernel_config before plugins load.
    llm = LLM(
        model=spec["model"],
        moe_backend=spec["backend"],
        skip_tokenizer_init=True,
        max_model_len=256,
        max_num_seqs=max(GRAPH_SIZES),
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory_bytes=2 << 30,
        enable_return_routed_experts=True,
        seed=0,
        enforce_eager=spec["eager"],
        compilation_config=compilation,
        **spec.get("engine_args", {}),
    )
    startup = time.perf_counter() - started
    started = time.perf_counter()
    results = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]],
        SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False),
    )
    record = {"startup_s": round(startup, 1), "generate_s": round(time.perf_counter() - started, 2), "outputs": []}
    for r in results:
        c = r.outputs[0]
        routed = getattr(c, "routed_experts", None)
        record["outputs"].append(
            {"tokens": list(c.token_ids), "routed_experts": None if routed is None else routed.tolist()}
        )
    if spec.get("score"):
        scored = llm.generate(
            [TokensPrompt(prompt_token_ids=q) for q in spec["score"]],
            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False),
        )
        record["teacher_forced_top1"] = [top1_of_prompt(r.prompt_logprobs) for r in scored]
        routed = [getattr(r.outputs[0], "routed_experts", None) for r in scored]
        record["teacher_forced_routed"] = [None if x is None else x.tolist() for x in routed]
    Path(spec["out"]).write_text(json.dumps(record))


def top1_of_prompt(prompt_logprobs: list) -> List[int]:
    """vLLM's ``prompt_logprobs`` (position 0 None, then ``{token: Logprob}`` holding the prompt's
    token and the top-1) -> the top-1 token predicted for positions 1 .. len-1."""
    return [next(tok for tok, lp in entry.items() if lp.rank == 1) for entry in prompt_logprobs[1:]]


def run_child(spec: dict, log_path: Path, budget: RunBudget, extra_env: dict = None) -> dict:
    """Run :func:`generate` in a child process; returns its record, or one with ``error``."""
    return {"backend": spec["backend"], **run_vllm_child(__file__, spec, log_path, budget, extra_env)}


def token_agreement(ours: list, ref: list) -> float:
    """Fraction of generated positions equal up to each sequence's first difference."""
    same = total = 0
    for a, b in zip(ours, ref, strict=True):
        n = min(len(a["tokens"]), len(b["tokens"]))
        same += _first_difference(a["tokens"], b["tokens"])
        total += n
    return same / max(total, 1)


def _first_difference(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def routed_shape_problems(
    outputs: list, token_prompts: List[List[int]], config: dict, reference: list = None
) -> List[str]:
    """What is wrong with the shape and contents of the returned routed experts (empty: nothing).

    Rows: vLLM documents ``prompt + generated - 1``; where vLLM's own capture (``reference``)
    returned another count for the same request, that count is what ours must match.
    """
    problems = []
    layers, top_k, experts = config["num_hidden_layers"], config["num_experts_per_tok"], config["n_routed_experts"]
    dense = config["first_k_dense_replace"]
    for i, (out, prompt) in enumerate(zip(outputs, token_prompts, strict=True)):
        rows = out["routed_experts"]
        if rows is None:
            problems.append(f"prompt {i}: no routed experts returned")
            continue
        expected = len(prompt) + len(out["tokens"]) - 1
        ref_rows = reference[i]["routed_experts"] if reference is not None else None
        if ref_rows is not None and len(ref_rows) != expected and len(reference[i]["tokens"]) == len(out["tokens"]):
            expected = len(ref_rows)
        if len(rows) != expected:
            problems.append(f"prompt {i}: {len(rows)} rows, expected {expected} (prompt + generated - 1)")
        if any(len(r) != layers or any(len(ids) != top_k for ids in r) for r in rows):
            problems.append(f"prompt {i}: rows are not [{layers}, {top_k}]")
            continue
        if any(any(x != 0 for x in r[layer]) for r in rows for layer in range(dense)):
            problems.append(f"prompt {i}: dense layers have routed experts")
        if any(not 0 <= x < experts for r in rows for layer in range(dense, layers) for x in r[layer]):
            problems.append(f"prompt {i}: expert id out of range")
        if any(len(set(r[layer])) != top_k for r in rows for layer in range(dense, layers)):
            problems.append(f"prompt {i}: repeated expert ids in a row")
    return problems[:8]


def teacher_forced_agreement(top1: List[List[int]], ref: list, token_prompts: List[List[int]]) -> float:
    """Fraction of generated positions where our top-1 (scoring ``prompt + ref tokens``) is ref's token."""
    hits = top1_hits(ref, top1, token_prompts)
    return sum(hits) / max(len(hits), 1)


def _shared_rows(ours: list, ref: list, token_prompts: List[List[int]]):
    """``(prompt index, row, our row, ref's row)`` of every routed row both runs computed on the same
    inputs: row t routes input token t, and inputs agree up to the first differing generated token."""
    for i, (a, b, prompt) in enumerate(zip(ours, ref, token_prompts, strict=True)):
        if a["routed_experts"] is None or b["routed_experts"] is None:
            continue
        shared = len(prompt) + _first_difference(a["tokens"], b["tokens"])
        for t in range(min(shared, len(a["routed_experts"]), len(b["routed_experts"]))):
            yield i, t, a["routed_experts"][t], b["routed_experts"][t]


def capture_agreement(ours: list, ref: list, token_prompts: List[List[int]], moe_layers: List[int]) -> float:
    """Expert sets equal between the two runs over each sequence's shared prefix, in ``moe_layers``."""
    hits = [
        set(a[layer]) == set(b[layer]) for _, _, a, b in _shared_rows(ours, ref, token_prompts) for layer in moe_layers
    ]
    return sum(hits) / max(len(hits), 1)


def capture_mismatches(ours: list, ref: list, token_prompts: List[List[int]], layer: int) -> List[dict]:
    """The (prompt, row) of the shared prefix whose expert sets differ in ``layer`` (at most 8)."""
    return [
        {"prompt": i, "row": t, "in_prompt": t < len(token_prompts[i]), "ours": a[layer], "reference": b[layer]}
        for i, t, a, b in _shared_rows(ours, ref, token_prompts)
        if set(a[layer]) != set(b[layer])
    ][:8]


def recompute(bf16: Path, ckpt: Path, sequences: List[List[int]]) -> "tuple[List[Dict[int, list]], List[List[int]]]":
    """Per sequence: MoE layer index -> ``[len, k]`` expert ids from transformers with our MoE
    layers (float64 around them, our routing), and the float64 dequantized model's top-1 next
    token at every position."""
    import torch

    from moe_backend.cli.accuracy import checkpoint_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    routing: List[Dict[int, list]] = []
    model = checkpoint_model(bf16, ckpt, device, serve=True)
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
    with torch.no_grad():
        for seq in sequences:
            captured.clear()
            model(torch.tensor([seq], device=device))
            routing.append({i: t.tolist() for i, t in captured.items()})
    del model
    exact = checkpoint_model(bf16, ckpt, device, serve=False)
    with torch.no_grad():
        top1 = [exact(torch.tensor([seq], device=device)).logits[0].argmax(-1).tolist() for seq in sequences]
    del exact
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return routing, top1


def top1_hits(outputs: list, top1: List[List[int]], token_prompts: List[List[int]]) -> List[bool]:
    """Per generated position of ``prompt + outputs' tokens``: is the token the top-1 predicted there?
    (``top1[j]`` is the prediction for position j + 1 of the sequence.)"""
    return [
        predicted[len(prompt) + i - 1] == token
        for out, predicted, prompt in zip(outputs, top1, token_prompts, strict=True)
        for i, token in enumerate(out["tokens"])
    ]


def routing_hits(routed: list, recomputed: List[Dict[int, list]], rows: List[int]) -> List[bool]:
    """Per (sequence, MoE layer, token < rows[sequence]): does the expert set match the recomputation?"""
    return [
        set(seq_rows[t][layer]) == set(ids[t])
        for seq_rows, ref, n in zip(routed, recomputed, rows, strict=True)
        for layer, ids in ref.items()
        for t in range(n)
    ]


def paired(ours: List[bool], reference: List[bool]) -> dict:
    """Two hit lists over the same items: each rate, the discordant items and McNemar's z of
    ours minus the reference (about N(0, 1) when both are equally accurate)."""
    n = len(ours)
    diff = sum(ours) - sum(reference)
    discordant = sum(a != b for a, b in zip(ours, reference, strict=True))
    return {
        "moe_backend": sum(ours) / max(n, 1),
        "reference": sum(reference) / max(n, 1),
        "items": n,
        "discordant": discordant,
        "z": diff / discordant**0.5 if discordant else 0.0,
    }


def run_spec(flavour: str, backend: str, ckpts: Dict[str, Path], token_prompts, args, out: Path) -> dict:
    """The :func:`generate` spec of one run of ``flavour``'s checkpoint with ``backend``."""
    return {
        "model": str(ckpts[flavour]),
        "backend": backend,
        "prompts": token_prompts,
        "max_tokens": args.max_tokens,
        "eager": args.eager,
        "out": str(out),
    }


def check_parity(flavour: str, ckpts: Dict[str, Path], token_prompts, args, work: Path, entry: dict, ref: dict) -> bool:
    """Run ours with the flavour's :data:`PARITY_NUMERICS`; its greedy tokens must equal ``ref``'s
    in every sequence (True where the flavour has no such numerics)."""
    numerics = PARITY_NUMERICS.get(flavour)
    if numerics is None:
        return True
    spec = run_spec(flavour, "moe_backend", ckpts, token_prompts, args, work / f"{flavour}-{numerics}.json")
    run = run_child(spec, work / f"{flavour}-{numerics}.log", args.budget, {"MOE_BACKEND_NUMERICS": numerics})
    result = {k: v for k, v in run.items() if k != "outputs"}
    entry[f"{numerics}_numerics"] = result
    if "error" in run:
        return False
    outputs = run["outputs"]
    result["identical_sequences"] = sum(
        a["tokens"] == b["tokens"] for a, b in zip(outputs, ref["outputs"], strict=True)
    )
    result["token_agreement"] = token_agreement(outputs, ref["outputs"])
    result["routed_experts_equal"] = sum(
        a["routed_experts"] == b["routed_experts"] for a, b in zip(outputs, ref["outputs"], strict=True)
    )
    return bool(run["served_by_moe_backend"]) and result["identical_sequences"] == len(token_prompts)


def check_flavour(flavour: str, ckpts: Dict[str, Path], token_prompts, args, work: Path, report: dict, save) -> bool:
    config = json.loads((ckpts[flavour] / "config.json").read_text())
    moe_layers = list(range(config["first_k_dense_replace"], config["num_hidden_layers"]))
    entry: dict = {"reference": REFERENCE_BACKEND[flavour]}
    report["flavours"][flavour] = entry
    runs = {}
    for backend in (REFERENCE_BACKEND[flavour], "moe_backend"):
        spec = run_spec(flavour, backend, ckpts, token_prompts, args, work / f"{flavour}-{backend}.json")
        ref_run = runs.get(REFERENCE_BACKEND[flavour], {})
        if backend == "moe_backend" and "outputs" in ref_run:
            spec["score"] = [p + o["tokens"] for p, o in zip(token_prompts, ref_run["outputs"], strict=True)]
        runs[backend] = run_child(spec, work / f"{flavour}-{backend}.log", args.budget)
        entry[backend] = {
            k: v
            for k, v in runs[backend].items()
            if k not in ("outputs", "teacher_forced_top1", "teacher_forced_routed")
        }
        save()
    ours, ref = runs["moe_backend"], runs[REFERENCE_BACKEND[flavour]]
    if "error" in ours or "error" in ref:
        return False
    entry["served_by_moe_backend"] = bool(ours["served_by_moe_backend"]) and not ref["served_by_moe_backend"]
    entry["teacher_forced_agreement"] = teacher_forced_agreement(
        ours["teacher_forced_top1"], ref["outputs"], token_prompts
    )
    entry["token_agreement"] = token_agreement(ours["outputs"], ref["outputs"])
    entry["first_token_equal"] = sum(
        a["tokens"][:1] == b["tokens"][:1] for a, b in zip(ours["outputs"], ref["outputs"], strict=True)
    )
    entry["identical_sequences"] = sum(
        a["tokens"] == b["tokens"] for a, b in zip(ours["outputs"], ref["outputs"], strict=True)
    )
    entry["routed_shape_problems"] = routed_shape_problems(ours["outputs"], token_prompts, config, ref["outputs"])
    entry["routed_rows"] = [None if o["routed_experts"] is None else len(o["routed_experts"]) for o in ours["outputs"]]
    entry["capture_agreement_by_layer"] = {
        layer: capture_agreement(ours["outputs"], ref["outputs"], token_prompts, [layer]) for layer in moe_layers
    }
    save()
    parity_ok = check_parity(flavour, ckpts, token_prompts, args, work, entry, ref)
    save()
    entry["capture_mismatches"] = capture_mismatches(ours["outputs"], ref["outputs"], token_prompts, moe_layers[0])
    try:
        routing, top1 = recompute(
            ckpts["bf16"], ckpts[flavour], [p + o["tokens"] for p, o in zip(token_prompts, ref["outputs"], strict=True)]
        )
        ours_rows, ref_rows = ours["teacher_forced_routed"], [o["routed_experts"] for o in ref["outputs"]]
        rows = [
            min(len(a or []), len(b or []), len(p) + len(o["tokens"]))
            for a, b, p, o in zip(ours_rows, ref_rows, token_prompts, ref["outputs"], strict=True)
        ]
        entry["routing_agreement"] = paired(
            routing_hits(ours_rows, routing, rows), routing_hits(ref_rows, routing, rows)
        )
        forced = [
            {"tokens": [predicted[len(p) + i - 1] for i in range(len(o["tokens"]))]}
            for predicted, p, o in zip(ours["teacher_forced_top1"], token_prompts, ref["outputs"], strict=True)
        ]
        entry["exact_agreement"] = paired(
            top1_hits(forced, top1, token_prompts), top1_hits(ref["outputs"], top1, token_prompts)
        )
    except Exception as err:  # noqa: BLE001  the vLLM checks above stand on their own
        entry["routing_agreement"] = entry["exact_agreement"] = None
        entry["recompute_error"] = f"{type(err).__name__}: {err}"
    routing, exact = entry["routing_agreement"], entry["exact_agreement"]
    checks = {
        "served": entry["served_by_moe_backend"],
        "routed_shape": not entry["routed_shape_problems"],
        "first_moe_layer_capture": entry["capture_agreement_by_layer"][moe_layers[0]] == 1.0,
        "parity_numerics": parity_ok,
        "recomputed": routing is not None,
    }
    if routing is not None:
        entry["predicted_floor"] = exact["moe_backend"] + exact["reference"] - 1
        checks.update(
            {
                "routing": routing["z"] >= -MAX_WORSE_Z,
                "exact_agreement": exact["z"] >= -MAX_WORSE_Z,
                "teacher_forced": entry["teacher_forced_agreement"] >= entry["predicted_floor"] - SLACK,
            }
        )
    entry["checks"] = checks
    entry["ok"] = all(checks.values())
    save()
    return entry["ok"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="?", help="working directory (checkpoints, run outputs, logs)")
    parser.add_argument("--report", type=Path, help="where to write the JSON report (default WORK/report.json)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--flavours", nargs="+", choices=tuple(REFERENCE_BACKEND), default=list(REFERENCE_BACKEND))
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs either (enforce_eager=True)")
    add_run_options(parser, child_timeout=300, budget_s=540)
    args = parser.parse_args()
    if args.child is not None:
        generate(args.child)
        return 0
    if args.work is None:
        parser.error("WORK_DIR is required")

    # Every run ends 20 s early: time for the routing recomputation and the flavours after it.
    args.budget = RunBudget(args.budget_s, args.child_timeout, reserve_s=20, min_run_s=45)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report_path = args.report or work / "report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "thresholds": {
            "first_moe_layer_capture": 1.0,
            "slack": SLACK,
            "max_worse_z": MAX_WORSE_Z,
            "parity_numerics": PARITY_NUMERICS,
        },
        "settings": {
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "eager": args.eager,
            "graph_sizes": [] if args.eager else GRAPH_SIZES,
            "mla_dims": MLA_DIMS,
        },
        "flavours": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        report_path.write_text(json.dumps(report, indent=2))

    try:
        import torch
        import vllm

        report["versions"] = {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    except Exception as err:  # noqa: BLE001
        report["versions"] = {"error": f"{type(err).__name__}: {err}"}
    ckpts = make_checkpoints(work)
    vocab = json.loads((ckpts["bf16"] / "config.json").read_text())["vocab_size"]
    token_prompts = prompts(args.prompts, vocab)
    ok = True
    for flavour in args.flavours:
        ok &= check_flavour(flavour, ckpts, token_prompts, args, work, report, save)
    report["ok"] = ok
    save()
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
