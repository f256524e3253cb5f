"""SGLang applies ``routed_scaling_factor`` exactly once, in the top-k or in the runner, and so do we.

Our binding (``integrations/sglang/binding.py``) relies on SGLang's rule: it multiplies the
router weights by the factor unless ``FusedMoE.should_fuse_routed_scaling_factor_in_topk``
says SGLang's top-k already folded it in. SGLang 0.5.15 broke the rule for ModelOpt NVFP4 on
its Marlin runner: the top-k folded the factor in and Marlin multiplied by
``moe_runner_config.routed_scaling_factor`` again (fixed upstream, sgl-project/sglang#31762;
0.5.23 folds it for NVFP4 only off Marlin). SGLang's Marlin and Triton runners multiply by
that config's factor unconditionally, so on them exactly one of the two must hold.
"""

import json

SCALING = 2.5  # layer_check.SCALING: DeepSeek-V3's routed_scaling_factor

SGLANG_OWN = {  # case: (SGLang's own quantization method, its runner)
    "sglang_nvfp4_marlin": ("ModelOptNvFp4FusedMoEMethod", "marlin"),
    "sglang_fp8_block_triton": ("Fp8MoEMethod", "triton"),
}
OURS = {  # case: our quantization method (--moe-runner-backend moe_backend)
    "ours_fp8_block": "MoEBackendFp8MoEMethod",
    "ours_nvfp4": "MoEBackendModelOptNvFp4MoEMethod",
}


def test_routed_scaling_factor_is_applied_exactly_once(python):
    res = python(["layer_check.py", "scaling_rule"])
    assert res.returncode == 0, res.stderr[-3000:]
    cases = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(cases) == set(SGLANG_OWN) | set(OURS), cases
    for name, (method, runner) in SGLANG_OWN.items():
        case = cases[name]
        assert (case["method"], case["runner"]) == (method, runner), (name, case)
        assert case["runner_reads_layer_config"], (name, case)
        in_topk = bool(case["fused_in_topk"])
        in_runner = case["runner_factor"] not in (None, 1.0)
        assert case["runner_factor"] in (None, 1.0, SCALING), (name, case)
        assert in_topk != in_runner, f"{name}: routed_scaling_factor applied {in_topk + in_runner} times: {case}"
    for name, method in OURS.items():
        case = cases[name]
        assert (case["method"], case["runner"]) == (method, "moe_backend"), (name, case)
        # Ours multiplies by the binding's factor only (never by moe_runner_config's).
        expected = None if case["fused_in_topk"] else SCALING
        assert case["binding_factor"] == expected, f"{name}: top-k and binding disagree: {case}"
