"""The optional CuTe DSL / QuACK dependency: a missing package is a reason, never an import error."""

import importlib.util
import os
from pathlib import Path

import pytest

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


@pytest.mark.skipif(cute_env.quack_unavailable_reason() is not None, reason="needs nvidia-cutlass-dsl and quack")
def test_offline_compile_answers_the_grid_query_and_restores(monkeypatch):
    import quack.gemm_runtime.host as host

    monkeypatch.setenv("QUACK_ARCH", "90")
    query = host.get_max_active_clusters
    with cute_env.offline_compile(sm_count=132):
        assert host.get_max_active_clusters(2) == 66
    assert host.get_max_active_clusters is query


def test_pin_offline_arch_refuses_a_late_change(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cutlass", object())
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_100a")
    with pytest.raises(RuntimeError, match="already imported"):
        cute_env.pin_offline_arch("sm_90a")
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    cute_env.pin_offline_arch("sm_90a")
    assert os.environ["QUACK_ARCH"] == "90"


@pytest.mark.skipif(cute_env.quack_unavailable_reason() is not None, reason="needs nvidia-cutlass-dsl and quack")
def test_our_kernel_sources_are_in_quacks_cache_fingerprint(monkeypatch):
    """QuACK's disk-cache key names a kernel class by qualified name only: our sources must move
    its fingerprint, or a changed kernel of ours would load the object built from the old one."""
    import quack.cache
    from quack.cache import jit

    ours = Path(cute_env.__file__).resolve().parent
    monkeypatch.setattr(quack.cache, "EXTRA_SOURCE_DIRS", [])
    jit._compute_source_fingerprint.cache_clear()
    without = jit._compute_source_fingerprint()
    cute_env.fingerprint_kernel_sources()
    assert quack.cache.EXTRA_SOURCE_DIRS == [ours]
    jit._compute_source_fingerprint.cache_clear()
    assert jit._compute_source_fingerprint() != without
    jit._compute_source_fingerprint.cache_clear()


class _Cyclic:
    """An object kept alive only by a reference cycle (as a first CuTe DSL launch leaves one)."""

    def __init__(self):
        self.me = self


def test_first_launch_of_a_plan_collects_the_cycles_left_behind(monkeypatch):
    import gc
    import weakref

    monkeypatch.setattr(cute_env, "_LAUNCHED", set())
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    gc.disable()
    try:
        ref = weakref.ref(_Cyclic())
        assert ref() is not None
        cute_env.collect_after_first_launch(("plan", 1))
        assert ref() is None and len(collections) == 1
        cute_env.collect_after_first_launch(("plan", 1))  # a plan's later launches do not collect
        assert len(collections) == 1
        monkeypatch.setattr(cute_env, "capturing", lambda: True)
        cute_env.collect_after_first_launch(("plan", 2))  # not inside a capture: the next eager launch does
        assert len(collections) == 1
        monkeypatch.setattr(cute_env, "capturing", lambda: False)
        cute_env.collect_after_first_launch(("plan", 2))
        assert len(collections) == 2
    finally:
        gc.enable()
