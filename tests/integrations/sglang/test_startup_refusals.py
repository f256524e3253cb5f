"""MoE layers moe_backend cannot serve stop SGLang while it builds the model, with a message that says why."""

import json


def test_unservable_layers_are_refused_when_built(python):
    res = python(["layer_check.py", "refusals"])
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    assert errors.pop("served") is None
    expected = {
        "unquantized": "quantization method UnquantizedFusedMoEMethod",
        "gelu": "expert activation 'gelu'",
        "float16": "model dtype torch.float16 (bfloat16 only)",
        "online_fp8": "on-line FP8 quantization of a bf16 checkpoint",
        "block_64": "FP8 block size [64, 64] (128x128 only)",
    }
    for case, phrase in expected.items():
        message = errors[case]
        assert message is not None, f"{case} was accepted"
        assert message.startswith("--moe-runner-backend moe_backend: "), message
        assert phrase in message, (case, message)
        assert "--moe-runner-backend auto" in message, message
