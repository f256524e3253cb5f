"""The patch surface: every patched vLLM symbol resolves in the installed vLLM; a missing one stops
``register()`` before anything is patched, with a message that lists it."""

from moe_backend.integrations.vllm import surface

SURFACE_CHECK = """
import importlib.machinery
import sys
import types
from typing import get_args

import vllm.config.kernel as kernel
import vllm.v1.worker.gpu_worker as gpu_worker
from moe_backend.integrations.vllm import compat, oracle, register, surface

version = compat.vllm_version()
assert surface.missing_targets(version) == [], surface.missing_targets(version)
assert not oracle.register_fp8_backend()  # no release ships vLLM's FP8 MoE backend registry yet

# Where vLLM has the registry, our experts class is registered through it, by a name that resolves.
calls = []
registry = types.ModuleType(oracle.FP8_REGISTRY)
registry.__spec__ = importlib.machinery.ModuleSpec(oracle.FP8_REGISTRY, None)
registry.register_fp8_moe_backend = lambda name, paths: calls.append((name, paths))
sys.modules[oracle.FP8_REGISTRY] = registry
assert oracle.register_fp8_backend()
assert calls == [("moe_backend", (oracle.EXPERTS_CLASS_PATH,))], calls
module, _, cls = oracle.EXPERTS_CLASS_PATH.rpartition(".")
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular
assert issubclass(getattr(importlib.import_module(module), cls), FusedMoEExpertsModular)
del sys.modules[oracle.FP8_REGISTRY]

# A vLLM without two of the symbols: one attribute gone, one module that does not import.
del gpu_worker.kernel_warmup
sys.modules["vllm.distributed.aux_output_connector.worker"] = None
try:
    register()
except surface.UnsupportedVllmError as err:
    msg = str(err)
else:
    raise AssertionError("register() accepted a vLLM without kernel_warmup")
assert "lacks 2 symbol(s)" in msg, msg
assert "vllm.v1.worker.gpu_worker.kernel_warmup: wrapped" in msg, msg
assert "vllm.distributed.aux_output_connector.worker.bind_routed_experts_capturer" in msg, msg
assert "moe_backend" not in get_args(kernel.MoEBackend)  # nothing was patched
print("OK")
"""


def test_real_vllm_has_the_surface_and_a_missing_symbol_is_listed(python):
    res = python(SURFACE_CHECK)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def test_rows_apply_to_their_versions():
    def names(version):
        return {t.name for t in surface.SURFACE if t.applies_to(version)}

    old, new = names((0, 26, 0)), names((0, 33, 0))
    runner = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._bind_routed_experts_capturer"
    capturer = "vllm.model_executor.layers.fused_moe.routed_experts_capturer.bind_routed_experts_capturer"
    assert runner in old and runner not in new
    assert capturer in new and capturer not in old
    assert len(new) >= 14 and len({t.name for t in surface.SURFACE}) == len(surface.SURFACE)  # no duplicates
    assert all(t.action and t.why for t in surface.SURFACE)
