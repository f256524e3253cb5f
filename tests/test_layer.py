"""Layer API: both entry points, replay, out buffers, EP, and bad input."""

import dataclasses

import pytest
import torch

from moe_backend import (
    LAYER_TYPES,
    BF16MoE,
    FP8BlockMoE,
    FP8BlockWeights,
    KernelUnavailableError,
    MoEConfig,
    RoutingConfig,
    pack_topk,
    reference_fused_experts,
)

E_GLOBAL, E_LOCAL, H, I, K = 16, 8, 256, 128, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Where the Triton kernels run: the GPU, else the CPU under Triton's interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(cls=BF16MoE, offset=8, device="cpu", check_values=False, correction_bias_value=None, **kw):
    cfg = MoEConfig(
        num_experts=E_GLOBAL,
        top_k=K,
        routing=RoutingConfig.deepseek_v3(4, 2, 2.5),
        local_expert_offset=offset,
        check_values=check_values,
    )
    w13 = torch.randn(E_LOCAL, 2 * I, H) / 16
    w2 = torch.randn(E_LOCAL, H, I) / 11
    bias = 0.1 * torch.randn(E_GLOBAL)
    if correction_bias_value is not None:
        bias[3] = correction_bias_value
    return cls.from_float(w13.to(device), w2.to(device), cfg, correction_bias=bias.to(device), **kw)


def _inputs(t):
    return torch.randn(t, H).to(torch.bfloat16), torch.randn(t, E_GLOBAL)


@pytest.mark.parametrize("precision", list(LAYER_TYPES))
def test_forward_equals_reference_on_selected_routing(precision):
    layer = _layer(LAYER_TYPES[precision])
    hidden, logits = _inputs(9)
    ids, w = layer.config.routing.select(logits, K, layer.correction_bias)
    want = reference_fused_experts(hidden, layer.weights, ids, w, local_expert_offset=8)
    replay = torch.full((12, K), -5, dtype=torch.int16)
    got = layer.forward(hidden, logits, routing_replay_out=replay)
    assert torch.equal(got, want)
    assert replay[:9].tolist() == ids.tolist() and bool((replay[9:] == -5).all())


@pytest.mark.parametrize("t", [0, 1, 5])
def test_routed_packed_and_pair_agree_and_write_replay(t):
    layer = _layer()
    hidden, logits = _inputs(t)
    ids, w = layer.config.routing.select(logits, K, layer.correction_bias)
    w = w.to(torch.bfloat16).float()  # what the packed format carries
    packed = pack_topk(ids, w)
    r1 = torch.full((8, K), -9, dtype=torch.int16)
    r2 = torch.full((8, K), -9, dtype=torch.int16)
    a = layer.forward_routed(hidden, packed, routing_replay_out=r1)
    b = layer.forward_routed(hidden, (ids, w), routing_replay_out=r2)
    assert a.shape == (t, H) and torch.equal(a, b)
    assert torch.equal(r1, r2) and r1[:t].tolist() == ids.tolist() and bool((r1[t:] == -9).all())


def test_out_buffer_only_first_t_rows():
    layer = _layer()
    hidden, logits = _inputs(3)
    out = torch.full((6, H), float("nan"), dtype=torch.bfloat16)
    res = layer.forward(hidden, logits, out=out)
    assert res.data_ptr() == out.data_ptr() and res.shape == (3, H)
    assert not torch.isnan(out[:3].float()).any() and torch.isnan(out[3:].float()).all()


def test_minus_one_and_foreign_ids_contribute_nothing():
    layer = _layer()
    hidden, _ = _inputs(2)
    ids = torch.tensor([[-1, 0, 7, 3], [8, -1, -1, 15]], dtype=torch.int32)  # local experts are [8, 16)
    w = torch.ones(2, K)
    out = layer.experts(hidden, ids, w)
    assert bool((out[0] == 0).all())
    only = layer.experts(hidden, torch.tensor([[8, 15, -1, -1]] * 2, dtype=torch.int32), w)
    assert torch.equal(out[1], only[1])


def test_router_weight_on_input():
    cfg = MoEConfig(num_experts=8, top_k=1, routing=RoutingConfig("sigmoid"), apply_router_weight_on_input=True)
    layer = BF16MoE.from_float(torch.randn(8, 2 * I, H) / 16, torch.randn(8, H, I) / 11, cfg)
    hidden, logits = torch.randn(4, H).to(torch.bfloat16), torch.randn(4, 8)
    ids, w = RoutingConfig("sigmoid").select(logits, 1)
    want = reference_fused_experts(hidden, layer.weights, ids, w, apply_router_weight_on_input=True)
    assert torch.equal(layer(hidden, logits), want)


def test_kernel_names_and_cpu_falls_back_to_reference():
    layer = _layer(FP8BlockMoE)
    assert layer.kernel_name(False) == layer.kernel_name(True) == "reference"
    assert layer.precision == "fp8_block"


def test_explicit_unavailable_kernel_raises():
    with pytest.raises(ValueError, match="kernel: expected 'auto' or one of"):
        _layer(kernel="no_such_kernel")


def test_ue8m0_is_passed_to_weights():
    layer = _layer(FP8BlockMoE, ue8m0=True)
    assert isinstance(layer.weights, FP8BlockWeights) and layer.weights.ue8m0


BAD_CALLS = [
    (lambda l, h, g: l.forward(h.float(), g), "hidden: expected dtype torch.bfloat16"),
    (lambda l, h, g: l.forward(h[:, :100], g), r"hidden: expected shape \(\*, 256\)"),
    (lambda l, h, g: l.forward(torch.randn(H, 3).to(torch.bfloat16).t(), g[:3]), "hidden: expected a contiguous"),
    (lambda l, h, g: l.forward(h, g[:, :8]), r"router_logits: expected shape \(3, 16\)"),
    (lambda l, h, g: l.forward(h, g.half()), "router_logits: expected dtype torch.float32"),
    (
        lambda l, h, g: l.forward(h, g, routing_replay_out=torch.zeros(3, K, dtype=torch.int32)),
        "routing_replay_out: expected dtype torch.int16",
    ),
    (
        lambda l, h, g: l.forward(h, g, routing_replay_out=torch.zeros(2, K, dtype=torch.int16)),
        "routing_replay_out: expected at least 3 rows",
    ),
    (
        lambda l, h, g: l.forward(h, g, routing_replay_out=torch.zeros(3, K + 1, dtype=torch.int16)),
        r"routing_replay_out: expected shape \(\*, 4\)",
    ),
    (lambda l, h, g: l.forward(h, g, out=torch.zeros(2, H, dtype=torch.bfloat16)), "out: expected at least 3 rows"),
    (lambda l, h, g: l.forward(h, g, out=torch.zeros(3, H)), "out: expected dtype torch.bfloat16"),
    (lambda l, h, g: l.forward_routed(h, torch.zeros(3, K)), "topk: expected dtype torch.int32"),
    (lambda l, h, g: l.forward_routed(h, torch.zeros(3, K + 1, dtype=torch.int32)), r"topk: expected shape \(3, 4\)"),
    (lambda l, h, g: l.forward_routed(h, [torch.zeros(3, K, dtype=torch.int32)]), "topk: expected a packed int32"),
    (
        lambda l, h, g: l.forward_routed(h, (torch.zeros(3, K, dtype=torch.int64), torch.zeros(3, K))),
        "topk_ids: expected dtype torch.int32",
    ),
    (
        lambda l, h, g: l.forward_routed(h, (torch.zeros(3, K, dtype=torch.int32), torch.zeros(3, 2))),
        r"topk_weights: expected shape \(3, 4\)",
    ),
    (
        lambda l, h, g: l.experts(h, torch.zeros(2, K, dtype=torch.int32), torch.zeros(2, K)),
        r"topk_ids: expected shape \(3, 4\)",
    ),
]


@pytest.mark.parametrize("call, match", BAD_CALLS)
def test_bad_input(call, match):
    layer = _layer()
    hidden, logits = _inputs(3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(layer, hidden, logits)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MoEConfig(num_experts=4, top_k=5), "top_k: expected at most num_experts"),
        (lambda: MoEConfig(num_experts=4, top_k=0), "top_k: expected an int >= 1"),
        (
            lambda: MoEConfig(num_experts=4, top_k=2, local_expert_offset=-1),
            "local_expert_offset: expected an int >= 0",
        ),
        (lambda: MoEConfig(num_experts=4, top_k=2, routing="noaux_tc"), "routing: expected a RoutingConfig"),
        (lambda: _layer(offset=9), "local_expert_offset: experts \\[9, 17\\) exceed num_experts=16"),
        (
            lambda: BF16MoE(
                FP8BlockWeights.quantize(torch.randn(2, 256, 128), torch.randn(2, 128, 128)),
                MoEConfig(num_experts=2, top_k=1),
            ),
            "weights: expected BF16Weights, got FP8BlockWeights",
        ),
        (
            lambda: BF16MoE.from_float(
                torch.randn(2, 32, 16), torch.randn(2, 16, 16), MoEConfig(2, 1, RoutingConfig.deepseek_v3(1, 1))
            ),
            "correction_bias: expected an fp32",
        ),
        (
            lambda: BF16MoE.from_float(
                torch.randn(2, 32, 16), torch.randn(2, 16, 16), MoEConfig(2, 1), correction_bias=torch.zeros(2)
            ),
            "correction_bias: only noaux_tc",
        ),
        (
            lambda: BF16MoE.from_float(
                torch.randn(2, 32, 16),
                torch.randn(2, 16, 16),
                MoEConfig(2, 1, RoutingConfig.deepseek_v3(1, 1)),
                correction_bias=torch.zeros(3),
            ),
            r"correction_bias: expected shape \(2,\)",
        ),
    ],
)
def test_bad_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_unavailable_kernel_error_names_reason(monkeypatch):
    from moe_backend.kernels import registry

    fake = registry.Kernel("gpu_only", ("bf16",), ((9, 0),), prepare=lambda w: w, run=None)
    monkeypatch.setitem(registry.KERNELS, "gpu_only", fake)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="kernel 'gpu_only' cannot run bf16 on cpu: it needs a CUDA GPU"):
        _layer(kernel="gpu_only")
    with pytest.raises(KernelUnavailableError, match="it supports bf16, not fp8_block"):
        _layer(FP8BlockMoE, kernel="gpu_only")


@pytest.mark.parametrize(
    "precision, kernel",
    [("fp8_block", "sm90_triton_fp8"), ("fp8_tensor", "sm90_triton_fp8"), ("nvfp4", "sm90_triton_nvfp4")],
)
def test_triton_kernels_through_the_layer(precision, kernel):
    """The selection table's Triton kernels behind both entry points (CPU: Triton's interpreter)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = MoEConfig(num_experts=E_GLOBAL, top_k=K, routing=RoutingConfig.deepseek_v3(4, 2, 2.5), local_expert_offset=8)
    layer = LAYER_TYPES[precision].from_float(
        (torch.randn(E_LOCAL, 2 * I, H) / 16).to(device),
        (torch.randn(E_LOCAL, H, I) / 11).to(device),
        cfg,
        correction_bias=(0.1 * torch.randn(E_GLOBAL)).to(device),
        kernel=kernel,
    )
    assert layer.kernel_name(False) == layer.kernel_name(True) == kernel
    hidden, logits = (x.to(device) for x in _inputs(7))
    replay = torch.full((9, K), -3, dtype=torch.int16, device=device)
    out = torch.full((9, H), float("nan"), dtype=torch.bfloat16, device=device)
    got = layer.forward(hidden, logits, routing_replay_out=replay, out=out)
    ids, w = layer.config.routing.select(logits, K, layer.correction_bias)
    want = reference_fused_experts(hidden, layer.weights, ids, w, local_expert_offset=8).double()
    assert float((got.double() - want).norm() / want.norm()) < 1e-2
    assert torch.isnan(out[7:].float()).all() and replay[:7].tolist() == ids.tolist()
    routed = layer.forward_routed(hidden, (ids, w))
    assert float((routed.double() - want).norm() / want.norm()) < 1e-2


def test_warmup_on_cpu_tunes_nothing(tmp_path):
    from moe_backend.tuning import TuningCache

    layer = _layer(FP8BlockMoE)
    assert layer.warmup(64, cache=TuningCache(tmp_path)) == {}
    with pytest.raises(ValueError, match="max_num_tokens: expected an int >= 1"):
        layer.warmup(0)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8_block", "nvfp4"])
def test_warmup_tunes_buckets_and_forward_uses_them(tmp_path, monkeypatch, precision):
    from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe
    from moe_backend.tuning import TuningCache

    cfg = MoEConfig(num_experts=E_GLOBAL, top_k=K, routing=RoutingConfig.deepseek_v3(4, 2, 2.5))
    layer = LAYER_TYPES[precision].from_float(
        torch.randn(E_GLOBAL, 2 * I, H, device="cuda") / 16,
        torch.randn(E_GLOBAL, H, I, device="cuda") / 11,
        cfg,
        correction_bias=torch.zeros(E_GLOBAL, device="cuda"),
    )
    results = layer.warmup(24, cache=TuningCache(tmp_path), progress=False)
    (result,) = results.values()
    assert sorted(result.entries) == [1, 2, 4, 8, 16, 24]
    hidden, logits = (x.cuda() for x in _inputs(20))
    ids, w = cfg.routing.select(logits, K, layer.correction_bias)
    want = reference_fused_experts(hidden, layer.weights, ids, w).double()
    got = layer.forward(hidden, logits)
    assert float((got.double() - want).norm() / want.norm()) < 1e-2
    again = LAYER_TYPES[precision](layer.weights, cfg, correction_bias=layer.correction_bias)
    (cached,) = again.warmup(24, cache=TuningCache(tmp_path), progress=False).values()
    assert sorted(cached.cached) == [1, 2, 4, 8, 16, 24]  # read from the cache, nothing re-timed
    launcher = fp8_moe if precision == "fp8_block" else nvfp4_moe
    monkeypatch.setattr(launcher, "KERNEL_VERSION", launcher.KERNEL_VERSION + 1)
    bumped = LAYER_TYPES[precision](layer.weights, cfg, correction_bias=layer.correction_bias)
    (retuned,) = bumped.warmup(24, cache=TuningCache(tmp_path), progress=False).values()
    assert retuned.cached == frozenset()  # a new kernel version trusts none of the old configurations


def test_deterministic_mode_needs_a_kernel_that_has_it():
    with pytest.raises(ValueError, match="deterministic: kernel 'reference'"):
        _layer(FP8BlockMoE, kernel="reference", deterministic=True)
    with pytest.raises(ValueError, match="deterministic: kernel 'sm90_triton_nvfp4'"):
        _layer(LAYER_TYPES["nvfp4"], kernel="sm90_triton_nvfp4", device=KERNEL_DEVICE, deterministic=True)


def test_numerics_are_checked_at_construction():
    with pytest.raises(ValueError, match="numerics: expected one of"):
        _layer(FP8BlockMoE, numerics="vllm")
    with pytest.raises(ValueError, match="'vllm_triton' is available for fp8_block weights, got nvfp4"):
        _layer(LAYER_TYPES["nvfp4"], numerics="vllm_triton")
    with pytest.raises(ValueError, match="not ue8m0"):
        _layer(FP8BlockMoE, kernel="sm90_triton_fp8", device=KERNEL_DEVICE, numerics="vllm_triton", ue8m0=True)
    with pytest.raises(ValueError, match="numerics: 'vllm_triton': kernel 'reference'"):
        _layer(FP8BlockMoE, kernel="reference", numerics="vllm_triton")


def test_vllm_triton_numerics_fp8_layer_uses_its_fixed_configuration():
    """The layer runs the kernel's ``vllm_triton`` configuration for every T; under the interpreter
    that equals the float64 model of vLLM's steps (on a GPU, scripts/vllm_layer_compare.py
    checks it against vLLM itself)."""
    pytest.importorskip("triton")
    from vllm_numerics import vllm_triton_fused_experts

    from moe_backend.kernels.sm90 import fused_experts_fp8
    from moe_backend.kernels.sm90.fp8_moe import NUMERICS_CONFIGS

    cfg = MoEConfig(num_experts=E_LOCAL, top_k=2, routing=RoutingConfig("softmax"))
    w13, w2 = torch.randn(E_LOCAL, 2 * I, H) / 16, torch.randn(E_LOCAL, H, I) / 11
    layer = FP8BlockMoE.from_float(
        w13.to(KERNEL_DEVICE), w2.to(KERNEL_DEVICE), cfg, kernel="sm90_triton_fp8", numerics="vllm_triton"
    )
    assert layer.numerics == "vllm_triton"
    hidden = torch.randn(5, H).to(KERNEL_DEVICE, torch.bfloat16)
    logits = torch.randn(5, E_LOCAL).to(KERNEL_DEVICE)
    replay = torch.empty(5, 2, dtype=torch.int16, device=KERNEL_DEVICE)
    got = layer.forward(hidden, logits, routing_replay_out=replay)
    ids, weights = cfg.routing.select(logits, 2, None)
    assert torch.equal(replay.int(), ids)
    w = layer.weights
    direct = fused_experts_fp8(
        hidden,
        w.w13,
        w.w13_scale,
        w.w2,
        w.w2_scale,
        ids,
        weights,
        block_scaled=True,
        local_expert_offset=0,
        a13_scale=None,
        a2_scale=None,
        ue8m0=False,
        apply_router_weight_on_input=False,
        out=torch.empty_like(hidden),
        config=NUMERICS_CONFIGS["vllm_triton"],
    )
    assert torch.equal(got, direct)
    if KERNEL_DEVICE == "cpu":
        assert torch.equal(got, vllm_triton_fused_experts(hidden, w, ids, weights))


def test_deterministic_fp8_is_batch_invariant():
    """A token's output bits do not depend on the batch around it (CPU: Triton's interpreter)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = MoEConfig(num_experts=E_LOCAL, top_k=2, routing=RoutingConfig("softmax"))
    layer = FP8BlockMoE.from_float(
        (torch.randn(E_LOCAL, 2 * I, H) / 16).to(device),
        (torch.randn(E_LOCAL, H, I) / 11).to(device),
        cfg,
        kernel="sm90_triton_fp8",
        deterministic=True,
    )
    hidden, logits = torch.randn(12, H).to(device, torch.bfloat16), torch.randn(12, E_LOCAL).to(device)
    full = layer.forward(hidden, logits)
    assert torch.equal(full, layer.forward(hidden, logits))
    for rows in (slice(0, 1), slice(3, 8), slice(5, 12)):
        assert torch.equal(layer.forward(hidden[rows].contiguous(), logits[rows].contiguous()), full[rows])
    perm = torch.randperm(12, device=device)
    assert torch.equal(layer.forward(hidden[perm].contiguous(), logits[perm].contiguous()), full[perm])


# -- issue 17: config types, pair ids, out aliasing, the opt-in value checks ---------------------------
@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: MoEConfig(4, 2, apply_router_weight_on_input="no"),
            TypeError,
            "apply_router_weight_on_input: expected a bool, got str 'no'",
        ),
        (lambda: MoEConfig(4, 2, check_values=1), TypeError, "check_values: expected a bool"),
        (lambda: MoEConfig(4, 2.0), TypeError, "top_k: expected an int"),
        (lambda: MoEConfig("4", 2), TypeError, "num_experts: expected an int"),
        (lambda: MoEConfig(40000, 8), ValueError, "num_experts: expected at most 32768"),
        (lambda: _layer(kernel=None), TypeError, "kernel: expected a str"),
        (lambda: _layer(kernel=["reference"]), TypeError, "kernel: expected a str"),
        (lambda: _layer(deterministic="no"), TypeError, "deterministic: expected a bool"),
        (lambda: _layer(numerics=None), TypeError, "numerics: expected a str"),
        (
            lambda: _layer(correction_bias_value=float("nan")),
            ValueError,
            r"correction_bias: expected finite values, got nan at index \[3\]",
        ),
        (
            lambda: _layer(correction_bias_value=float("-inf")),
            ValueError,
            r"correction_bias: .* got -inf at index \[3\]",
        ),
    ],
)
def test_bad_configuration_values_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_check_values_env_sets_the_default(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND_CHECK_VALUES", "1")
    assert MoEConfig(4, 2).check_values is True
    monkeypatch.setenv("MOE_BACKEND_CHECK_VALUES", "0")
    assert MoEConfig(4, 2).check_values is False
    monkeypatch.setenv("MOE_BACKEND_CHECK_VALUES", "yes")
    with pytest.raises(ValueError, match="MOE_BACKEND_CHECK_VALUES: expected '0' or '1', got 'yes'"):
        MoEConfig(4, 2)


@pytest.mark.parametrize("bad", [[[40008, 9, 10, 11]], [[8, 9, -2, 11]], [[32768, -1, -1, -1]]])
def test_pair_ids_outside_the_packed_range_are_refused_and_nothing_is_recorded(bad):
    layer = _layer()
    hidden, _ = _inputs(1)
    replay = torch.full((2, K), -7, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"topk_ids: expected expert ids in \[-1, 32768\)"):
        layer.forward_routed(
            hidden, (torch.tensor(bad, dtype=torch.int32), torch.ones(1, K)), routing_replay_out=replay
        )
    assert bool((replay == -7).all())


def test_pair_ids_at_the_packed_limits_are_recorded_exactly():
    layer = _layer()
    hidden, _ = _inputs(1)
    ids = torch.tensor([[32767, -1, 8, 15]], dtype=torch.int32)
    replay = torch.zeros(1, K, dtype=torch.int16)
    out = layer.forward_routed(hidden, (ids, torch.ones(1, K)), routing_replay_out=replay)
    assert replay.tolist() == ids.tolist() and out.shape == (1, H)


@pytest.mark.parametrize(
    "call",
    [
        lambda l, h, g, buf: l.forward(buf[:3], g, out=buf),
        lambda l, h, g, buf: l.forward_routed(buf[1:4], l.config.routing.select(g, K, l.correction_bias), out=buf),
        lambda l, h, g, buf: l.experts(buf[2:5], *l.config.routing.select(g, K, l.correction_bias), out=buf),
    ],
)
def test_out_sharing_memory_with_hidden_is_refused(call):
    layer = _layer()
    _, logits = _inputs(3)
    buf = torch.randn(6, H).to(torch.bfloat16)
    with pytest.raises(ValueError, match="out: expected a buffer that does not overlap hidden"):
        call(layer, None, logits, buf)


def test_out_rows_beyond_the_tokens_may_hold_the_hidden_states():
    layer = _layer()
    hidden, logits = _inputs(3)
    buf = torch.empty(6, H, dtype=torch.bfloat16)
    buf[3:] = hidden
    got = layer.forward(buf[3:], logits, out=buf)
    assert torch.equal(got, layer.forward(hidden, logits))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda l, h, g: l.forward(h.index_fill(0, torch.tensor([1]), float("nan")), g),
            r"hidden: expected finite values, got nan at index \[1, 0\]",
        ),
        (
            lambda l, h, g: l.forward(h, g.index_fill(1, torch.tensor([5]), float("inf"))),
            r"router_logits: expected finite values, got inf at index \[0, 5\]",
        ),
        (
            lambda l, h, g: l.forward_routed(
                h,
                (
                    torch.full((3, K), 8, dtype=torch.int32),
                    torch.ones(3, K).index_fill(0, torch.tensor([2]), float("nan")),
                ),
            ),
            r"topk_weights: expected finite values, got nan at index \[2, 0\]",
        ),
        (
            lambda l, h, g: l.forward_routed(
                h, pack_topk(torch.full((3, K), 8, dtype=torch.int32), torch.full((3, K), float("-inf")))
            ),
            r"topk_weights: expected finite values, got -inf at index \[0, 0\]",
        ),
        (
            lambda l, h, g: l.experts(h, torch.full((3, K), E_GLOBAL, dtype=torch.int32), torch.ones(3, K)),
            r"topk_ids: expected global expert ids in \[-1, 16\), got values in \[16, 16\]",
        ),
        (
            lambda l, h, g: l.forward_routed(
                h,
                pack_topk(
                    torch.full((3, K), -1, dtype=torch.int32).index_fill(1, torch.tensor([0]), 300), torch.ones(3, K)
                ),
            ),
            r"topk_ids: expected global expert ids in \[-1, 16\)",
        ),
        (
            lambda l, h, g: l.experts(
                h.index_fill(0, torch.tensor([2]), float("-inf")),
                torch.full((3, K), 8, dtype=torch.int32),
                torch.ones(3, K),
            ),
            r"hidden: expected finite values, got -inf at index \[2, 0\]",
        ),
    ],
)
def test_check_values_refuses_non_finite_inputs_and_foreign_ids(call, match):
    layer = _layer(check_values=True)
    hidden, logits = _inputs(3)
    with pytest.raises(ValueError, match=match):
        call(layer, hidden, logits)


def test_without_check_values_nan_logits_reach_only_their_token():
    """The documented pass-through (check_values off): a NaN in one token's logits leaves the other tokens
    bit for bit; that token's output is undefined (NaN here, where its selection is local)."""
    layer = _layer(offset=0)
    hidden, logits = _inputs(4)
    clean = layer.forward(hidden, logits)
    logits[1, 2] = float("nan")
    got = layer.forward(hidden, logits)
    assert torch.equal(got[[0, 2, 3]], clean[[0, 2, 3]]) and bool(got[1].isnan().any())
    # and with the check on, clean inputs give the same result
    checked = BF16MoE(
        layer.weights, dataclasses.replace(layer.config, check_values=True), correction_bias=layer.correction_bias
    )
    clean_logits = logits.nan_to_num(0.0)
    assert torch.equal(checked.forward(hidden, clean_logits), layer.forward(hidden, clean_logits))


@pytest.mark.parametrize("precision", list(LAYER_TYPES))
def test_empty_batches_give_empty_outputs(precision):
    layer = _layer(LAYER_TYPES[precision], check_values=True)
    hidden, logits = _inputs(0)
    replay = torch.full((2, K), -4, dtype=torch.int16)
    assert layer.forward(hidden, logits, routing_replay_out=replay).shape == (0, H)
    ids, w = torch.zeros(0, K, dtype=torch.int32), torch.zeros(0, K)
    assert layer.forward_routed(hidden, (ids, w), routing_replay_out=replay).shape == (0, H)
    assert layer.experts(hidden, ids, w, out=torch.zeros(2, H, dtype=torch.bfloat16)).shape == (0, H)
    assert bool((replay == -4).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cache": "/tmp/cache"}, TypeError, "cache: expected a TuningCache or None, got str"),
        ({"force": "yes"}, TypeError, "force: expected a bool"),
        ({"progress": None}, TypeError, "progress: expected a bool"),
    ],
)
def test_bad_warmup_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _layer(FP8BlockMoE).warmup(64, **kwargs)
