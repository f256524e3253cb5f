"""QuantSpec: which format each linear is stored in, from config.json or hf_quant_config.json."""

import json

import pytest

from moe_backend.weights.quant_config import BF16, FP8_BLOCK, FP8_TENSOR, HF_QUANT_CONFIG, NVFP4, QuantSpec, matches_any

OFFICIAL_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
EXPERT = "model.layers.3.mlp.experts.7.gate_proj"


def test_no_quantization_config_is_bf16(tmp_path):
    spec = QuantSpec.from_checkpoint(tmp_path, {"model_type": "deepseek_v3"})
    assert spec == QuantSpec(BF16)
    assert spec.format_of(EXPERT) == BF16


def test_official_fp8_quantizes_all_linears_but_router_and_head():
    spec = QuantSpec.from_quantization_config(OFFICIAL_FP8)
    assert (spec.method, spec.ue8m0) == (FP8_BLOCK, False)
    assert spec.format_of(EXPERT) == FP8_BLOCK
    assert spec.format_of("model.layers.0.self_attn.kv_a_proj_with_mqa") == FP8_BLOCK
    assert spec.format_of("model.layers.3.mlp.gate") == BF16
    assert spec.format_of("lm_head") == BF16


def test_fp8_ue8m0_and_exclusions():
    spec = QuantSpec.from_quantization_config(
        {**OFFICIAL_FP8, "scale_fmt": "ue8m0", "modules_to_not_convert": ["model.layers.3.mlp.experts"]}
    )
    assert spec.ue8m0
    assert spec.format_of(EXPERT) == BF16
    assert spec.format_of("model.layers.4.mlp.experts.7.gate_proj") == FP8_BLOCK


def test_modelopt_nvfp4_from_hf_quant_config(tmp_path):
    hf_quant = {
        "producer": {"name": "modelopt"},
        "quantization": {
            "quant_algo": "NVFP4",
            "group_size": 16,
            "exclude_modules": ["lm_head", "model.layers.*.self_attn*"],
        },
    }
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant))
    spec = QuantSpec.from_checkpoint(tmp_path, {"model_type": "deepseek_v3"})
    assert spec.method == NVFP4
    assert spec.format_of(EXPERT) == NVFP4
    assert spec.format_of("model.layers.5.self_attn.q_b_proj") == BF16
    assert spec.format_of("model.layers.3.mlp.shared_experts.down_proj") == NVFP4


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["model.layers.3.mlp*"]},
        {
            "quant_method": "modelopt",
            "quantization": {"quant_algo": "NVFP4", "exclude_modules": ["model.layers.3.mlp*"]},
        },
    ],
)
def test_modelopt_nvfp4_from_config_json(tmp_path, qc):
    # config.json wins over a stale hf_quant_config.json
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    spec = QuantSpec.from_checkpoint(tmp_path, {"quantization_config": qc})
    assert spec.method == NVFP4
    assert spec.format_of(EXPERT) == BF16
    assert spec.format_of("model.layers.4.mlp.experts.0.up_proj") == NVFP4


def test_modelopt_fp8_from_hf_quant_config(tmp_path):
    hf_quant = {
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8",
            "exclude_modules": ["lm_head", "model.layers.0.self_attn*"],
        },
    }
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant))
    spec = QuantSpec.from_checkpoint(tmp_path, {"model_type": "deepseek_v3"})
    assert spec == QuantSpec(FP8_TENSOR, ("lm_head", "model.layers.0.self_attn*"))
    assert spec.format_of(EXPERT) == FP8_TENSOR
    assert spec.format_of("model.layers.3.mlp.shared_experts.up_proj") == FP8_TENSOR
    assert spec.format_of("model.layers.1.self_attn.o_proj") == FP8_TENSOR
    assert spec.format_of("model.layers.0.self_attn.o_proj") == BF16
    assert spec.format_of("model.layers.3.mlp.gate") == BF16 and spec.format_of("lm_head") == BF16


@pytest.mark.parametrize(
    "qc",
    [
        # what vLLM reads as quant_method modelopt: the flat form (ignore or exclude_modules) and the nested one
        {
            "quant_method": "modelopt",
            "quant_algo": "FP8",
            "ignore": ["model.layers.3.mlp.experts*"],
            "kv_cache_scheme": None,
            "producer": {"name": "modelopt"},
        },
        {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["model.layers.3.mlp.experts*"]},
        {
            "quant_method": "modelopt",
            "quantization": {
                "quant_algo": "FP8",
                "kv_cache_quant_algo": None,
                "exclude_modules": ["model.layers.3.mlp.experts*"],
            },
        },
    ],
)
def test_modelopt_fp8_from_config_json(tmp_path, qc):
    # config.json wins over a stale hf_quant_config.json
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    spec = QuantSpec.from_checkpoint(tmp_path, {"quantization_config": qc})
    assert spec.method == FP8_TENSOR and not spec.ue8m0
    assert spec.format_of(EXPERT) == BF16
    assert spec.format_of("model.layers.4.mlp.experts.0.up_proj") == FP8_TENSOR


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
        ({**OFFICIAL_FP8, "fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
        ({**OFFICIAL_FP8, "weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\] is not supported"),
        ({**OFFICIAL_FP8, "weight_block_size": None}, "weight_block_size"),
        ({**OFFICIAL_FP8, "activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
        ({**OFFICIAL_FP8, "scale_fmt": "e8m0x"}, "scale_fmt 'e8m0x' is not supported"),
        (
            {"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
            r"quant_algo 'FP8_PER_CHANNEL_PER_TOKEN' is not supported \(supported: \['FP8', 'NVFP4'\]\)",
        ),
        ({"quant_method": "modelopt", "quant_algo": "FP8_PB_WO"}, "quant_algo 'FP8_PB_WO' is not supported"),
        ({"quant_method": "modelopt"}, "quant_algo None is not supported"),
        ({"quant_method": "modelopt", "quant_algo": "FP8", "group_size": 128}, "group_size 128 is not supported"),
        ({"quant_method": "modelopt", "quantization": {"quant_algo": "INT4_AWQ"}}, "quant_algo 'INT4_AWQ'"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}, "group_size 32 is not supported"),
    ],
)
def test_unsupported_configs_are_named(qc, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.from_quantization_config(qc)


def test_bad_hf_quant_config_and_exclusion_list(tmp_path):
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps({"quant_algo": "NVFP4"}))
    with pytest.raises(ValueError, match="expected a 'quantization' object"):
        QuantSpec.from_checkpoint(tmp_path, {})
    with pytest.raises(TypeError, match="exclude_modules: expected a list"):
        QuantSpec.from_hf_quant_config({"quantization": {"quant_algo": "NVFP4", "exclude_modules": "lm_head"}})


def test_patterns_match_a_module_or_a_dotted_prefix():
    assert matches_any(EXPERT, ["model.layers.3.mlp.experts"])
    assert matches_any(EXPERT, ["*.experts.7"])
    assert not matches_any(EXPERT, ["model.layers.3.mlp.gate"])  # gate is not a prefix of gate_proj
    assert not matches_any("model.layers.13.mlp.experts.0.up_proj", ["model.layers.1*.self_attn*"])


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(FP8_BLOCK),
        QuantSpec(FP8_BLOCK, ("x.y",), ue8m0=True),
        QuantSpec(NVFP4, ("lm_head", "model.layers.*.self_attn*")),
        QuantSpec(FP8_TENSOR),
        QuantSpec(FP8_TENSOR, ("lm_head", "model.layers.1.mlp*")),
    ],
)
def test_config_entries_read_back(tmp_path, spec):
    qc, hf_quant = spec.config_entries()
    assert QuantSpec.from_quantization_config(qc) == spec
    if hf_quant is not None:
        assert QuantSpec.from_hf_quant_config(hf_quant) == spec


def test_modelopt_fp8_config_entries_are_modelopts():
    qc, hf_quant = QuantSpec(FP8_TENSOR, ("lm_head",)).config_entries()
    assert qc == {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]}
    assert hf_quant == {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    }


@pytest.mark.parametrize("text", ["{not json", "\udcff"])
def test_unreadable_hf_quant_config_names_the_file(tmp_path, text):
    path = tmp_path / HF_QUANT_CONFIG
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"{path}: not a readable JSON file") as info:
        QuantSpec.from_checkpoint(tmp_path, {})
    assert info.value.__cause__ is not None


def test_errors_name_the_checkpoint_files(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}:quantization_config: quant_method 'awq'"):
        QuantSpec.from_checkpoint(tmp_path, {"quantization_config": {"quant_method": "awq"}})
    (tmp_path / HF_QUANT_CONFIG).write_text(json.dumps({"quantization": {"quant_algo": "W8A8"}}))
    with pytest.raises(ValueError, match=f"{tmp_path / HF_QUANT_CONFIG}:quantization: quant_algo 'W8A8'"):
        QuantSpec.from_checkpoint(tmp_path, {})


@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: QuantSpec.from_quantization_config({**OFFICIAL_FP8, "weight_block_size": 128}),
            ValueError,
            "weight_block_size 128 is not supported",
        ),
        (lambda: QuantSpec(FP8_BLOCK, ue8m0="yes"), TypeError, "ue8m0: expected a bool"),
        (lambda: QuantSpec(FP8_BLOCK, exclude_modules="lm_head"), TypeError, "exclude_modules: expected a list"),
        (lambda: QuantSpec(FP8_BLOCK).format_of(3), TypeError, "module: expected a str"),
    ],
)
def test_bad_fields_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()
