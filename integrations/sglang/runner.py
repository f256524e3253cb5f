"""``MoEBackendRunnerCore``: SGLang's runner-core interface over :meth:`MoELayer.experts`.

Registered with ``register_moe_runner_core`` under the backend name; SGLang's
``MoeRunner`` hands it the standard dispatch output (bf16 ``hidden_states [T, H]``
and the top-k SGLang chose: local ids ``[T, k]`` with ``-1`` for experts held
elsewhere, fp32 weights) and expects the reduced expert output back as a
``StandardCombineInput``. The router weight is applied where SGLang asks
(``apply_router_weight_on_input``), and ``routed_scaling_factor`` exactly once:
here, unless SGLang's top-k already folded it into the weights.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.layers.moe.moe_runner.base import DispatchMoeRunnerCore, MoeRunnerConfig
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

from .binding import binding_of, run
from .support import BACKEND_NAME


def _backend():
    from sglang.srt.layers.moe.utils import resolve_moe_runner_backend

    return resolve_moe_runner_backend(BACKEND_NAME)


class MoEBackendRunnerCore(DispatchMoeRunnerCore):
    """Runs one SGLang MoE layer's experts on its bound :class:`~moe_backend.MoELayer`."""

    @property
    def runner_backend(self):
        return _backend()

    def run_from_dispatch(
        self, dispatch_output: Any, quant_info: Any, runner_config: MoeRunnerConfig, hooks: Any = None
    ) -> StandardCombineInput:
        """``hidden_states [T, H]`` bf16 and its top-k -> ``StandardCombineInput(out [T, H] bf16)``."""
        if hooks is not None:
            raise RuntimeError("moe_backend: LoRA hooks reached the runner (refused at start-up)")
        if getattr(dispatch_output, "hidden_states_scale", None) is not None:
            raise RuntimeError("moe_backend: the dispatcher quantized the activations; ours quantize themselves")
        topk = dispatch_output.topk_output
        out = run(binding_of(runner_config.layer), dispatch_output.hidden_states, topk.topk_ids, topk.topk_weights)
        return StandardCombineInput(hidden_states=out)


def make_runner_core(config: MoeRunnerConfig) -> MoEBackendRunnerCore:
    """The factory registered with SGLang (one core per MoE layer)."""
    return MoEBackendRunnerCore(config)


def register_core() -> None:
    """Register the runner core under :data:`BACKEND_NAME` (once per process)."""
    from sglang.srt.layers.moe.moe_runner import runner

    if BACKEND_NAME not in runner._CUSTOM_RUNNER_CORE_FACTORIES:
        runner.register_moe_runner_core(BACKEND_NAME, make_runner_core)


def make_runner(config: MoeRunnerConfig) -> Any:
    """SGLang's ``MoeRunner`` for our backend (it calls :func:`make_runner_core`)."""
    from sglang.srt.layers.moe.moe_runner.runner import MoeRunner

    return MoeRunner(_backend(), config)
