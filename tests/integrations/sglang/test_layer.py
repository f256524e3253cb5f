"""A real SGLang FusedMoE layer on the CPU selects our method and runner and matches our reference bit for bit."""

import json

import pytest


@pytest.mark.parametrize(
    "precision,method,scaling_in_runner",
    [
        ("fp8_block", "MoEBackendFp8MoEMethod", 2.5),
        ("fp8_tensor", "MoEBackendFp8MoEMethod", 2.5),
        # SGLang folds routed_scaling_factor into the top-k weights for ModelOpt NVFP4 methods.
        ("nvfp4", "MoEBackendModelOptNvFp4MoEMethod", None),
    ],
)
def test_sglang_layer_runs_our_runner(python, precision, method, scaling_in_runner):
    res = python(["layer_check.py", precision])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["method"] == method
    assert result["runner"] == "moe_backend"
    assert result["scaling_in_runner"] == scaling_in_runner
    # Same weights, same reference kernel on the CPU: the path through SGLang adds nothing.
    assert result["equal"], result
    # SGLang's routed-experts capturer, fed from our routing replay, records the ids our kernel used.
    assert result["capture"] == {
        "moved": 1,
        "topk_capture_off": True,
        "recorded_equal_ids": True,
        "output_unchanged": True,
    }, result
