"""Make ``moe_backend`` a valid value of vLLM's ``--moe-backend``.

vLLM has no registry for out-of-tree MoE backends: the choices are the
``MoEBackend`` Literal in ``vllm/config/kernel.py``; argparse derives its
``choices`` from it (through the ``_compute_kwargs`` cache in
``engine/arg_utils.py``) and pydantic validates ``KernelConfig`` and
``SpeculativeConfig`` against it. Extending the Literal, re-annotating both
fields and rebuilding their pydantic validators makes the CLI and config
validation accept the name while any other unknown name is still rejected.
``-`` is normalised to ``_`` by vLLM, so ``moe-backend`` is accepted too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

from .support import BACKEND_NAME


def _retype_field(cls: Any, field_type: object) -> None:
    """Point the ``moe_backend`` field of the pydantic dataclass ``cls`` at ``field_type``."""
    from pydantic.dataclasses import rebuild_dataclass

    cls.__annotations__["moe_backend"] = field_type
    cls.__dataclass_fields__["moe_backend"].type = field_type
    # force=True: the validator was already built against the old Literal.
    rebuild_dataclass(cls, force=True)


def accept_backend_name() -> None:
    """Extend the ``MoEBackend`` Literal with :data:`BACKEND_NAME` (idempotent)."""
    import vllm.config.kernel as kernel
    import vllm.engine.arg_utils as arg_utils
    from vllm.config.kernel import KernelConfig
    from vllm.config.speculative import SpeculativeConfig

    names = get_args(kernel.MoEBackend)
    if BACKEND_NAME in names:
        return
    extended = Literal[(*names, BACKEND_NAME)]  # type: ignore[valid-type]
    kernel.MoEBackend = extended
    _retype_field(KernelConfig, extended)
    _retype_field(SpeculativeConfig, Optional[extended])
    # EngineArgs is a plain dataclass: its annotation only documents the type.
    arg_utils.EngineArgs.__dataclass_fields__["moe_backend"].type = extended
    # Parsers built from now on must see the new choice.
    arg_utils._compute_kwargs.cache_clear()


def vllm_backend_names() -> tuple:
    """vLLM's own MoE backend names (the Literal without ours)."""
    import vllm.config.kernel as kernel

    return tuple(n for n in get_args(kernel.MoEBackend) if n != BACKEND_NAME)


__all__ = ["accept_backend_name", "vllm_backend_names"]
