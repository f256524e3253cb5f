"""moe-backend make-checkpoint: files, names, dtypes per flavour, one set of weights, transformers loads it."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_backend import cli
from moe_backend.quant import FP8_DTYPE, dequantize_fp8_block, dequantize_fp8_per_tensor, dequantize_nvfp4
from moe_backend.weights.checkpoint_maker import NOMINAL_ACTIVATION_AMAX, TINY, make_checkpoints

MLA = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")


def _tensors(path: Path) -> dict:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tensors(checkpoints):
    return {flavour: _tensors(path) for flavour, path in checkpoints.items()}


def test_files_and_index(checkpoints):
    for path in checkpoints.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
        assert set(index["weight_map"].values()) == set(shards)
        for shard in shards:
            with safe_open(str(path / shard), framework="pt") as f:
                assert {k for k, s in index["weight_map"].items() if s == shard} == set(f.keys())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(path).values())
    assert (checkpoints["nvfp4"] / "hf_quant_config.json").is_file()
    assert not (checkpoints["fp8"] / "hf_quant_config.json").exists()
    assert (checkpoints["fp8_tensor"] / "hf_quant_config.json").is_file()


def test_config_has_what_deepseek_v3_needs(checkpoints):
    config = json.loads((checkpoints["bf16"] / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (
        config["n_routed_experts"],
        config["n_group"],
        config["topk_group"],
        config["num_experts_per_tok"],
        config["n_shared_experts"],
        config["first_k_dense_replace"],
    ) == (16, 4, 2, 4, 1, 1)
    assert (config["scoring_func"], config["topk_method"], config["norm_topk_prob"]) == ("sigmoid", "noaux_tc", True)
    assert "quantization_config" not in config
    fp8 = json.loads((checkpoints["fp8"] / "config.json").read_text())["quantization_config"]
    assert fp8 == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    hf_quant = json.loads((checkpoints["nvfp4"] / "hf_quant_config.json").read_text())["quantization"]
    assert (hf_quant["quant_algo"], hf_quant["group_size"]) == ("NVFP4", 16)
    assert "lm_head" in hf_quant["exclude_modules"] and "model.layers.3.self_attn*" in hf_quant["exclude_modules"]
    # ModelOpt FP8: what vLLM serves as quant_method modelopt
    fp8_tensor = json.loads((checkpoints["fp8_tensor"] / "config.json").read_text())["quantization_config"]
    assert fp8_tensor == {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]}
    hf_quant = json.loads((checkpoints["fp8_tensor"] / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "modelopt"
    assert hf_quant["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
    }


def test_real_tensor_names(tensors):
    names = set(tensors["bf16"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    for layer in range(4):
        assert {f"model.layers.{layer}.self_attn.{m}.weight" for m in MLA} <= names
        assert f"model.layers.{layer}.input_layernorm.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    for layer in (1, 2, 3):
        p = f"model.layers.{layer}.mlp"
        assert {
            f"{p}.gate.weight",
            f"{p}.gate.e_score_correction_bias",
            f"{p}.shared_experts.down_proj.weight",
            f"{p}.experts.15.up_proj.weight",
        } <= names


def test_dtypes_per_flavour(tensors):
    fp8, nvfp4 = tensors["fp8"], tensors["nvfp4"]
    expert = "model.layers.1.mlp.experts.0.gate_proj"
    attn = "model.layers.1.self_attn.kv_b_proj"
    assert fp8[f"{expert}.weight"].dtype == FP8_DTYPE and fp8[f"{expert}.weight_scale_inv"].shape == (1, 2)
    assert fp8[f"{attn}.weight"].dtype == FP8_DTYPE
    for bf16_name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        assert fp8[bf16_name].dtype == torch.bfloat16 and nvfp4[bf16_name].dtype == torch.bfloat16
    assert fp8["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert nvfp4[f"{expert}.weight"].dtype == torch.uint8 and nvfp4[f"{expert}.weight"].shape == (128, 128)
    assert nvfp4[f"{expert}.weight_scale"].dtype == FP8_DTYPE and nvfp4[f"{expert}.weight_scale_2"].shape == ()
    assert nvfp4[f"{expert}.input_scale"].dtype == torch.float32
    assert nvfp4["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert nvfp4[f"{attn}.weight"].dtype == torch.bfloat16 and f"{attn}.weight_scale" not in nvfp4


def test_modelopt_fp8_keys(tensors):
    """Every linear but the router and lm_head: weight e4m3 [N, K], weight_scale and input_scale 0-d fp32
    (amax / 448 and the nominal activation amax / 448); nothing else quantized, no other key."""
    t = tensors["fp8_tensor"]
    names = {k for k in tensors["bf16"] if k.endswith(".weight")}
    quantized = {k[: -len(".weight")] for k in names if t[k].dtype == FP8_DTYPE}
    linears = {k[: -len(".weight")] for k in names if tensors["bf16"][k].dim() == 2} - {
        "model.embed_tokens",
        "lm_head",
        *(f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)),
    }
    assert quantized == linears and len(linears) == 4 * 5 + 3 + 3 * 17 * 3  # MLA, dense MLP, experts
    assert set(t) == set(tensors["bf16"]) | {f"{m}.{s}" for m in linears for s in ("weight_scale", "input_scale")}
    for module in quantized:
        weight, scale, input_scale = t[f"{module}.weight"], t[f"{module}.weight_scale"], t[f"{module}.input_scale"]
        assert weight.shape == tensors["bf16"][f"{module}.weight"].shape
        assert scale.dtype == input_scale.dtype == torch.float32 and scale.shape == input_scale.shape == ()
        assert float(scale) == float(tensors["bf16"][f"{module}.weight"].float().abs().max() / 448)
        assert float(input_scale) == pytest.approx(NOMINAL_ACTIVATION_AMAX / 448)
    for bf16_name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        assert t[bf16_name].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_one_set_of_weights(tensors):
    name = "model.layers.2.mlp.experts.9.down_proj"
    bf16 = tensors["bf16"][f"{name}.weight"].float()
    fp8 = dequantize_fp8_block(tensors["fp8"][f"{name}.weight"], tensors["fp8"][f"{name}.weight_scale_inv"])
    nvfp4 = dequantize_nvfp4(
        tensors["nvfp4"][f"{name}.weight"],
        tensors["nvfp4"][f"{name}.weight_scale"],
        tensors["nvfp4"][f"{name}.weight_scale_2"],
    )
    assert float((fp8 - bf16).norm() / bf16.norm()) < 0.04
    assert float((nvfp4 - bf16).norm() / bf16.norm()) < 0.15
    fp8_tensor = dequantize_fp8_per_tensor(
        tensors["fp8_tensor"][f"{name}.weight"], tensors["fp8_tensor"][f"{name}.weight_scale"]
    )
    assert float((fp8_tensor - bf16).norm() / bf16.norm()) < 0.04


def test_seeded(tmp_path, tensors):
    again = _tensors(make_checkpoints(tmp_path / "a", flavours=["bf16"])["bf16"])
    other = _tensors(make_checkpoints(tmp_path / "b", flavours=["bf16"], seed=1)["bf16"])
    assert all(torch.equal(again[k], tensors["bf16"][k]) for k in again)
    assert not torch.equal(other["lm_head.weight"], again["lm_head.weight"])


@pytest.mark.parametrize("q_lora_rank", [128, None])
def test_transformers_loads_every_tensor(tmp_path, q_lora_rank):
    transformers = pytest.importorskip("transformers")
    path = make_checkpoints(tmp_path, dataclasses.replace(TINY, q_lora_rank=q_lora_rank), flavours=["bf16"])["bf16"]
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.n_group == 4 and model.config.q_lora_rank == q_lora_rank
    with safe_open(str(path / "model-00003-of-00004.safetensors"), framework="pt") as f:
        up = f.get_tensor("model.layers.2.mlp.experts.7.up_proj.weight")
    assert torch.equal(model.model.layers[2].mlp.experts.gate_up_proj[7, 128:].to(torch.bfloat16), up)


def test_cli(tmp_path, capsys):
    assert (
        cli.main(
            [
                "make-checkpoint",
                str(tmp_path),
                "--formats",
                "fp8",
                "--num-hidden-layers",
                "3",
                "--n-routed-experts",
                "8",
                "--exclude",
                "model.layers.2.mlp.experts",
            ]
        )
        == 0
    )
    assert "fp8" in capsys.readouterr().out
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["n_routed_experts"]) == (3, 8)
    assert config["quantization_config"]["modules_to_not_convert"] == ["model.layers.2.mlp.experts"]
    assert not (tmp_path / "bf16").exists()
    assert (
        cli.main(
            [
                "make-checkpoint",
                str(tmp_path),
                "--formats",
                "fp8_tensor",
                "--num-hidden-layers",
                "3",
                "--exclude",
                "model.layers.2.mlp.experts",
            ]
        )
        == 0
    )
    assert "fp8_tensor" in capsys.readouterr().out
    config = json.loads((tmp_path / "fp8_tensor" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head", "model.layers.2.mlp.experts"]


def test_bad_requests_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="flavours: expected a non-empty subset"):
        make_checkpoints(tmp_path, flavours=["int4"])
    with pytest.raises(ValueError, match="n_group: expected a divisor of the expert count 16, got 3"):
        make_checkpoints(tmp_path, dataclasses.replace(TINY, n_group=3))
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight: NVFP4 needs in_features"):
        make_checkpoints(tmp_path, dataclasses.replace(TINY, intermediate_size=520), flavours=["nvfp4"])
