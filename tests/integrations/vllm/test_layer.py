"""A real vLLM FusedMoE layer on the CPU selects MoEBackendExperts and matches our reference."""

import json

import pytest


@pytest.mark.parametrize("precision", ["fp8_block", "nvfp4"])
def test_vllm_layer_runs_our_experts(python, precision):
    res = python(["layer_check.py", precision])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["experts"] == "MoEBackendExperts"
    # Same weights, same reference kernel on the CPU: only the path through vLLM differs.
    assert result["max_abs_diff"] <= 1e-2 * result["ref_max"], result
