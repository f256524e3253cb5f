"""The JSON tuning cache: location, round trip, one warning per unusable file, atomic writes."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from moe_backend.tuning import cache as cache_mod
from moe_backend.tuning.cache import (
    CacheEntry,
    ProblemSignature,
    TuningCache,
    current_environment,
    default_cache_dir,
)

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.6.0", "cuda": "13.0"}
KERNEL = dict(kernel="sm90_triton_fp8", kernel_version=3)
SIG = ProblemSignature("fp8_block", 32, 8, 7168, 2048, num_global_experts=256, **KERNEL)
ENTRY = CacheEntry({"BLOCK_M": 64, "path": "prefill"}, 412.5, 455.0)


def make(tmp_path, env=ENV):
    return TuningCache(tmp_path, environment=env)


def warnings_of(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == cache_mod.__name__]


def test_round_trip(tmp_path, caplog):
    c = make(tmp_path)
    c.put(SIG, 512, ENTRY)
    c.put(SIG, 1, CacheEntry({}, 10.0, 10.0))
    c.save()
    caplog.clear()
    again = make(tmp_path)
    assert again.get(SIG, 512) == ENTRY
    assert again.get(SIG, 1) == CacheEntry({}, 10.0, 10.0)
    assert again.get(SIG, 256) is None
    assert again.get(ProblemSignature("fp8_block", 32, 8, 7168, 2048, **KERNEL), 512) is None  # ep differs
    assert again.get(replace(SIG, kernel="other"), 512) is None
    assert warnings_of(caplog) == []
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert data["format"] == cache_mod.FORMAT_VERSION == 2 and data["environment"] == ENV
    group = data["kernels"]["sm90_triton_fp8"]
    assert group["version"] == 3
    assert group["entries"]["fp8_block,E=32/256,k=8,H=7168,I=2048,T=512"]["config"] == ENTRY.config


def test_kernel_version_bump_invalidates_only_that_kernel(tmp_path, caplog):
    other = replace(SIG, kernel="sm90_triton_nvfp4", precision="nvfp4", kernel_version=1)
    c = make(tmp_path)
    c.put(SIG, 512, ENTRY)
    c.put(SIG, 1024, ENTRY)
    c.put(other, 512, ENTRY)
    c.save()
    same = make(tmp_path)
    assert same.get(SIG, 512) == ENTRY and same.get(other, 512) == ENTRY  # unchanged version: kept
    bumped = replace(SIG, kernel_version=4)
    c = make(tmp_path)
    assert c.get(bumped, 512) is None and c.get(bumped, 1024) is None
    assert c.get(other, 512) == ENTRY
    caplog.clear()
    new = CacheEntry({"BLOCK_M": 16}, 1.0, 2.0)
    c.put(bumped, 512, new)
    c.save()
    assert warnings_of(caplog) == []
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert data["kernels"]["sm90_triton_fp8"] == {"version": 4, "entries": {SIG.key(512): vars(new)}}
    fresh = make(tmp_path)
    assert fresh.get(bumped, 512) == new
    assert fresh.get(SIG, 512) is None  # going back to version 3 does not resurrect its entries
    assert fresh.get(other, 512) == ENTRY


def test_registered_kernel_versions_come_from_the_launchers():
    from moe_backend.kernels import registry
    from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe

    assert registry.SM90_FP8.tuning_space().version == fp8_moe.KERNEL_VERSION
    assert registry.SM90_NVFP4.tuning_space().version == nvfp4_moe.KERNEL_VERSION
    assert registry.SM90_FP8.tuning_space().candidates == fp8_moe.CANDIDATE_CONFIGS
    assert registry.SM90_FP8.numerics_config("vllm_triton") == fp8_moe.NUMERICS_CONFIGS["vllm_triton"]
    assert registry.SM90_NVFP4.deterministic_config() is None
    assert registry.REFERENCE.tuning_space() is None and not registry.REFERENCE.tunable


def test_missing_warns_once_and_is_written(tmp_path, caplog):
    c = make(tmp_path / "sub")
    assert c.get(SIG, 1) is None and c.get(SIG, 2) is None
    assert len(warnings_of(caplog)) == 1
    c.put(SIG, 1, ENTRY)
    c.save()
    assert len(warnings_of(caplog)) == 1
    assert make(tmp_path / "sub").get(SIG, 1) == ENTRY


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2]",
        '{"format": 99, "environment": {}, "kernels": {}}',
        # format 1 (one flat table keyed on the package version) is not read
        json.dumps(
            {"format": 1, "environment": {**ENV, "moe_backend": "0.1.0"}, "entries": {SIG.key(512): vars(ENTRY)}}
        ),
        json.dumps(
            {
                "format": 2,
                "environment": ENV,
                "kernels": {"sm90_triton_fp8": {"version": 3, "entries": {"k": {"config": [1]}}}},
            }
        ),
        json.dumps(
            {
                "format": 2,
                "environment": ENV,
                "kernels": {
                    "sm90_triton_fp8": {"version": 3, "entries": {"k": {"config": {}, "best_us": "x", "default_us": 1}}}
                },
            }
        ),
        json.dumps({"format": 2, "environment": ENV, "kernels": {"sm90_triton_fp8": {"version": "3", "entries": {}}}}),
        json.dumps({"format": 2, "environment": ENV, "kernels": {"sm90_triton_fp8": {"entries": {}}}}),
        json.dumps({"format": 2, "environment": ENV}),
    ],
)
def test_corrupt_is_ignored_with_one_warning_and_rebuilt(tmp_path, caplog, content):
    (tmp_path / "tuning.json").write_text(content)
    c = make(tmp_path)
    assert c.get(SIG, 512) is None
    assert c.get(SIG, 1) is None
    assert len(warnings_of(caplog)) == 1
    c.put(SIG, 512, ENTRY)
    c.save()
    assert len(warnings_of(caplog)) == 1
    caplog.clear()
    assert make(tmp_path).get(SIG, 512) == ENTRY
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(
    "field, value", [("gpu", "NVIDIA H200"), ("torch", "2.11.0"), ("triton", "3.5.0"), ("cuda", "12.8")]
)
def test_other_environment_is_ignored_and_replaced(tmp_path, caplog, field, value):
    old = make(tmp_path, {**ENV, field: value})
    old.put(SIG, 512, ENTRY)
    old.put(SIG, 1024, ENTRY)
    old.save()
    caplog.clear()
    c = make(tmp_path)
    assert c.get(SIG, 512) is None
    assert c.get(SIG, 1024) is None
    assert len(warnings_of(caplog)) == 1
    assert "written for" in warnings_of(caplog)[0].getMessage()
    new = CacheEntry({"BLOCK_M": 16}, 1.0, 2.0)
    c.put(SIG, 512, new)
    c.save()
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert data["environment"] == ENV
    assert list(data["kernels"]["sm90_triton_fp8"]["entries"]) == [SIG.key(512)]  # the foreign entries are gone


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    c = make(tmp_path)
    c.put(SIG, 1, ENTRY)
    c.save()
    before = (tmp_path / "tuning.json").read_bytes()

    def half_dump(obj, f, **kw):
        f.write('{"format": 2, "kern')  # a partial payload, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.json, "dump", half_dump)
    c.put(SIG, 2, ENTRY)
    with pytest.raises(OSError, match="disk full"):
        c.save()
    assert (tmp_path / "tuning.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]


def test_failed_replace_leaves_no_temporary(tmp_path, monkeypatch):
    c = make(tmp_path)
    c.put(SIG, 1, ENTRY)

    def no_replace(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(cache_mod.os, "replace", no_replace)
    with pytest.raises(PermissionError):
        c.save()
    assert list(tmp_path.iterdir()) == []


def test_save_merges_entries_saved_meanwhile(tmp_path):
    # Two ranks tuning different layers in parallel: neither save loses the other's entries.
    a, b = make(tmp_path), make(tmp_path)
    assert a.get(SIG, 1) is None and b.get(SIG, 1) is None
    a.put(SIG, 1, ENTRY)
    a.save()
    b.put(SIG, 2, ENTRY)
    b.save()
    fresh = make(tmp_path)
    assert fresh.get(SIG, 1) == ENTRY and fresh.get(SIG, 2) == ENTRY


def test_save_keeps_own_version_over_one_saved_meanwhile(tmp_path):
    # A process of the old kernel saved after this one read: each save keeps its own version.
    new, old = make(tmp_path), make(tmp_path)
    new.put(replace(SIG, kernel_version=4), 1, ENTRY)
    old.put(SIG, 2, ENTRY)
    old.save()
    new.save()
    fresh = make(tmp_path)
    assert fresh.get(replace(SIG, kernel_version=4), 1) == ENTRY and fresh.get(SIG, 2) is None


def test_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_BACKEND_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "moe_backend"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "moe_backend"
    monkeypatch.setenv("MOE_BACKEND_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert TuningCache(environment=ENV).path == tmp_path / "mine" / "tuning.json"
    assert TuningCache(tmp_path / "arg", environment=ENV).path == tmp_path / "arg" / "tuning.json"
    assert TuningCache(str(tmp_path), environment=ENV).path == Path(tmp_path) / "tuning.json"


def test_current_environment():
    env = current_environment()
    # The package version is not part of it: kernel versions say when configurations go stale.
    assert set(env) == {"gpu", "torch", "triton", "cuda"}
    assert all(isinstance(v, str) and v for v in env.values())


def test_put_rejects_configs_json_cannot_hold(tmp_path):
    c = make(tmp_path)
    for bad in ({"a": object()}, {1: 2}, ["BLOCK_M"], {"x": float("nan")}):
        with pytest.raises(TypeError, match="config"):
            c.put(SIG, 1, CacheEntry(bad, 1.0, 1.0))


def test_signature():
    assert SIG.key(64) == "fp8_block,E=32/256,k=8,H=7168,I=2048,T=64"
    assert ProblemSignature("nvfp4", 8, 2, 64, 32, **KERNEL).num_global_experts == 8
    with pytest.raises(ValueError, match="precision"):
        ProblemSignature("int8", 8, 2, 64, 32, **KERNEL)
    with pytest.raises(ValueError, match="num_global_experts"):
        ProblemSignature("bf16", 8, 2, 64, 32, num_global_experts=4, **KERNEL)
    with pytest.raises(TypeError, match="hidden_size"):
        ProblemSignature("bf16", 8, 2, 64.0, 32, **KERNEL)
    with pytest.raises(TypeError, match="kernel"):
        ProblemSignature("bf16", 8, 2, 64, 32, kernel="", kernel_version=1)
    with pytest.raises(ValueError, match="kernel_version"):
        ProblemSignature("bf16", 8, 2, 64, 32, kernel="k", kernel_version=0)
    with pytest.raises(TypeError):  # the kernel is keyword-only and required
        ProblemSignature("bf16", 8, 2, 64, 32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: TuningCache(123), TypeError, "cache_dir: expected a str or os.PathLike directory, got int 123"),
        (lambda p: TuningCache([p]), TypeError, "cache_dir: expected a str or os.PathLike"),
        (lambda p: TuningCache(p, environment={"gpu": 1}), TypeError, "environment: expected a dict of str to str"),
        (lambda p: TuningCache(p, environment=[("gpu", "x")]), TypeError, "environment: expected a dict"),
        (lambda p: make(p).get("fp8_block", 8), TypeError, "signature: expected a ProblemSignature, got str"),
        (lambda p: make(p).get(SIG, 0), ValueError, "bucket: expected an int >= 1"),
        (lambda p: make(p).get(SIG, "8"), TypeError, "bucket: expected an int"),
        (
            lambda p: make(p).put(SIG, 8, {"config": {}, "best_us": 1.0, "default_us": 1.0}),
            TypeError,
            "entry: expected a CacheEntry, got dict",
        ),
        (lambda p: CacheEntry({}, 0.0, 1.0), ValueError, "best_us: expected a finite positive float"),
        (lambda p: CacheEntry({}, 1.0, float("nan")), ValueError, "default_us: expected a finite positive float"),
        (lambda p: CacheEntry({}, "1", 1.0), TypeError, "best_us: expected a float"),
        (lambda p: CacheEntry([], 1.0, 1.0), TypeError, "config: expected a dict"),
    ],
)
def test_bad_arguments_are_named(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"config": {}, "best_us": 0, "default_us": 1.0},
        {"config": {}, "best_us": -3.0, "default_us": 1.0},
        {"config": {}, "best_us": "fast", "default_us": 1.0},
        {"config": "BLOCK_M=64", "best_us": 1.0, "default_us": 1.0},
        {"best_us": 1.0, "default_us": 1.0},
    ],
)
def test_a_file_with_a_bad_entry_is_ignored_with_one_warning(tmp_path, caplog, entry):
    (tmp_path / "tuning.json").write_text(
        json.dumps(
            {
                "format": 2,
                "environment": ENV,
                "kernels": {KERNEL["kernel"]: {"version": KERNEL["kernel_version"], "entries": {SIG.key(8): entry}}},
            }
        )
    )
    cache = make(tmp_path)
    with caplog.at_level(logging.WARNING, logger=cache_mod.__name__):
        assert cache.get(SIG, 8) is None and cache.get(SIG, 16) is None
    assert len(warnings_of(caplog)) == 1 and "malformed entry" in warnings_of(caplog)[0].getMessage()
