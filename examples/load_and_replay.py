"""Load one MoE layer of a DeepSeek-V3 checkpoint, record its routing, replay it.

Routing replay (reinforcement learning): while serving, the computed-routing entry
point records each token's selected experts into ``routing_replay_out``; later the
routed entry point runs the same experts from those ids, with the router weights
recomputed for them (as a trainer's router would), and must give the same output.

    python examples/load_and_replay.py CHECKPOINT_DIR [--layer L] [--tokens T] [--device cuda]

Without a directory it writes the tiny FP8 checkpoint into a temporary one first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from moe_backend.weights.checkpoint import Checkpoint
from moe_backend.weights.checkpoint_maker import make_checkpoints
from moe_backend.weights.loader import build_moe_layer, read_moe_layer


def replay_weights(router_logits: torch.Tensor, ids: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    """DeepSeek-V3 router weights of the given ``ids [T, k]``: the unbiased sigmoid scores,
    renormalized and scaled, in the order the computed routing applies them."""
    scores = torch.sigmoid(router_logits).gather(1, ids.long())
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) * routed_scaling_factor


def run(checkpoint_dir: Path, layer_idx: int, num_tokens: int, device: torch.device) -> bool:
    with Checkpoint(checkpoint_dir) as ckpt:
        layer_idx = ckpt.spec.moe_layers[0] if layer_idx < 0 else layer_idx
        weights = read_moe_layer(ckpt, layer_idx, device=device)
        layer = build_moe_layer(weights, ckpt.spec)
        scaling = ckpt.spec.routed_scaling_factor
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(num_tokens, layer.hidden_size, generator=gen).to(device, torch.bfloat16)
    logits = hidden.float() @ weights.router_weight.float().T  # the router, in fp32
    k = layer.config.top_k
    print(
        f"layer {layer_idx}: {type(layer).__name__}, {weights.experts.num_experts} experts, top-{k}, "
        f"kernels: computed={layer.kernel_name(False)} routed={layer.kernel_name(True)}"
    )

    # serve: computed routing, recording the selected ids
    recorded = torch.full((num_tokens, k), -1, dtype=torch.int16, device=device)
    served = layer.forward(hidden, logits, routing_replay_out=recorded)

    # replay: the recorded ids through the routed entry point (which records them again)
    ids = recorded.to(torch.int32)
    rerecorded = torch.full_like(recorded, -1)
    replayed = layer.forward_routed(hidden, (ids, replay_weights(logits, ids, scaling)), routing_replay_out=rerecorded)

    same_ids = torch.equal(recorded, rerecorded)
    # one kernel serving both entry points gives bitwise equal outputs; two may round differently
    if layer.kernel_name(False) == layer.kernel_name(True):
        same_out = torch.equal(served, replayed)
    else:
        same_out = torch.allclose(served.float(), replayed.float(), rtol=1e-2, atol=1e-2)
    print(
        f"recorded ids [{num_tokens}, {k}] (first token: {recorded[0].tolist()}); "
        f"replayed ids equal: {same_ids}; outputs equal: {same_out} "
        f"(max |diff| {(served.float() - replayed.float()).abs().max().item():.3e})"
    )
    return same_ids and same_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint directory (default: tiny FP8)")
    parser.add_argument("--layer", type=int, default=-1, help="MoE layer index (default: the first)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or make_checkpoints(Path(tmp), flavours=["fp8"])["fp8"]
        return 0 if run(path, args.layer, args.tokens, device) else 1


if __name__ == "__main__":
    raise SystemExit(main())
