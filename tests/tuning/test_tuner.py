"""The tuner, with a fake kernel whose cost depends on (config, bucket) and a fake timer.

The fake timer really calls the closure the tuner hands it (so the kernel runs
with the config and inputs under test) and reports the cost the kernel recorded.
"""

import gc
import logging
import weakref

import pytest
import torch

from moe_backend.tuning import tuner as tuner_mod
from moe_backend.tuning.buckets import buckets, map_to_bucket
from moe_backend.tuning.cache import CacheEntry, ProblemSignature, TuningCache
from moe_backend.tuning.tuner import CudaTimer, Tuner, TuningResult, tune

ENV = {"gpu": "fake", "torch": "0", "triton": "0", "cuda": "0"}
SIG = ProblemSignature("fp8_block", 32, 8, 64, 32, num_global_experts=256, kernel="fake", kernel_version=1)
CANDIDATES = [{"BLOCK_M": 16}, {"BLOCK_M": 64}, {"BLOCK_M": 128}]


def best_block_m(t):
    return 16 if t <= 64 else 64 if t <= 512 else 128


class FakeKernel:
    """``run(config, inputs)``: records the call and the cost (µs) a real kernel would take."""

    def __init__(self, fail=()):
        self.calls = []
        self.last_cost = None
        self.fail = fail

    def __call__(self, config, inputs):
        t = inputs["num_tokens"]
        block_m = config.get("BLOCK_M")
        if block_m in self.fail:
            raise RuntimeError(f"out of shared memory for BLOCK_M={block_m}")
        self.calls.append((dict(config), t))
        # The default ({}) is 1.5x slower than the best tile; other tiles 2x.
        self.last_cost = 10.0 + t * (1.0 if block_m == best_block_m(t) else 1.5 if block_m is None else 2.0)


class FakeTimer:
    def __init__(self, kernel):
        self.kernel = kernel
        self.timed = 0

    def __call__(self, fn):
        self.timed += 1
        fn()
        return self.kernel.last_cost


class InputFactory:
    def __init__(self):
        self.built = []

    def __call__(self, t):
        self.built.append(t)
        return {"num_tokens": t}


def run_tune(max_tokens=1024, cache=None, kernel=None, **kw):
    kernel = kernel or FakeKernel()
    timer = FakeTimer(kernel)
    factory = InputFactory()
    result = tune(kernel, CANDIDATES, max_tokens, SIG, cache, factory, timer=timer, progress=False, **kw)
    return result, kernel, timer, factory


def test_the_fastest_candidate_wins_per_bucket():
    result, kernel, timer, factory = run_tune(1024)
    assert factory.built == buckets(1024)
    assert sorted(result.entries) == buckets(1024)
    for t, entry in result.entries.items():
        assert entry.config == {"BLOCK_M": best_block_m(t)}
        assert entry.best_us == pytest.approx(10.0 + t)
        assert entry.default_us == pytest.approx(10.0 + 1.5 * t)
    # Each bucket timed the default and the three candidates on that bucket's inputs.
    assert timer.timed == 4 * len(buckets(1024))
    assert {(tuple(c.items()), t) for c, t in kernel.calls} == {
        (tuple(c.items()), t) for t in buckets(1024) for c in [{}] + CANDIDATES
    }


def test_default_wins_when_nothing_beats_it():
    kernel = FakeKernel()
    timer = FakeTimer(kernel)
    # Candidates that are always slower than the default, plus a duplicate of the default.
    slow = [{"BLOCK_M": 999}, {}, {"BLOCK_M": 999}]
    result = Tuner(kernel, slow, timer=timer).tune(SIG, 8, InputFactory(), progress=False)
    assert all(e.config == {} for e in result.entries.values())
    assert timer.timed == 2 * len(buckets(8))  # duplicates are timed once


def test_failing_candidate_is_skipped_failing_default_raises():
    # Up to 64 tokens BLOCK_M=16 is best; with it failing, the default (1.5x) beats the rest (2x).
    result, *_ = run_tune(64, kernel=FakeKernel(fail=(16,)))
    assert all(e.config == {} for e in result.entries.values())
    with pytest.raises(RuntimeError, match="default config failed at 1 tokens"):
        run_tune(64, kernel=FakeKernel(fail=(None,)))


def test_bad_timer_value_skips_the_candidate():
    kernel = FakeKernel()

    def timer(fn):
        fn()
        return float("nan") if kernel.calls[-1][0] == {"BLOCK_M": 16} else kernel.last_cost

    result = Tuner(kernel, CANDIDATES, timer=timer).tune(SIG, 4, InputFactory(), progress=False)
    assert all(e.config != {"BLOCK_M": 16} for e in result.entries.values())


def test_refuses_inside_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kernel = FakeKernel()
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        run_tune(64, kernel=kernel)
    assert kernel.calls == []


def test_cache_hit_skips_timing_and_inputs(tmp_path):
    first, _, timer1, _ = run_tune(1024, TuningCache(tmp_path, environment=ENV))
    assert timer1.timed > 0 and first.cached == frozenset()
    again, kernel, timer, factory = run_tune(1024, TuningCache(tmp_path, environment=ENV))
    assert timer.timed == 0 and kernel.calls == [] and factory.built == []
    assert again.entries == first.entries
    assert again.cached == frozenset(buckets(1024))
    forced, _, timer3, _ = run_tune(1024, TuningCache(tmp_path, environment=ENV), force=True)
    assert timer3.timed == 4 * len(buckets(1024)) and forced.cached == frozenset()


def test_larger_max_tunes_only_the_new_buckets(tmp_path):
    run_tune(300, TuningCache(tmp_path, environment=ENV))
    result, _, _, factory = run_tune(1024, TuningCache(tmp_path, environment=ENV))
    assert factory.built == [512, 768, 1024]  # 1..256 came from the cache; 300 is not a bucket now
    assert result.cached == frozenset([1, 2, 4, 8, 16, 32, 64, 128, 256])


def test_each_bucket_is_saved_as_it_finishes(tmp_path):
    kernel = FakeKernel()
    timer = FakeTimer(kernel)

    def factory(t):
        if t == 128:
            raise MemoryError("out of memory building the 128-token inputs")
        return {"num_tokens": t}

    with pytest.raises(MemoryError):
        tune(kernel, CANDIDATES, 256, SIG, TuningCache(tmp_path, environment=ENV), factory, timer=timer, progress=False)
    saved = TuningCache(tmp_path, environment=ENV)
    assert [t for t in buckets(256) if saved.get(SIG, t) is not None] == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("max_tokens, min_tokens", [(1024, 1), (300, 1), (100, 10), (5, 5)])
def test_config_for_follows_the_bucket_map(max_tokens, min_tokens):
    result, *_ = run_tune(max_tokens, min_num_tokens=min_tokens)
    for t in range(0, max_tokens + 1):
        assert result.config_for(t) == result.entries[map_to_bucket(t, max_tokens, min_tokens)].config


def test_config_for_beyond_max_warns_once(caplog):
    result, *_ = run_tune(300)
    with caplog.at_level(logging.WARNING, logger=tuner_mod.__name__):
        assert result.config_for(301) == result.entries[300].config
        assert result.config_for(5000) == result.entries[300].config
    records = [r for r in caplog.records if r.name == tuner_mod.__name__]
    assert len(records) == 1
    assert "warm up with max_num_tokens >= 301 to tune bucket 512" in records[0].getMessage()


def test_config_for_needs_no_device(monkeypatch):
    result, *_ = run_tune(64)

    def no_device(*a, **k):
        raise AssertionError("config_for touched the device")

    for name in ("synchronize", "current_device", "is_available", "is_current_stream_capturing"):
        monkeypatch.setattr(torch.cuda, name, no_device)
    assert result.config_for(3) == {"BLOCK_M": 16}


def test_result_keeps_no_reference_to_runner_or_inputs():
    kernel = FakeKernel()
    factory = InputFactory()
    alive = weakref.ref(kernel), weakref.ref(factory)
    gc.disable()
    try:
        result = tune(kernel, CANDIDATES, 64, SIG, None, factory, timer=FakeTimer(kernel), progress=False)
        del kernel, factory
        assert alive[0]() is None and alive[1]() is None
    finally:
        gc.enable()
    assert result.config_for(64) == {"BLOCK_M": 16}


def test_summary_table():
    result, *_ = run_tune(1024)
    lines = result.summary().splitlines()
    assert lines[0] == "tuned fp8_block,E=32/256,k=8,H=64,I=32"
    assert lines[1].split() == ["bucket", "best", "config", "best", "µs", "default", "µs", "speedup"]
    row = lines[2 + buckets(1024).index(512)].split()
    assert row == ["512", '{"BLOCK_M":64}', "522.0", "778.0", "1.49x"]
    assert len(lines) == 2 + len(buckets(1024))


def test_progress_bar_over_buckets(capsys):
    kernel = FakeKernel()
    tune(kernel, CANDIDATES, 16, SIG, None, InputFactory(), timer=FakeTimer(kernel), progress=True)
    err = capsys.readouterr().err
    assert "tuning fp8_block" in err and "5/5" in err


def test_validation():
    kernel = FakeKernel()
    with pytest.raises(TypeError, match="run"):
        Tuner(None, CANDIDATES)
    with pytest.raises(TypeError, match="candidates"):
        Tuner(kernel, {"BLOCK_M": 16})
    with pytest.raises(TypeError, match="config"):
        Tuner(kernel, [{"BLOCK_M": object()}])
    with pytest.raises(TypeError, match="signature"):
        Tuner(kernel, CANDIDATES, timer=FakeTimer(kernel)).tune("fp8", 8, InputFactory())
    with pytest.raises(TypeError, match="make_inputs"):
        Tuner(kernel, CANDIDATES, timer=FakeTimer(kernel)).tune(SIG, 8, None)
    with pytest.raises(ValueError, match="max_num_tokens"):
        Tuner(kernel, CANDIDATES, timer=FakeTimer(kernel)).tune(SIG, 0, InputFactory())
    with pytest.raises(ValueError, match="entries"):
        TuningResult(SIG, 4, 1, {1: CacheEntry({}, 1.0, 1.0)})


def test_cuda_timer_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        CudaTimer()(lambda: None)


@pytest.mark.gpu
def test_cuda_timer_times_with_a_cold_l2():
    timer = CudaTimer(warmup=2, rep=10)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    small = timer(lambda: a[:256] @ a[:, :256])
    large = timer(lambda: a @ a)
    assert 0 < small < large
    flush = timer._flush[torch.cuda.current_device()]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert l2 > 0 and flush.numel() == 2 * l2


@pytest.mark.gpu
def test_tune_on_gpu_picks_the_cheaper_config(tmp_path):
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def run(config, inputs):  # the default repeats the GEMM 4 times, the candidate once
        for _ in range(config.get("repeat", 4)):
            inputs[:, : a.shape[0]] @ a

    result = tune(
        run,
        [{"repeat": 1}, {"repeat": 8}],
        512,
        SIG,
        TuningCache(tmp_path),
        lambda t: torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16),
        timer=CudaTimer(2, 10),
    )
    for t, entry in result.entries.items():
        assert entry.config == {"repeat": 1}, (t, entry)
        assert entry.default_us > 2 * entry.best_us
    assert TuningCache(tmp_path).get(SIG, 512) == result.entries[512]


@pytest.mark.gpu
def test_refuses_inside_a_real_capture():
    kernel = FakeKernel()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
            run_tune(64, kernel=kernel)
        torch.zeros(1, device="cuda").add_(1)  # keep the captured graph non-empty
    assert kernel.calls == []


def test_a_cached_config_that_is_not_a_candidate_is_tuned_anew(tmp_path, caplog):
    cache = TuningCache(tmp_path, environment=ENV)
    cache.put(SIG, 8, CacheEntry({"BLOCK_M": 999}, 1.0, 2.0))  # e.g. edited by hand
    cache.put(SIG, 16, CacheEntry({"BLOCK_M": 16}, 1.0, 2.0))
    cache.save()
    with caplog.at_level(logging.WARNING, logger=tuner_mod.__name__):
        result, kernel, _, _ = run_tune(16, TuningCache(tmp_path, environment=ENV))
    assert result.entries[8].config == {"BLOCK_M": best_block_m(8)} and 8 not in result.cached
    assert 16 in result.cached
    assert any('BLOCK_M":999' in r.getMessage() and "tuning anew" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda k: Tuner(k, CANDIDATES, timer=3), TypeError, "timer: expected a callable"),
        (
            lambda k: Tuner(k, CANDIDATES, timer=FakeTimer(k)).tune(SIG, 8, InputFactory(), "cache_dir"),
            TypeError,
            "cache: expected a TuningCache or None, got str",
        ),
        (
            lambda k: Tuner(k, CANDIDATES, timer=FakeTimer(k)).tune(SIG, 8, InputFactory(), force="no"),
            TypeError,
            "force: expected a bool",
        ),
        (
            lambda k: Tuner(k, CANDIDATES, timer=FakeTimer(k)).tune(SIG, 8, InputFactory(), progress=1),
            TypeError,
            "progress: expected a bool",
        ),
        (
            lambda k: Tuner(k, CANDIDATES, timer=FakeTimer(k)).tune(SIG, 8.0, InputFactory()),
            TypeError,
            "max_num_tokens: expected an int",
        ),
        (
            lambda k: Tuner(k, CANDIDATES, timer=FakeTimer(k)).tune(SIG, 8, InputFactory(), min_num_tokens=9),
            ValueError,
            r"min_num_tokens: expected at most max_num_tokens \(8\)",
        ),
    ],
)
def test_bad_tuner_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(FakeKernel())
