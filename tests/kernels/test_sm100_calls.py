"""Blackwell kernel calls through the real FlashInfer 0.7.2 on a CPU, down to its native MoE module.

Each call goes through FlashInfer's public function, its validation, op wrapper, runner and tactic
choice, and is stopped where its kernel loader's module would launch (tests/support/flashinfer_cpu.py).
"""

import pytest
import torch

pytest.importorskip("flashinfer")

from flashinfer.tllm_enums import RoutingMethodType  # noqa: E402
from flashinfer_cpu import (  # noqa: E402
    ReachedNative,
    fp4_quantize_torch,
    intercept_native_moe,
    spy_public,
    swizzle_128x4,
)

import moe_backend.layer as layer_module  # noqa: E402
from moe_backend.expert_weights import FP8BlockWeights, FP8TensorWeights, NVFP4Weights  # noqa: E402
from moe_backend.kernels import registry  # noqa: E402
from moe_backend.kernels.registry import LayerContext  # noqa: E402
from moe_backend.kernels.sm100 import layout, moe  # noqa: E402
from moe_backend.layer import LAYER_TYPES, MoEConfig  # noqa: E402
from moe_backend.routing import RoutingConfig  # noqa: E402

E_GLOBAL, E_LOCAL, OFFSET, H, I, K, T = 16, 8, 8, 256, 128, 4, 5
ROUTING = RoutingConfig.deepseek_v3(n_group=4, topk_group=2)
#: Arguments that carry the routing itself: they differ between the routed and computed functions.
ROUTING_KEYS = {"routing_logits", "topk_ids", "routing_bias", "norm_topk_prob", "routing_replay_out"}
#: precision -> (routed function, computed function, native function of each)
FUNCTIONS = {
    "fp8_block": (
        "trtllm_fp8_block_scale_routed_moe",
        "trtllm_fp8_block_scale_moe",
        "trtllm_fp8_block_scale_moe",
        "trtllm_fp8_block_scale_moe",
    ),
    "fp8_tensor": (
        "trtllm_fp8_per_tensor_scale_routed_moe",
        "trtllm_fp8_per_tensor_scale_moe",
        "trtllm_fp8_per_tensor_scale_routed_moe",
        "trtllm_fp8_per_tensor_scale_moe",
    ),
    "nvfp4": (
        "trtllm_fp4_block_scale_routed_moe",
        "trtllm_fp4_block_scale_moe",
        "trtllm_fp4_block_scale_moe",
        "trtllm_fp4_block_scale_moe",
    ),
}
RUNS = {
    "fp8_block": (moe.run_fp8_block, moe.run_computed_fp8_block),
    "fp8_tensor": (moe.run_fp8_tensor, moe.run_computed_fp8_tensor),
    "nvfp4": (moe.run_nvfp4, moe.run_computed_nvfp4),
}


@pytest.fixture
def flashinfer_cpu(monkeypatch):
    """Native module intercepted, public functions spied on, CUDA-only FP4 helpers in pure torch."""
    import flashinfer.fp4_quantization
    import flashinfer.quantization.fp4_quantization as fq

    monkeypatch.setattr(flashinfer.fp4_quantization, "fp4_quantize", fp4_quantize_torch)
    monkeypatch.setattr(fq, "block_scale_interleave", swizzle_128x4)
    return intercept_native_moe(monkeypatch), spy_public(monkeypatch)


def _weights(precision):
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E_LOCAL, 2 * I, H, generator=g) * 0.05, torch.randn(E_LOCAL, H, I, generator=g) * 0.05
    container = {"fp8_block": FP8BlockWeights, "fp8_tensor": FP8TensorWeights, "nvfp4": NVFP4Weights}[precision]
    w = container.quantize(w13, w2)
    if precision == "fp8_tensor":
        w.a13_scale, w.a2_scale = torch.tensor([0.01]), torch.tensor([0.02])
    return w


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E_GLOBAL, generator=g)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K, generator=g)
    logits = torch.randn(T, E_GLOBAL, generator=g)
    return hidden, ids, weights, logits


def _context(routing=ROUTING, max_num_tokens=1024):
    bias = torch.linspace(-0.1, 0.1, E_GLOBAL)
    return LayerContext(E_GLOBAL, K, routing, bias if routing.method == "noaux_tc" else None, max_num_tokens)


def _call(precision, computed, prepared, inputs, context, out, replay=None):
    hidden, ids, weights, logits = inputs
    run, run_computed = RUNS[precision]
    args = (logits,) if computed else (ids, weights)
    with pytest.raises(ReachedNative):
        (run_computed if computed else run)(
            prepared,
            hidden,
            *args,
            local_expert_offset=OFFSET,
            apply_router_weight_on_input=False,
            out=out,
            context=context,
            routing_replay_out=replay,
        )


def _prepared(precision):
    return getattr(layout, f"prepare_{precision}")(_weights(precision))


@pytest.mark.parametrize("precision", sorted(FUNCTIONS))
@pytest.mark.parametrize("computed", [False, True])
def test_each_call_reaches_flashinfer_native_module(precision, computed, flashinfer_cpu, inputs):
    native, public = flashinfer_cpu
    out = torch.empty(T + 3, H, dtype=torch.bfloat16)
    _call(precision, computed, _prepared(precision), inputs, _context(), out)
    routed_fn, computed_fn, routed_native, computed_native = FUNCTIONS[precision]
    assert native[-1][0] == (computed_native if computed else routed_native)
    (kw,) = public[computed_fn if computed else routed_fn]
    assert kw["output"].data_ptr() == out.data_ptr() and kw["output"].shape == (T, H)  # out[:T], no copy
    assert kw["tune_max_num_tokens"] == 1024
    assert kw["routing_method_type"] == int(RoutingMethodType.DeepSeekV3)
    assert (kw["n_group"], kw["topk_group"], kw["routed_scaling_factor"]) == (4, 2, 2.5)
    assert (kw["num_experts"], kw["local_num_experts"], kw["local_expert_offset"]) == (E_GLOBAL, E_LOCAL, OFFSET)
    assert (kw["top_k"], kw["intermediate_size"], kw["do_finalize"]) == (K, I, True)
    if computed:
        assert kw["routing_logits"] is inputs[3] and kw["routing_bias"] is not None and kw["norm_topk_prob"]
    else:
        assert kw["topk_ids"][0] is inputs[1] and kw["topk_ids"][1] is inputs[2] and kw["routing_bias"] is None


def _same(a, b) -> bool:
    """Equal values; tensors byte for byte (NaN patterns of an unwritten buffer included)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return a == b


@pytest.mark.parametrize("precision", sorted(FUNCTIONS))
def test_routed_and_computed_share_every_other_argument(precision, flashinfer_cpu, inputs):
    _, public = flashinfer_cpu
    prepared, context = _prepared(precision), _context()
    out = torch.empty(T, H, dtype=torch.bfloat16)
    for computed in (False, True):
        _call(precision, computed, prepared, inputs, context, out)
    routed_fn, computed_fn = FUNCTIONS[precision][:2]
    (routed,), (computed,) = public[routed_fn], public[computed_fn]
    shared_keys = set(routed) - ROUTING_KEYS
    assert shared_keys == set(computed) - ROUTING_KEYS
    for key in shared_keys:
        assert _same(routed[key], computed[key]), key


@pytest.mark.parametrize("precision", sorted(FUNCTIONS))
def test_routing_replay_passed_or_written(precision, flashinfer_cpu, inputs):
    _, public = flashinfer_cpu
    prepared, context = _prepared(precision), _context()
    out = torch.empty(T, H, dtype=torch.bfloat16)
    replay = torch.full((T + 2, K), -7, dtype=torch.int16)
    _call(precision, True, prepared, inputs, context, out, replay)
    assert public[FUNCTIONS[precision][1]][0]["routing_replay_out"] is replay  # FlashInfer routes and records
    assert (replay == -7).all()
    _call(precision, False, prepared, inputs, context, out, replay)
    routed = public[FUNCTIONS[precision][0]][0]
    if precision == "fp8_tensor":
        assert routed["routing_replay_out"] is replay and (replay == -7).all()
    else:  # FlashInfer's routed FP8 block / FP4 functions take no replay buffer: we wrote it
        assert "routing_replay_out" not in routed
        assert torch.equal(replay[:T], inputs[1].short()) and (replay[T:] == -7).all()


def test_flashinfer_validation_is_live(flashinfer_cpu, inputs):
    """A replay buffer narrower than top-k gets past nothing: FlashInfer's own check refuses it."""
    native, _ = flashinfer_cpu
    with pytest.raises(ValueError, match="routing_replay_out dim1 must equal top_k"):
        moe.run_computed_fp8_block(
            _prepared("fp8_block"),
            inputs[0],
            inputs[3],
            local_expert_offset=OFFSET,
            apply_router_weight_on_input=False,
            out=torch.empty(T, H, dtype=torch.bfloat16),
            context=_context(),
            routing_replay_out=torch.zeros(T, K - 1, dtype=torch.int16),
        )
    assert not native


@pytest.mark.parametrize(
    "routing, defect",
    [
        (RoutingConfig("renormalize"), "noaux_tc"),
        (RoutingConfig.deepseek_v3(n_group=4, topk_group=4), None),
    ],
)
def test_routing_method_follows_the_layer(routing, defect, flashinfer_cpu, inputs):
    _, public = flashinfer_cpu
    context = _context(routing)
    reason = moe.computed_routing_defect(context)
    assert (reason is None) if defect is None else (defect in reason)
    _call("fp8_block", False, _prepared("fp8_block"), inputs, context, torch.empty(T, H, dtype=torch.bfloat16))
    kw = public["trtllm_fp8_block_scale_routed_moe"][0]
    if defect is None:
        assert kw["routing_method_type"] == int(RoutingMethodType.DeepSeekV3) and kw["topk_group"] == 4
    else:  # routed by the layer; FlashInfer only takes the top-k
        assert kw["routing_method_type"] == int(RoutingMethodType.TopK) and kw["n_group"] is None


def test_deepseek_v3_launcher_limits():
    assert "top_k <= 8" in moe.computed_routing_defect(LayerContext(256, 9, RoutingConfig.deepseek_v3(), None))
    assert "topk_group <= 4" in moe.computed_routing_defect(
        LayerContext(256, 8, RoutingConfig.deepseek_v3(n_group=8, topk_group=5), None)
    )
    assert moe.computed_routing_defect(LayerContext(256, 8, RoutingConfig.deepseek_v3(), None)) is None


@pytest.mark.parametrize("precision", sorted(FUNCTIONS))
def test_no_tokens_calls_nothing(precision, flashinfer_cpu):
    native, _ = flashinfer_cpu
    run, run_computed = RUNS[precision]
    hidden, out = torch.empty(0, H, dtype=torch.bfloat16), torch.empty(4, H, dtype=torch.bfloat16)
    kw = dict(local_expert_offset=OFFSET, apply_router_weight_on_input=False, out=out, context=_context())
    prepared = _prepared(precision)
    assert run(prepared, hidden, torch.empty(0, K, dtype=torch.int32), torch.empty(0, K), **kw).shape == (0, H)
    assert run_computed(prepared, hidden, torch.empty(0, E_GLOBAL), **kw).shape == (0, H)
    assert not native


# -- through the layer -------------------------------------------------------------------------------
@pytest.fixture
def blackwell_layer(monkeypatch, flashinfer_cpu):
    """A real layer whose table lookup lands on the sm100 kernel (this CPU is no Blackwell GPU)."""

    def make(precision):
        kernel = registry.KERNELS[f"sm100_flashinfer_{precision}"]
        monkeypatch.setattr(layer_module, "select_kernel", lambda *a, **kw: kernel)
        cfg = MoEConfig(E_GLOBAL, K, ROUTING, local_expert_offset=OFFSET)
        return LAYER_TYPES[precision](_weights(precision), cfg, correction_bias=torch.linspace(-0.1, 0.1, E_GLOBAL))

    return make


@pytest.mark.parametrize("precision", sorted(FUNCTIONS))
def test_layer_dispatches_both_entry_points(precision, blackwell_layer, flashinfer_cpu, inputs):
    native, public = flashinfer_cpu
    layer = blackwell_layer(precision)
    hidden, ids, weights, logits = inputs
    restored = layer.weights  # rebuilt from the kernel layout: the layer keeps no canonical copy
    assert type(restored) is type(_weights(precision))
    for name, t in _weights(precision).tensors().items():
        assert _same(t, getattr(restored, name)), name
    out, replay = torch.empty(T + 1, H, dtype=torch.bfloat16), torch.full((T, K), -7, dtype=torch.int16)
    with pytest.raises(ReachedNative):
        layer.forward(hidden, logits, routing_replay_out=replay, out=out)
    (kw,) = public[FUNCTIONS[precision][1]]
    assert kw["routing_logits"] is logits and kw["routing_bias"] is layer.correction_bias
    assert kw["routing_replay_out"] is replay and kw["output"].data_ptr() == out.data_ptr()
    with pytest.raises(ReachedNative):
        layer.forward_routed(hidden, (ids, weights), routing_replay_out=replay)
    (kw,) = public[FUNCTIONS[precision][0]]
    assert kw["topk_ids"][0] is ids and kw["local_expert_offset"] == OFFSET
    with pytest.raises(ReachedNative):
        layer.experts(hidden, ids, weights)
    assert len(public[FUNCTIONS[precision][0]]) == 2


def test_layer_warmup_checks_readiness_first(blackwell_layer, flashinfer_cpu, monkeypatch, tmp_path):
    from flashinfer.jit import env as jit_env

    from moe_backend.kernels.sm100.readiness import FlashInferNotReadyError

    native, _ = flashinfer_cpu
    layer = blackwell_layer("fp8_block")
    monkeypatch.setattr(jit_env, "FLASHINFER_CUBIN_DIR", tmp_path)
    monkeypatch.setenv("FLASHINFER_NO_DOWNLOAD", "1")
    with pytest.raises(FlashInferNotReadyError, match="flashinfer-cubin"):
        layer.warmup(64, progress=False)
    assert not native


def test_layer_warmup_tunes_for_the_engine_max_tokens(blackwell_layer, flashinfer_cpu, monkeypatch):
    native, public = flashinfer_cpu
    layer = blackwell_layer("fp8_block")
    import contextlib

    import flashinfer.autotuner

    monkeypatch.setattr(moe, "check_flashinfer_ready", lambda: None)  # readiness has its own tests
    # FlashInfer's profiling times kernels on a GPU; here its tactic choice runs untuned.
    monkeypatch.setattr(flashinfer.autotuner, "autotune", lambda tune_mode=True: contextlib.nullcontext())
    with pytest.raises(ReachedNative):
        layer.warmup(96, progress=False)
    (kw,) = public["trtllm_fp8_block_scale_routed_moe"]
    assert kw["tune_max_num_tokens"] == 96 and kw["hidden_states"].shape == (96, H)
    with pytest.raises(ReachedNative):
        layer.forward_routed(*inputs_for_layer())
    assert public["trtllm_fp8_block_scale_routed_moe"][1]["tune_max_num_tokens"] == 96


def inputs_for_layer():
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E_GLOBAL, generator=g)[:K] for _ in range(2)]).int()
    return torch.randn(2, H, generator=g).bfloat16(), (ids, torch.rand(2, K, generator=g))
