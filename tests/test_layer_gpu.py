"""The layer on a GPU: CUDA-graph capture and replay, memory on drop, repeated random batch sizes."""

import gc

import pytest
import torch

from moe_backend import LAYER_TYPES, MoEConfig, RoutingConfig, pack_topk
from moe_backend.runtime.buffers import DEFAULT_POOL

pytestmark = pytest.mark.gpu

E, H, I, K = 32, 1024, 256, 8


def _layer(precision, **kw):
    cfg = MoEConfig(num_experts=E, top_k=K, routing=RoutingConfig.deepseek_v3(8, 4, 2.5))
    return LAYER_TYPES[precision].from_float(
        torch.randn(E, 2 * I, H, device="cuda") / H**0.5,
        torch.randn(E, H, I, device="cuda") / I**0.5,
        cfg,
        correction_bias=0.1 * torch.randn(E, device="cuda"),
        **kw,
    )


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("precision", ["fp8_block", "fp8_tensor", "nvfp4"])
@pytest.mark.parametrize("entry", ["forward", "forward_routed"])
@pytest.mark.parametrize("t", [1, 16, 256])
def test_graph_replay_with_fresh_inputs_equals_eager_and_allocates_nothing(precision, entry, t):
    layer = _layer(precision)
    max_rows = 300
    hidden = torch.empty(t, H, dtype=torch.bfloat16, device="cuda")
    logits = torch.empty(t, E, device="cuda")
    packed = torch.empty(t, K, dtype=torch.int32, device="cuda")
    replay = torch.full((max_rows, K), -7, dtype=torch.int16, device="cuda")
    out = torch.empty(max_rows, H, dtype=torch.bfloat16, device="cuda")

    def fill():
        hidden.copy_(torch.randn(t, H, device="cuda"))
        logits.copy_(torch.randn(t, E, device="cuda"))
        ids, w = layer.config.routing.select(logits, K, layer.correction_bias)
        packed.copy_(pack_topk(ids, w))

    def call():
        if entry == "forward":
            return layer.forward(hidden, logits, routing_replay_out=replay, out=out)
        return layer.forward_routed(hidden, packed, routing_replay_out=replay, out=out)

    fill()
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        fill()
        torch.cuda.synchronize()
        allocs = torch.cuda.memory_stats()["allocation.all.allocated"]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocs
        got, got_replay = out[:t].clone(), replay.clone()
        want = call().clone()  # eager on the same inputs
        assert _rel(got, want) < 1e-3  # atomics may reorder fp32 sums, nothing more
        assert torch.equal(got_replay, replay) and bool((replay[t:] == -7).all())
        ids, _ = layer.config.routing.select(logits, K, layer.correction_bias)
        assert torch.equal(replay[:t].int(), ids)


@pytest.mark.parametrize("precision", ["fp8_block", "nvfp4"])
def test_random_batch_sizes_match_the_full_batch(precision):
    """Thousands of calls at random T: stale accumulator rows from a larger call would show.

    Each size repeats its first result (1e-3); against the full batch the bound is the kernels'
    1e-2, because small T runs the swap-AB path, which rounds the e4m3 intermediate from fp32
    where the aligned path of the full batch rounds it from bf16 (a stale row costs O(1)).
    """
    layer = _layer(precision)
    hidden = torch.randn(64, H, device="cuda").to(torch.bfloat16)
    logits = torch.randn(64, E, device="cuda")
    ids, w = layer.config.routing.select(logits, K, layer.correction_bias)
    full = layer.experts(hidden, ids, w).clone()
    gen = torch.Generator().manual_seed(0)
    first: dict = {}
    worst_repeat = worst_full = 0.0
    for _ in range(2000):
        t = int(torch.randint(1, 65, (1,), generator=gen))
        got = layer.experts(hidden[:t], ids[:t].contiguous(), w[:t].contiguous())
        worst_repeat = max(worst_repeat, _rel(got, first.setdefault(t, got.clone())))
        worst_full = max(worst_full, _rel(got, full[:t]))
    assert worst_repeat < 1e-3
    assert worst_full < 1e-2


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    layer = _layer("fp8_block", deterministic=True)
    hidden = torch.randn(200, H, device="cuda").to(torch.bfloat16)
    logits = torch.randn(200, E, device="cuda")
    full = layer.forward(hidden, logits)
    for _ in range(5):
        assert torch.equal(layer.forward(hidden, logits), full)
    for rows in (slice(0, 1), slice(7, 40), slice(100, 200)):
        assert torch.equal(layer.forward(hidden[rows].contiguous(), logits[rows].contiguous()), full[rows])


@pytest.mark.parametrize("precision", ["fp8_block", "nvfp4"])
def test_dropping_a_layer_returns_its_memory_with_gc_disabled(precision, tmp_path):
    from moe_backend.tuning import TuningCache

    torch.cuda.synchronize()
    gc.collect()
    gc.disable()
    try:
        before = torch.cuda.memory_allocated()
        pool_before = DEFAULT_POOL.nbytes()
        layer = _layer(precision)
        layer.warmup(8, cache=TuningCache(tmp_path), progress=False)
        out = layer.forward(torch.randn(4, H, device="cuda").to(torch.bfloat16), torch.randn(4, E, device="cuda"))
        assert torch.cuda.memory_allocated() > before + E * 3 * H * I // 2
        del out, layer
        torch.cuda.synchronize()
        # The shared workspace pool serves every layer and outlives each one by design.
        pool_growth = DEFAULT_POOL.nbytes() - pool_before
        assert torch.cuda.memory_allocated() - before - pool_growth < 1 << 20
    finally:
        gc.enable()
