"""Checkpoints and deployments moe_backend cannot serve stop start-up with a message that says why."""

STARTUP_CHECK = """
from types import SimpleNamespace as NS
import torch
from vllm.plugins import load_general_plugins
load_general_plugins()
from moe_backend.integrations.vllm import UnsupportedByMoEBackend
from moe_backend.integrations.vllm.convert import expert_offset
from moe_backend.integrations.vllm.support import check_vllm_config

def config(quantization="fp8", dtype=torch.bfloat16, act="silu", eplb=False, ep=False, dp=1,
           a2a="allgather_reducescatter", placement="linear", backend="moe_backend"):
    return NS(kernel_config=NS(moe_backend=backend),
              model_config=NS(quantization=quantization, dtype=dtype, hf_text_config=NS(hidden_act=act)),
              parallel_config=NS(enable_eplb=eplb, enable_expert_parallel=ep, data_parallel_size=dp,
                                 all2all_backend=a2a, expert_placement_strategy=placement))

def refused(**kw):
    try:
        check_vllm_config(config(**kw))
    except UnsupportedByMoEBackend as err:
        return str(err)
    return None

for quant in ("fp8", "modelopt", "modelopt_fp4"):
    assert refused(quantization=quant) is None
assert refused(ep=True, dp=2) is None
assert refused(quantization="gptq", backend="triton") is None  # not ours: vLLM decides
msg = refused(quantization="gptq")
assert "quantization 'gptq'" in msg and "--moe-backend auto" in msg and "marlin" in msg, msg
assert "activation 'gelu'" in refused(act="gelu")
assert "float16" in refused(dtype=torch.float16)
assert "--enable-eplb" in refused(eplb=True)
assert "'deepep_low_latency'" in refused(ep=True, dp=2, a2a="deepep_low_latency")
assert "'round_robin'" in refused(ep=True, placement="round_robin")
import os
os.environ["MOE_BACKEND_NUMERICS"] = "fast"
assert "MOE_BACKEND_NUMERICS='fast' (expected one of accurate, vllm_triton)" in refused()
del os.environ["MOE_BACKEND_NUMERICS"]

assert expert_offset(None, 8) == 0
assert expert_offset(torch.tensor([-1, -1, 0, 1, -1, -1], dtype=torch.int32), 2) == 2
try:
    expert_offset(torch.tensor([0, -1, 1, -1], dtype=torch.int32), 2)
except UnsupportedByMoEBackend as err:
    assert "not contiguous" in str(err), err
else:
    raise AssertionError("round-robin placement accepted")
print("OK")
"""


def test_unsupported_configs_are_refused_with_reasons(python):
    res = python(STARTUP_CHECK)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


LAYER_REFUSAL = """
import torch
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.config import KernelConfig, VllmConfig, set_current_vllm_config
from moe_backend.integrations.vllm import UnsupportedByMoEBackend
from moe_backend.integrations.vllm.experts import MoEBackendExperts
from moe_backend.integrations.vllm.support import check_layer
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym, kFp8Static128BlockSym
assert MoEBackendExperts._supports_activation(MoEActivation.SILU)
assert not MoEBackendExperts._supports_activation(MoEActivation.GELU)
assert MoEBackendExperts._supports_quant_scheme(kFp8Static128BlockSym, kFp8Dynamic128Sym)
assert not MoEBackendExperts._supports_quant_scheme(None, None)  # unquantized
print("OK")
"""


def test_experts_predicates(python):
    res = python(LAYER_REFUSAL)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def test_numerics_a_layer_cannot_offer_stop_start_up(python):
    """``vllm_triton`` numerics need our Triton FP8 kernel: on the CPU's reference the layer is refused."""
    res = python(["layer_check.py", "fp8_block"], env={"MOE_BACKEND_NUMERICS": "vllm_triton"})
    assert res.returncode != 0
    assert "numerics: 'vllm_triton': kernel 'reference'" in res.stderr, res.stderr[-3000:]
    assert "--moe-backend auto" in res.stderr
