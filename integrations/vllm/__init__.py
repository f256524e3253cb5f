"""vLLM adapter (installed as ``moe_backend.integrations.vllm``).

``register()`` is the ``vllm.general_plugins`` entry point: vLLM calls it in the
CLI process, the engine core and every worker, so it is idempotent. After it
runs, ``--moe-backend moe_backend`` (or ``moe-backend``) is a valid choice, and
every MoE layer of an FP8 block-scale, FP8 per-tensor or ModelOpt NVFP4
checkpoint served with it runs :class:`~moe_backend.MoELayer` through vLLM's
modular-kernel experts interface. See ``docs/vllm.md``.

Module map: ``surface`` (every vLLM symbol the plugin patches, checked at start-up),
``compat`` (the one place that knows vLLM versions), ``names``
(accept the name in the CLI and configs), ``support`` (start-up refusals),
``convert`` (vLLM layer -> our weights, once after loading), ``experts`` (the
``FusedMoEExpertsModular`` subclass), ``oracle`` (route the layers),
``capture`` (routed-experts capture), ``warmup`` (tuning before graph capture).
"""

from __future__ import annotations

import logging

from .support import BACKEND_NAME, UnsupportedByMoEBackend

logger = logging.getLogger(__name__)

_registered = False


class _ToVllmHandlers(logging.Handler):
    """Hands our records to the handlers vLLM's ``vllm`` logger has when they are emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if record.levelno < vllm_logger.getEffectiveLevel():
            return
        for handler in vllm_logger.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _log_through_vllm() -> None:
    """Show our INFO lines (registration, tuning times, capture) in vLLM's log.

    vLLM gives a handler to its own ``vllm`` logger only (and may configure it after
    plugins load), so ``moe_backend.*`` records would be dropped. Unless the application
    configured logging itself (a handler on the root or on ``moe_backend``), ours are
    passed to whatever handlers ``vllm`` has at the time, at its level.
    """
    ours = logging.getLogger("moe_backend")
    if ours.handlers or logging.getLogger().handlers:
        return
    ours.addHandler(_ToVllmHandlers())
    ours.setLevel(min(logging.INFO, logging.getLogger("vllm").getEffectiveLevel()))
    ours.propagate = False


def register() -> None:
    """Install the plugin into the running vLLM (idempotent, once per process)."""
    global _registered
    if _registered:
        return
    from . import capture, names, oracle, support, warmup
    from .compat import vllm_version
    from .surface import check_surface

    check_surface(vllm_version())  # before patching anything: all or nothing
    _log_through_vllm()
    names.accept_backend_name()
    support.install_config_check()
    oracle.route_layers()
    capture.install()
    warmup.install()
    _registered = True
    logger.info(
        "moe_backend: registered with vLLM %s as --moe-backend %s", ".".join(map(str, vllm_version())), BACKEND_NAME
    )


__all__ = ["BACKEND_NAME", "UnsupportedByMoEBackend", "register"]
