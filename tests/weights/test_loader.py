"""The loader on the tiny checkpoints: each format, EP slicing, exclusions, and its errors."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_edits import edited_copy
from safetensors.torch import load_file, save_file

from moe_backend import BF16MoE, FP8BlockMoE, FP8TensorMoE, NVFP4MoE, RoutingConfig
from moe_backend.quant import FP8_DTYPE, dequantize_fp8_block, dequantize_nvfp4
from moe_backend.weights.checkpoint import Checkpoint
from moe_backend.weights.checkpoint_maker import LINEAR, NOMINAL_ACTIVATION_AMAX, TINY, make_checkpoints, master_tensor
from moe_backend.weights.linear import CheckpointLinear
from moe_backend.weights.loader import load_moe_layer, load_moe_layers, local_experts, merge_w13_scales, read_moe_layer
from moe_backend.weights.reader import INDEX_FILE

LAYER = 2  # an MoE layer of TINY (layers 1..3)
PREFIX = f"model.layers.{LAYER}.mlp"


def _tensor(ckpt_dir: Path, key: str) -> torch.Tensor:
    shard = json.loads((ckpt_dir / INDEX_FILE).read_text())["weight_map"][key]
    return load_file(str(ckpt_dir / shard))[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_layer_stacks_gate_and_up(tiny_checkpoints):
    path = tiny_checkpoints["bf16"]
    layer = load_moe_layer(path, LAYER)
    assert isinstance(layer, BF16MoE)
    w = layer.weights
    assert (w.num_experts, w.intermediate_size, w.hidden_size) == (16, 128, 256)
    for e in (0, 15):
        gate, up, down = (_tensor(path, f"{PREFIX}.experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down"))
        assert torch.equal(w.w13[e], torch.cat([gate, up]))
        assert torch.equal(w.w2[e], down)
    cfg = layer.config
    assert (cfg.num_experts, cfg.top_k, cfg.local_expert_offset) == (16, 4, 0)
    assert cfg.routing == RoutingConfig.deepseek_v3(4, 2, 2.5, apply_routed_scaling=True)
    assert torch.equal(layer.correction_bias, _tensor(path, f"{PREFIX}.gate.e_score_correction_bias"))


def test_fp8_layer_matches_the_checkpoint_blocks(tiny_checkpoints):
    path = tiny_checkpoints["fp8"]
    layer = load_moe_layer(path, LAYER)
    assert isinstance(layer, FP8BlockMoE) and not layer.weights.ue8m0
    w13, w2 = layer.weights.dequantize_expert(5)
    gate = dequantize_fp8_block(
        _tensor(path, f"{PREFIX}.experts.5.gate_proj.weight"),
        _tensor(path, f"{PREFIX}.experts.5.gate_proj.weight_scale_inv"),
    )
    up = dequantize_fp8_block(
        _tensor(path, f"{PREFIX}.experts.5.up_proj.weight"),
        _tensor(path, f"{PREFIX}.experts.5.up_proj.weight_scale_inv"),
    )
    assert torch.equal(w13, torch.cat([gate, up]))
    bf16 = load_moe_layer(tiny_checkpoints["bf16"], LAYER).weights
    # same seeded weights: FP8 e4m3 rounds each weight by at most 2^-4 relative
    assert _rel(w13, bf16.w13[5]) < 0.04 and _rel(w2, bf16.w2[5]) < 0.04


def test_nvfp4_layer_keeps_gate_and_up_global_scales_apart(tiny_checkpoints):
    path = tiny_checkpoints["nvfp4"]
    layer = load_moe_layer(path, LAYER)
    assert isinstance(layer, NVFP4MoE)
    w = layer.weights
    e = 3
    gate_s2 = _tensor(path, f"{PREFIX}.experts.{e}.gate_proj.weight_scale_2")
    up_s2 = _tensor(path, f"{PREFIX}.experts.{e}.up_proj.weight_scale_2")
    assert gate_s2 != up_s2  # the test means something only if they differ
    assert torch.equal(w.w13_scale_2[e], torch.stack([gate_s2, up_s2]))
    assert torch.equal(w.w2_scale_2[e], _tensor(path, f"{PREFIX}.experts.{e}.down_proj.weight_scale_2"))
    up = dequantize_nvfp4(
        _tensor(path, f"{PREFIX}.experts.{e}.up_proj.weight"),
        _tensor(path, f"{PREFIX}.experts.{e}.up_proj.weight_scale"),
        up_s2,
    )
    assert torch.equal(w.dequantize_expert(e)[0][w.intermediate_size :], up)
    bf16 = load_moe_layer(tiny_checkpoints["bf16"], LAYER).weights
    assert _rel(w.dequantize_expert(e)[0], bf16.w13[e]) < 0.15


def _requantized_w13_loop(path: Path, e: int):
    """ModelOpt FP8 gate/up of expert ``e`` merged to one scale the plain way (vLLM's
    process_fp8_weight_tensor_strategy_moe): scale = max, each half dequantized with its own
    scale and requantized with that one."""
    stored = {
        p: (
            _tensor(path, f"{PREFIX}.experts.{e}.{p}_proj.weight"),
            _tensor(path, f"{PREFIX}.experts.{e}.{p}_proj.weight_scale"),
        )
        for p in ("gate", "up")
    }
    scale = max(float(s) for _, s in stored.values())
    halves = []
    for q, s in stored.values():
        rows = []
        for row in q:
            rows.append(torch.tensor([min(max(float(v) * float(s) / scale, -448.0), 448.0) for v in row.float()]))
        halves.append(torch.stack(rows).to(FP8_DTYPE))
    return torch.cat(halves), scale, stored


def test_fp8_tensor_layer_requantizes_gate_and_up_to_one_scale(tiny_checkpoints):
    path = tiny_checkpoints["fp8_tensor"]
    layer = load_moe_layer(path, LAYER)
    assert isinstance(layer, FP8TensorMoE)
    w = layer.weights
    assert w.w13_scale.shape == (16,) and w.w2_scale.shape == (16,)
    for e in (0, 11):
        w13, scale, stored = _requantized_w13_loop(path, e)
        (gate_q, gate_s), (up_q, up_s) = stored["gate"], stored["up"]
        assert gate_s != up_s  # the test means something only if they differ
        assert float(w.w13_scale[e]) == scale
        assert torch.equal(w.w13[e].view(torch.uint8), w13.view(torch.uint8))
        # the half holding the larger scale comes back bit for bit
        larger = slice(0, 128) if gate_s > up_s else slice(128, 256)
        assert torch.equal(w.w13[e, larger].view(torch.uint8), (gate_q if gate_s > up_s else up_q).view(torch.uint8))
        assert torch.equal(
            w.w2[e].view(torch.uint8), _tensor(path, f"{PREFIX}.experts.{e}.down_proj.weight").view(torch.uint8)
        )
        assert torch.equal(w.w2_scale[e], _tensor(path, f"{PREFIX}.experts.{e}.down_proj.weight_scale"))
    # static activation scales: the largest input_scale of the local experts, one per GEMM input
    nominal = torch.tensor([NOMINAL_ACTIVATION_AMAX / 448.0])
    assert torch.equal(w.a13_scale, nominal) and torch.equal(w.a2_scale, nominal)


def test_fp8_tensor_layer_matches_the_float_master_weights(tiny_checkpoints):
    layer = load_moe_layer(tiny_checkpoints["fp8_tensor"], LAYER)
    for e in (0, 7, 15):
        w13, w2 = layer.weights.dequantize_expert(e)
        master = {
            p: master_tensor(f"{PREFIX}.experts.{e}.{p}_proj.weight", shape, LINEAR, seed=0)
            for p, shape in (("gate", (128, 256)), ("up", (128, 256)), ("down", (256, 128)))
        }
        # e4m3 rounds by at most 2^-4 relative (about 2.5% rms on Gaussian weights), requantization adds a little
        assert _rel(w13, torch.cat([master["gate"], master["up"]])) < 0.04
        assert _rel(w2, master["down"]) < 0.04
    bf16 = load_moe_layer(tiny_checkpoints["bf16"], LAYER)
    gen = torch.Generator().manual_seed(0)
    hidden, logits = torch.randn(32, 256, generator=gen).to(torch.bfloat16), torch.randn(32, 16, generator=gen)
    # weights and both GEMM inputs in e4m3 (the activations with the static scales)
    assert _rel(layer.forward(hidden, logits).float(), bf16.forward(hidden, logits).float()) < 0.1


def test_merge_w13_scales_keeps_equal_scales_bitwise():
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 8, 16, generator=gen) * 50).to(FP8_DTYPE)
    s = torch.tensor(0.25)
    w13, scale = merge_w13_scales(CheckpointLinear("fp8_tensor", q[0], s), CheckpointLinear("fp8_tensor", q[1], s))
    assert scale == s and torch.equal(w13.view(torch.uint8), q.reshape(16, 16).view(torch.uint8))


def test_fp8_tensor_dense_linears_dequantize(tiny_checkpoints):
    with Checkpoint(tiny_checkpoints["fp8_tensor"]) as ckpt:
        weights = read_moe_layer(ckpt, LAYER)
        attn = ckpt.linear("model.layers.0.self_attn.o_proj", (256, 128))
        assert ckpt.quant.format_of("lm_head") == "bf16"
    shared = weights.shared_experts
    assert shared.gate_proj.format == "fp8_tensor" and shared.gate_proj.scale.shape == ()
    assert float(shared.gate_proj.input_scale) == pytest.approx(NOMINAL_ACTIVATION_AMAX / 448.0)
    bf16_down = _tensor(tiny_checkpoints["bf16"], f"{PREFIX}.shared_experts.down_proj.weight")
    assert _rel(shared.down_proj.dequantize(), bf16_down) < 0.04
    bf16_o = _tensor(tiny_checkpoints["bf16"], "model.layers.0.self_attn.o_proj.weight")
    assert attn.weight.dtype == FP8_DTYPE and _rel(attn.dequantize(), bf16_o) < 0.04
    assert weights.router_weight.dtype == torch.bfloat16


def test_fp8_tensor_expert_parallel_ranks(tiny_checkpoints):
    path = tiny_checkpoints["fp8_tensor"]
    full = load_moe_layer(path, LAYER).weights
    for rank in range(4):
        part = load_moe_layer(path, LAYER, ep_rank=rank, ep_size=4).weights
        for name in ("w13", "w13_scale", "w2", "w2_scale"):
            assert torch.equal(
                getattr(part, name).view(torch.uint8), getattr(full, name)[4 * rank : 4 * rank + 4].view(torch.uint8)
            ), name
        assert torch.equal(part.a13_scale, full.a13_scale) and torch.equal(part.a2_scale, full.a2_scale)


def test_fp8_tensor_static_scale_is_the_max_and_absent_means_dynamic(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["fp8_tensor"]
    key = f"{PREFIX}.experts.5.up_proj.input_scale"
    path = edited_copy(src, tmp_path / "larger", key, torch.tensor(0.5))
    w = load_moe_layer(path, LAYER).weights
    assert torch.equal(w.a13_scale, torch.tensor([0.5]))
    assert torch.equal(w.a2_scale, torch.tensor([NOMINAL_ACTIVATION_AMAX / 448.0]))
    # without any input_scale the layer quantizes its activations dynamically
    dynamic = tmp_path / "dynamic"
    shutil.copytree(src, dynamic)
    index = json.loads((dynamic / INDEX_FILE).read_text())
    for shard in set(index["weight_map"].values()):
        tensors = {k: v for k, v in load_file(str(dynamic / shard)).items() if not k.endswith(".input_scale")}
        save_file(tensors, str(dynamic / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith(".input_scale")}
    (dynamic / INDEX_FILE).write_text(json.dumps(index))
    w = load_moe_layer(dynamic, LAYER).weights
    assert w.a13_scale is None and w.a2_scale is None


@pytest.mark.parametrize(
    "key, value, error, match",
    [
        (
            "experts.6.up_proj.input_scale",
            None,
            ValueError,
            r"experts: 1 of the local experts' gate_proj/up_proj have no input_scale and 31 have one",
        ),
        (
            "experts.6.down_proj.weight_scale",
            torch.tensor(0.0),
            ValueError,
            "expected a finite positive scale, got 0.0",
        ),
        ("experts.6.gate_proj.weight_scale", torch.tensor(float("nan")), ValueError, "finite positive scale, got nan"),
        ("experts.6.gate_proj.input_scale", torch.tensor(-1.0), ValueError, "finite positive scale, got -1.0"),
        ("experts.6.gate_proj.weight_scale", torch.ones(2), ValueError, r"expected a scalar, got shape \(2,\)"),
        (
            "experts.6.gate_proj.weight_scale",
            torch.tensor(1.0, dtype=torch.float16),
            TypeError,
            "expected dtype torch.float32, got torch.float16",
        ),
        ("experts.6.gate_proj.weight_scale", None, ValueError, "is missing from the checkpoint"),
    ],
)
def test_fp8_tensor_bad_tensors_are_named(tiny_checkpoints, tmp_path, key, value, error, match):
    path = edited_copy(tiny_checkpoints["fp8_tensor"], tmp_path / "ckpt", f"{PREFIX}.{key}", value)
    with pytest.raises(error, match=match):
        load_moe_layer(path, LAYER)


def test_fp8_tensor_scale_stored_as_shape_1_is_accepted(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.experts.6.gate_proj.weight_scale"
    value = _tensor(tiny_checkpoints["fp8_tensor"], key)
    path = edited_copy(tiny_checkpoints["fp8_tensor"], tmp_path / "ckpt", key, value.reshape(1))
    assert torch.equal(
        load_moe_layer(path, LAYER).weights.w13, load_moe_layer(tiny_checkpoints["fp8_tensor"], LAYER).weights.w13
    )


def test_router_and_shared_experts(tiny_checkpoints):
    with Checkpoint(tiny_checkpoints["fp8"]) as ckpt:
        weights = read_moe_layer(ckpt, LAYER)
    assert weights.router_weight.dtype == torch.bfloat16 and weights.router_weight.shape == (16, 256)
    assert weights.correction_bias.dtype == torch.float32
    shared = weights.shared_experts
    assert shared.gate_proj.format == "fp8_block" and shared.down_proj.weight.shape == (256, 128)
    bf16_down = _tensor(tiny_checkpoints["bf16"], f"{PREFIX}.shared_experts.down_proj.weight")
    assert _rel(shared.down_proj.dequantize(), bf16_down) < 0.04


@pytest.mark.parametrize("flavour", ["bf16", "fp8", "nvfp4"])
def test_expert_parallel_ranks_partition_the_layer(tiny_checkpoints, flavour):
    path = tiny_checkpoints[flavour]
    full = load_moe_layer(path, LAYER)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 256, generator=gen).to(torch.bfloat16)
    logits = torch.randn(24, 16, generator=gen)
    total = torch.zeros(24, 256)
    for rank in range(4):
        part = load_moe_layer(path, LAYER, ep_rank=rank, ep_size=4)
        assert part.config.local_expert_offset == 4 * rank and part.weights.num_experts == 4
        for name, t in part.weights.tensors().items():
            assert torch.equal(t, full.weights.tensors()[name][4 * rank : 4 * rank + 4]), name
        total += part.forward(hidden, logits).float()
    assert _rel(total, full.forward(hidden, logits).float()) < 1e-2  # each rank rounds its share to bf16


def test_local_experts_errors():
    assert local_experts(16, 3, 4) == range(12, 16)
    with pytest.raises(ValueError, match="ep_size: expected a divisor of the expert count 16, got 3"):
        local_experts(16, 0, 3)
    with pytest.raises(ValueError, match=r"ep_rank: expected a rank in \[0, 4\), got 4"):
        local_experts(16, 4, 4)


def test_exclusions_leave_experts_in_bf16(tmp_path):
    dirs = make_checkpoints(
        tmp_path, flavours=["bf16", "nvfp4", "fp8", "fp8_tensor"], extra_exclusions=[f"{PREFIX}.experts"]
    )
    layers = load_moe_layers(dirs["nvfp4"], progress=False)
    assert [type(layers[i]) for i in (1, 2, 3)] == [NVFP4MoE, BF16MoE, NVFP4MoE]
    assert torch.equal(layers[2].weights.w13, load_moe_layer(dirs["bf16"], 2).weights.w13)
    assert isinstance(load_moe_layer(dirs["fp8"], 2), BF16MoE)
    assert isinstance(load_moe_layer(dirs["fp8"], 3), FP8BlockMoE)
    assert isinstance(load_moe_layer(dirs["fp8_tensor"], 2), BF16MoE)
    assert isinstance(load_moe_layer(dirs["fp8_tensor"], 3), FP8TensorMoE)


def test_experts_in_mixed_formats_are_refused(tmp_path):
    dirs = make_checkpoints(tmp_path, flavours=["nvfp4"], extra_exclusions=[f"{PREFIX}.experts.3"])
    with pytest.raises(ValueError, match=rf"{PREFIX}.experts: the local experts are stored in mixed formats"):
        load_moe_layer(dirs["nvfp4"], LAYER)
    # a rank whose slice holds only quantized experts loads
    assert isinstance(load_moe_layer(dirs["nvfp4"], LAYER, ep_rank=1, ep_size=4), NVFP4MoE)


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.experts.6.up_proj.weight_scale_inv"
    path = edited_copy(tiny_checkpoints["fp8"], tmp_path / "ckpt", key, None)
    with pytest.raises(ValueError, match=f"tensor '{key}' is missing"):
        load_moe_layer(path, LAYER)


def test_wrong_dtype_is_named(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.experts.6.down_proj.weight"
    bf16 = _tensor(tiny_checkpoints["bf16"], key)
    path = edited_copy(tiny_checkpoints["fp8"], tmp_path / "ckpt", key, bf16)
    with pytest.raises(TypeError, match=f"{key}: expected dtype torch.float8_e4m3fn, got torch.bfloat16"):
        load_moe_layer(path, LAYER)


def test_wrong_shape_is_named(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.experts.0.gate_proj.weight_scale"
    value = _tensor(tiny_checkpoints["nvfp4"], key)[:, :8].contiguous()
    path = edited_copy(tiny_checkpoints["nvfp4"], tmp_path / "ckpt", key, value)
    with pytest.raises(ValueError, match=rf"{key}: expected shape \(128, 16\), got \(128, 8\)"):
        load_moe_layer(path, LAYER)


def test_non_scalar_global_scale_is_refused(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.experts.0.down_proj.weight_scale_2"
    path = edited_copy(tiny_checkpoints["nvfp4"], tmp_path / "ckpt", key, torch.ones(2))
    with pytest.raises(ValueError, match=f"{key}: expected a scalar, got shape"):
        load_moe_layer(path, LAYER)


def test_unsupported_quantization_is_named(tiny_checkpoints, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["fp8"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        load_moe_layer(path, LAYER)


def test_bad_layer_and_directory(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="layer: 0 is not an MoE layer"):
        load_moe_layer(tiny_checkpoints["bf16"], 0)
    with pytest.raises(ValueError, match="no config.json"):
        load_moe_layer(tmp_path, 1)
    shutil.copy(tiny_checkpoints["bf16"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="not a safetensors checkpoint directory"):
        load_moe_layer(tmp_path, 1)


def test_fp8_experts_need_whole_blocks(tmp_path):
    shape = dataclasses.replace(TINY, moe_intermediate_size=96)
    dirs = make_checkpoints(tmp_path, shape, flavours=["fp8"])
    with pytest.raises(
        ValueError,
        match="FP8 block experts need hidden_size and moe_intermediate_size that are multiples of 128, got H=256, I=96",
    ):
        load_moe_layer(dirs["fp8"], 1)


def test_non_finite_correction_bias_names_the_file(tiny_checkpoints, tmp_path):
    key = f"{PREFIX}.gate.e_score_correction_bias"
    bias = _tensor(tiny_checkpoints["fp8"], key).clone()
    bias[5] = float("nan")
    path = edited_copy(tiny_checkpoints["fp8"], tmp_path / "ckpt", key, bias)
    with pytest.raises(ValueError, match=rf"\.safetensors: {key}: expected finite values, got nan at index \[5\]"):
        load_moe_layer(path, LAYER)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: load_moe_layer(123, LAYER), TypeError, "path: expected a str or os.PathLike"),
        (lambda p: load_moe_layer(p, "2"), TypeError, "layer: expected an int"),
        (lambda p: load_moe_layer(p, LAYER, device=3), TypeError, "device: expected a torch.device or str"),
        (lambda p: load_moe_layer(p, LAYER, device="gpu7"), ValueError, "device: expected a device"),
        (lambda p: load_moe_layer(p, LAYER, kernel=None), TypeError, "kernel: expected a str"),
        (lambda p: load_moe_layer(p, LAYER, ep_size=2.0), TypeError, "ep_size: expected an int"),
        (lambda p: read_moe_layer(str(p), LAYER), TypeError, "ckpt: expected a Checkpoint"),
    ],
)
def test_bad_loader_arguments_are_named(tiny_checkpoints, call, error, match):
    with pytest.raises(error, match=match):
        call(tiny_checkpoints["bf16"])
