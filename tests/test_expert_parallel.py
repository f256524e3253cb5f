"""Expert parallelism with two ranks simulated in one process.

Each rank holds one contiguous half of a layer's experts (``local_expert_offset`` 0 and E/2, the
same quantized bytes as the single-rank layer: vLLM's ranks load their slice of the checkpoint)
and runs on every token with the global top-k, -1 and the other rank's ids included. vLLM sums
the ranks' outputs (all-reduce); that sum must equal the single-rank layer's output up to the
bf16 rounding of each rank's output, tokens served by one rank alone must come out of it as from
the single rank and as exact zeros from the other, and each rank's routing replay must equal
the single rank's.
"""

import dataclasses

import pytest
import torch

from moe_backend import LAYER_TYPES, MoEConfig, MoELayer, RoutingConfig

E, K, H, I = 16, 4, 128, 128
HALF = E // 2
#: bf16's unit roundoff: each rank's output and the single-rank output are rounded once to bf16.
BF16_U = 2.0**-8
#: The kernels the selection table serves each precision with on Hopper (CPU: Triton's interpreter).
TRITON_KERNELS = {"fp8_block": "sm90_triton_fp8", "fp8_tensor": "sm90_triton_fp8"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Tokens of the kernel tests: enough for tokens served by rank 0 alone, rank 1 alone and both.
T_KERNEL = 12


def _config(offset: int) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=K, routing=RoutingConfig.deepseek_v3(4, 2, 2.5), local_expert_offset=offset)


def _rank_layers(precision: str, kernel: str, device: str, **options):
    """The single-rank layer (all E experts) and the two ranks' layers over its halves of the same weights."""
    torch.manual_seed(0)
    cls = LAYER_TYPES[precision]
    bias = (0.1 * torch.randn(E)).to(device)
    full = cls.from_float(
        (torch.randn(E, 2 * I, H) / 16).to(device),
        (torch.randn(E, H, I) / 11).to(device),
        _config(0),
        correction_bias=bias,
        kernel=kernel,
        **options,
    )
    weights = full.weights

    def part(lo: int, hi: int):
        return dataclasses.replace(
            weights, **{name: t[lo:hi] for name, t in weights.tensors().items() if t.dim() and t.shape[0] == E}
        )

    ranks = [cls(part(lo, lo + HALF), _config(lo), correction_bias=bias, kernel=kernel, **options) for lo in (0, HALF)]
    return full, ranks


def _inputs(t: int, device: str, layer: MoELayer):
    """``hidden [T, H]`` bf16, ``logits [T, E]`` fp32, and the layer's global top-k with some slots -1."""
    hidden = torch.randn(t, H).to(device, torch.bfloat16)
    logits = torch.randn(t, E).to(device)
    ids, weights = layer.config.routing.select(logits, K, layer.correction_bias)
    ids = ids.clone()
    ids[::3, -1] = -1  # a slot the engine masked (e.g. a padded token)
    return hidden, logits, ids, weights


def _owner(ids: torch.Tensor, half: int) -> torch.Tensor:
    """Per token: 0 or 1 when every valid id lies on that rank (rank 1 from ``half``), -1 when both serve it."""
    on0 = ((ids < half) & (ids >= 0)).any(1)
    on1 = (ids >= half).any(1)
    return torch.where(on0 & ~on1, 0, torch.where(on1 & ~on0, 1, -1))


def _assert_sum(outs, full_out) -> None:
    """The ranks' outputs add up to the single rank's, element by element within the bf16 rounding of
    the three outputs (the ranks' fp32 partial sums are the single rank's, split)."""
    r0, r1, full = (x.double() for x in (*outs, full_out))
    bound = 2 * BF16_U * (r0.abs() + r1.abs() + full.abs()) + 1e-30
    assert bool(((r0 + r1 - full).abs() <= bound).all()), float(((r0 + r1 - full).abs() / bound).max())


def _check_sum(outs, full_out, ids, exact_single_rank: bool, half: int = HALF) -> None:
    """:func:`_assert_sum`; a rank contributes exact zeros where it owns none of a token's experts,
    and (``exact_single_rank``) where it owns all of them its rows are the single rank's bit for bit."""
    _assert_sum(outs, full_out)
    owner = _owner(ids, half)
    for rank in (0, 1):
        mine, other = owner == rank, owner == 1 - rank
        assert bool((outs[rank][other] == 0).all()), f"rank {rank} wrote tokens it serves none of"
        if exact_single_rank:
            assert torch.equal(outs[rank][mine], full_out[mine])
    assert bool((owner == -1).any() and (owner == 0).any() and (owner == 1).any()), "the draw lacks a case"


@pytest.mark.parametrize("t", [0, 1, 37])
@pytest.mark.parametrize("precision", list(LAYER_TYPES))
def test_two_ranks_sum_to_the_single_rank_reference(precision, t):
    full, ranks = _rank_layers(precision, "reference", "cpu")
    hidden, logits, ids, weights = _inputs(t, "cpu", full)
    outs = [r.forward_routed(hidden, (ids, weights)) for r in ranks]
    want = full.forward_routed(hidden, (ids, weights))
    assert all(o.shape == (t, H) for o in outs)
    if t < 30:  # too few tokens to hold all three owner cases
        _assert_sum(outs, want)
        return
    _check_sum(outs, want, ids, exact_single_rank=True)
    # the engine-level entry point (vLLM's apply) is the same computation
    assert all(torch.equal(r.experts(hidden, ids, weights), o) for r, o in zip(ranks, outs, strict=True))


@pytest.mark.parametrize("precision", list(LAYER_TYPES))
def test_each_rank_replays_the_single_ranks_routing(precision):
    """Every rank routes all tokens over the global experts; the replay holds global ids."""
    full, ranks = _rank_layers(precision, "reference", "cpu")
    hidden, logits, _, _ = _inputs(37, "cpu", full)
    replays = [torch.full((40, K), -7, dtype=torch.int16) for _ in range(3)]
    want = full.forward(hidden, logits, routing_replay_out=replays[2])
    outs = [r.forward(hidden, logits, routing_replay_out=replay) for r, replay in zip(ranks, replays[:2], strict=True)]
    ids, _ = full.config.routing.select(logits, K, full.correction_bias)
    for replay in replays:
        assert torch.equal(replay[:37].int(), ids) and bool((replay[37:] == -7).all())
    assert int(ids.min()) < HALF <= int(ids.max())  # both ranks are routed to
    _check_sum(outs, want, ids, exact_single_rank=True)


@pytest.mark.parametrize("precision", list(TRITON_KERNELS))
def test_two_ranks_on_the_triton_kernels(precision):
    """The Hopper kernels of each rank (CPU: Triton's interpreter, tiny shapes) against the single-rank
    layer on the same kernel, and each rank against the reference.

    Deterministic (one tiling for every T): otherwise each layer picks its tiles from its own rows per
    expert, and a different fp32 summation order can move the FP8 requantization of GEMM1's output by
    a step, which is a different rounding, not an EP defect.
    """
    pytest.importorskip("triton")
    full, ranks = _rank_layers(precision, TRITON_KERNELS[precision], DEVICE, deterministic=True)
    hidden, logits, ids, weights = _inputs(T_KERNEL, DEVICE, full)
    replays = [torch.empty(T_KERNEL, K, dtype=torch.int16, device=DEVICE) for _ in ranks]
    outs = [
        r.forward_routed(hidden, (ids, weights), routing_replay_out=rep) for r, rep in zip(ranks, replays, strict=True)
    ]
    assert all(torch.equal(rep.int(), ids) for rep in replays)
    _check_sum(outs, full.forward_routed(hidden, (ids, weights)), ids, exact_single_rank=False)
    for rank, out in zip(ranks, outs, strict=True):
        from moe_backend import reference_fused_experts

        ref = reference_fused_experts(
            hidden, rank.weights, ids, weights, local_expert_offset=rank.config.local_expert_offset
        ).double()
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_two_ranks_with_vllm_triton_numerics():
    """``MOE_BACKEND_NUMERICS=vllm_triton`` under EP: the fixed configuration serves each rank."""
    pytest.importorskip("triton")
    full, ranks = _rank_layers("fp8_block", "sm90_triton_fp8", DEVICE, numerics="vllm_triton")
    hidden, _, ids, weights = _inputs(T_KERNEL, DEVICE, full)
    outs = [r.forward_routed(hidden, (ids, weights)) for r in ranks]
    _check_sum(outs, full.forward_routed(hidden, (ids, weights)), ids, exact_single_rank=False)


def test_two_ranks_on_the_nvfp4_kernel():
    """The NVFP4 kernel (no deterministic mode; one small tiling forced, as the interpreter needs)
    on each half of the experts against the whole, and each rank against the reference."""
    pytest.importorskip("triton")
    from moe_backend import NVFP4Weights, reference_fused_experts
    from moe_backend.kernels.sm90.nvfp4_moe import fused_experts_nvfp4, prepare_nvfp4

    e, k, h, i, t = 8, 2, 64, 32, 12
    torch.manual_seed(0)
    weights = NVFP4Weights.quantize(torch.randn(e, 2 * i, h) / 8, torch.randn(e, h, i) / 6)
    weights = NVFP4Weights(**{n: x.to(DEVICE) for n, x in weights.tensors().items()})
    parts = [NVFP4Weights(**{n: x[lo : lo + e // 2] for n, x in weights.tensors().items()}) for lo in (0, e // 2)]
    hidden = torch.randn(t, h).to(DEVICE, torch.bfloat16)
    ids = torch.stack([torch.randperm(e + 1)[:k] - 1 for _ in range(t)]).to(DEVICE, torch.int32)  # -1 included
    topk_w = (torch.rand(t, k) + 0.1).to(DEVICE)
    config = dict(path="decode", BLOCK_M=16, BLOCK_N1=16, BLOCK_N2=32, SPLIT_K2=2)

    def run(w, offset):
        return fused_experts_nvfp4(
            hidden,
            prepare_nvfp4(w),
            ids,
            topk_w,
            local_expert_offset=offset,
            apply_router_weight_on_input=False,
            out=torch.empty_like(hidden),
            config=config,
        )

    outs = [run(w, lo) for w, lo in zip(parts, (0, e // 2), strict=True)]
    _check_sum(outs, run(weights, 0), ids, exact_single_rank=False, half=e // 2)
    for w, lo, out in zip(parts, (0, e // 2), outs, strict=True):
        ref = reference_fused_experts(hidden, w, ids, topk_w, local_expert_offset=lo).double()
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
