"""The Blackwell kernels on a Blackwell GPU against the torch reference (never run yet: docs/blackwell.md).

Skipped everywhere else, Hopper included. On a B200/B300 with FlashInfer ready:
``python -m pytest -q tests/kernels/test_sm100_gpu.py``.
"""

import pytest
import torch

from moe_backend import LAYER_TYPES, MoEConfig, RoutingConfig
from moe_backend.kernels.registry import BLACKWELL


def _on_blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() in BLACKWELL


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _on_blackwell(), reason="needs a Blackwell GPU (sm_100/sm_103)")]

E, H, I, K = 32, 1024, 256, 8
#: Relative L2 error against the reference: FP8 rounds the same inputs; NVFP4 also quantizes
#: activations (W4A4 with a unit global scale) where the reference keeps them bf16.
TOLERANCE = {"fp8_block": 0.03, "fp8_tensor": 0.05, "nvfp4": 0.25}


def _layers(precision):
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g) / I**0.5
    cfg = MoEConfig(num_experts=E, top_k=K, routing=RoutingConfig.deepseek_v3(8, 4, 2.5))
    bias = 0.1 * torch.randn(E, device="cuda", generator=g)
    weights = LAYER_TYPES[precision].weights_type.quantize(w13, w2)
    if precision == "fp8_tensor":  # static activation scales, as a ModelOpt checkpoint has them
        weights.a13_scale = torch.tensor([4.0 / 448], device="cuda")
        weights.a2_scale = torch.tensor([1.0 / 448], device="cuda")
    return [
        LAYER_TYPES[precision](weights, cfg, correction_bias=bias, kernel=k)
        for k in (f"sm100_flashinfer_{precision}", "reference")
    ]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
@pytest.mark.parametrize("t", [1, 37, 256])
def test_both_entry_points_match_the_reference(precision, t):
    layer, reference = _layers(precision)
    layer.warmup(256, progress=False)
    g = torch.Generator(device="cuda").manual_seed(t)
    hidden = torch.randn(t, H, device="cuda", generator=g).bfloat16()
    logits = torch.randn(t, E, device="cuda", generator=g)
    want = reference.forward(hidden, logits)
    ids, weights = layer.config.routing.select(logits, K, layer.correction_bias)
    replay = torch.full((t + 4, K), -7, dtype=torch.int16, device="cuda")
    out = torch.empty(t + 4, H, dtype=torch.bfloat16, device="cuda")
    got = layer.forward(hidden, logits, routing_replay_out=replay, out=out)
    assert got.data_ptr() == out.data_ptr() and _rel(got, want) < TOLERANCE[precision]
    assert torch.equal(replay[:t].sort(-1).values, ids.short().sort(-1).values) and (replay[t:] == -7).all()
    replay.fill_(-7)
    got = layer.forward_routed(hidden, (ids, weights), routing_replay_out=replay)
    assert _rel(got, want) < TOLERANCE[precision]
    assert torch.equal(replay[:t], ids.short()) and (replay[t:] == -7).all()


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_graph_capture_replays_the_eager_result(precision):
    layer, _ = _layers(precision)
    layer.warmup(64, progress=False)
    hidden = torch.randn(16, H, device="cuda").bfloat16()
    logits = torch.randn(16, E, device="cuda")
    out = torch.empty(64, H, dtype=torch.bfloat16, device="cuda")
    eager = layer.forward(hidden, logits).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer.forward(hidden, logits, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[:16], eager)
