"""DeepSeekV3Spec: the MoE fields of config.json, their validation, the MoE layer indices."""

import pytest

from moe_backend.routing import RoutingConfig
from moe_backend.weights.checkpoint_maker import TINY
from moe_backend.weights.model_config import DeepSeekV3Spec


def test_reads_the_tiny_config():
    spec = DeepSeekV3Spec.from_config(TINY.config())
    assert (spec.hidden_size, spec.moe_intermediate_size, spec.n_routed_experts) == (256, 128, 16)
    assert (spec.num_experts_per_tok, spec.n_group, spec.topk_group, spec.n_shared_experts) == (4, 4, 2, 1)
    assert spec.moe_layers == (1, 2, 3)
    assert spec.shared_intermediate_size == 128
    assert spec.routing_config() == RoutingConfig.deepseek_v3(4, 2, 2.5, apply_routed_scaling=True)


def test_moe_layer_freq_and_norm_topk_prob():
    config = {
        **TINY.config(),
        "num_hidden_layers": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 2,
        "norm_topk_prob": False,
    }
    spec = DeepSeekV3Spec.from_config(config)
    assert spec.moe_layers == (4, 6)
    assert spec.routing_config().norm_topk_prob is False


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"model_type": "llama"}, ValueError, "model_type 'llama'"),
        ({"scoring_func": "softmax"}, ValueError, "scoring_func 'softmax'"),
        ({"topk_method": "greedy"}, ValueError, "topk_method 'greedy'"),
        ({"n_routed_experts": None}, ValueError, "missing field 'n_routed_experts'"),
        ({"hidden_size": "256"}, TypeError, "'hidden_size' expected int"),
        ({"num_experts_per_tok": True}, TypeError, "'num_experts_per_tok' expected int"),
        ({"norm_topk_prob": 1}, TypeError, "'norm_topk_prob' expected bool"),
        ({"moe_intermediate_size": 0}, ValueError, "'moe_intermediate_size' expected a positive int"),
        ({"n_group": 3}, ValueError, "n_group: expected a divisor"),
    ],
)
def test_rejects_bad_configs(change, error, match):
    with pytest.raises(error, match=match):
        DeepSeekV3Spec.from_config({**TINY.config(), **change})


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            {"routed_scaling_factor": float("nan")},
            ValueError,
            "routed_scaling_factor: expected a finite positive float",
        ),
        (
            {"routed_scaling_factor": float("inf")},
            ValueError,
            "routed_scaling_factor: expected a finite positive float",
        ),
        ({"routed_scaling_factor": -2.5}, ValueError, "routed_scaling_factor: expected a finite positive float"),
        ({"routed_scaling_factor": "2.5"}, TypeError, "'routed_scaling_factor' expected int or float"),
        ({"first_k_dense_replace": -1}, ValueError, "'first_k_dense_replace' expected an int >= 0"),
        ({"n_shared_experts": -1}, ValueError, "'n_shared_experts' expected an int >= 0"),
        (
            {"n_routed_experts": 40000, "n_group": 1, "topk_group": 1},
            ValueError,
            "'n_routed_experts' expected at most 32768",
        ),
        ({"topk_group": 8}, ValueError, r"topk_group: expected at most n_group \(4\)"),
    ],
)
def test_bad_values_name_the_file(change, error, match):
    with pytest.raises(error, match=match) as info:
        DeepSeekV3Spec.from_config({**TINY.config(), **change}, source="/ckpt/config.json")
    assert str(info.value).startswith("/ckpt/config.json: ")


@pytest.mark.parametrize("config", [[1, 2], "deepseek_v3", None])
def test_a_config_that_is_not_an_object_is_named(config):
    with pytest.raises(TypeError, match="config.json: expected a JSON object"):
        DeepSeekV3Spec.from_config(config)
