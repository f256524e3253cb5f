"""The optional CuTe DSL / QuACK dependency: a missing package is a reason, never an import error."""

import importlib.util
import os

from moe_backend.kernels.sm90 import cute_env


def test_missing_package_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "quack" else real(name, *a))
    cute_env.quack_unavailable_reason.cache_clear()
    try:
        reason = cute_env.quack_unavailable_reason()
    finally:
        cute_env.quack_unavailable_reason.cache_clear()
    assert reason is not None and "'quack' is not installed" in reason and "quack-kernels==0.6.5" in reason


def test_offline_arch_sets_and_restores(monkeypatch):
    monkeypatch.delenv("QUACK_ARCH", raising=False)
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_100a")
    with cute_env.offline_arch("sm_90a"):
        assert os.environ["CUTE_DSL_ARCH"] == "sm_90a" and os.environ["QUACK_ARCH"] == "90"
    assert os.environ["CUTE_DSL_ARCH"] == "sm_100a" and "QUACK_ARCH" not in os.environ
