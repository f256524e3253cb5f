"""SGLang adapter (installed as ``moe_backend.integrations.sglang``).

``register()`` is the ``sglang.srt.plugins`` entry point: SGLang's
``load_plugins()`` calls it in the launcher and in every scheduler process
before it parses arguments or builds a model, then applies the hooks plugins
registered; ``register()`` is idempotent. After it runs,
``--moe-runner-backend moe_backend`` is a valid choice, and every MoE layer of an
FP8 block-scale, FP8 per-tensor or ModelOpt NVFP4 checkpoint served with it runs
:class:`~moe_backend.MoELayer` through SGLang's runner-core interface. See
``docs/sglang.md``.

Module map: ``compat`` (the table of SGLang internals used, checked at start-up),
``names`` (accept the name in the CLI), ``support`` (start-up refusals),
``methods`` (our quantization methods and the hooks that hand them to MoE
layers), ``binding`` (SGLang layer -> our layer, once after loading), ``runner``
(the registered runner core), ``capture`` (routed-experts capture), ``warmup``
(tuning before graph capture).
"""

from __future__ import annotations

import logging

from .support import BACKEND_NAME, UnsupportedByMoEBackend

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Install the plugin into the running SGLang (idempotent, once per process).

    Raises ``RuntimeError`` listing every missing symbol on an SGLang version
    without the internals the plugin uses (``compat.SYMBOLS``). The hooks take effect
    when SGLang's ``load_plugins()`` applies them, right after its plugins ran.
    """
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import compat, methods, names, runner, warmup

    compat.check_symbols()
    names.accept_backend_name()
    runner.register_core()
    for hooks, kind in (
        (methods.AROUND_HOOKS, HookType.AROUND),
        (warmup.AROUND_HOOKS, HookType.AROUND),
        (methods.AFTER_HOOKS, HookType.AFTER),
    ):
        for target, hook in hooks.items():
            HookRegistry.register(target, hook, kind)
    _registered = True
    logger.info(
        "moe_backend: registered with SGLang %s as --moe-runner-backend %s",
        ".".join(map(str, compat.sglang_version())),
        BACKEND_NAME,
    )


__all__ = ["BACKEND_NAME", "UnsupportedByMoEBackend", "register"]
