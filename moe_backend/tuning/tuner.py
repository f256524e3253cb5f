"""The autotuner: time candidate configurations per token bucket, keep the fastest, persist it.

Warm-up tunes exactly the buckets the engine can produce (``buckets(max_num_tokens)``)
before CUDA-graph capture; a call during a capture raises. For each bucket not
already in the cache, the kernel's default configuration and every candidate
run on the bucket's profiling inputs; the fastest median time wins (the default
on ties). Timings flush the L2 between iterations so no tactic wins through
cache reuse that serving never sees (between two calls of one layer, the other
layers' weights evict its own).

The result, :class:`TuningResult`, holds configurations only (no reference to
the runner, the inputs or the tuner, so a layer keeping it creates no cycle);
its :meth:`~TuningResult.config_for` maps a batch size to a configuration with
host integer work alone, so it can run inside a captured forward.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import statistics
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from tqdm import tqdm

from .._checks import capturing, check_bool, check_int
from .buckets import buckets, map_to_bucket_uncapped
from .cache import CacheEntry, Config, ProblemSignature, TuningCache, check_config

logger = logging.getLogger(__name__)

#: ``run(config, inputs)`` launches the kernel once with ``config`` (``{}``: its default).
Runner = Callable[[Config, Any], None]
#: ``make_inputs(num_tokens)`` builds the profiling inputs of one bucket.
InputFactory = Callable[[int], Any]
#: ``timer(fn)`` returns the median time of ``fn()`` in microseconds.
Timer = Callable[[Callable[[], None]], float]

_FALLBACK_L2_BYTES = 64 << 20  # when the device does not report its L2 size (H100: 50 MiB)


class CudaTimer:
    """Median CUDA-event time (µs) of ``fn`` over ``rep`` runs after ``warmup`` runs.

    Before each timed run a buffer twice the L2 size is zeroed, outside the events,
    so every run reads its weights and activations from device memory.
    """

    def __init__(self, warmup: int = 3, rep: int = 20) -> None:
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.rep = check_int("rep", rep, minimum=1)
        self._flush: Dict[int, torch.Tensor] = {}  # per device

    def __call__(self, fn: Callable[[], None]) -> float:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaTimer: timing a kernel needs a CUDA GPU")
        flush = self._flush_buffer(torch.cuda.current_device())
        for _ in range(self.warmup):  # also compiles (Triton JIT) before timing
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        for start, end in zip(starts, ends, strict=True):
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3

    def _flush_buffer(self, device: int) -> torch.Tensor:
        if device not in self._flush:
            props = torch.cuda.get_device_properties(device)
            l2 = getattr(props, "L2_cache_size", 0) or _FALLBACK_L2_BYTES
            self._flush[device] = torch.empty(2 * l2, dtype=torch.int8, device=device)
        return self._flush[device]


def _config_text(config: Config) -> str:
    return json.dumps(config, separators=(",", ":")) if config else "default"


def _config_id(config: Config) -> str:
    return json.dumps(config, sort_keys=True)


class TuningResult:
    """Tuned configurations of one problem for ``buckets(max_num_tokens, min_num_tokens)``.

    ``entries`` maps every bucket to its :class:`CacheEntry`; ``cached`` lists the
    buckets that came from the cache without timing.
    """

    def __init__(
        self,
        signature: ProblemSignature,
        max_num_tokens: int,
        min_num_tokens: int,
        entries: Dict[int, CacheEntry],
        cached: Sequence[int] = (),
    ) -> None:
        expected = buckets(max_num_tokens, min_num_tokens)
        if sorted(entries) != expected:
            raise ValueError(f"entries: expected the buckets {expected}, got {sorted(entries)}")
        self.signature = signature
        self.max_num_tokens = max_num_tokens
        self.min_num_tokens = min_num_tokens
        self.entries = dict(entries)
        self.cached = frozenset(cached)
        # Lookup tables for config_for: sorted bucket bounds and their configs.
        self._bounds = tuple(expected)
        self._configs = tuple(self.entries[b].config for b in expected)
        self._warned_beyond_max = False

    def config_for(self, num_tokens: int) -> Config:
        """The configuration serving a batch of ``num_tokens`` (an int ``>= 0``).

        Host-only (a bisection over the buckets; no device access, no allocation), so it
        is safe on the forward path and inside a CUDA-graph capture. Treat the returned
        dict as read-only. A batch above ``max_num_tokens`` gets the largest bucket's
        configuration and a one-time warning: the engine promised no such batch.
        """
        i = bisect.bisect_left(self._bounds, num_tokens)
        if i < len(self._bounds):
            return self._configs[i]
        if not self._warned_beyond_max:
            self._warned_beyond_max = True
            logger.warning(
                "%d tokens exceed the tuned max_num_tokens=%d: serving with the config of bucket %d; "
                "warm up with max_num_tokens >= %d to tune bucket %d",
                num_tokens,
                self.max_num_tokens,
                self.max_num_tokens,
                num_tokens,
                map_to_bucket_uncapped(num_tokens, self.max_num_tokens, self.min_num_tokens),
            )
        return self._configs[-1]

    def summary(self) -> str:
        """A table: bucket, best config, best µs, default µs, speedup (``*``: from the cache)."""
        rows = [
            (
                f"{b}{'*' if b in self.cached else ''}",
                _config_text(e.config),
                f"{e.best_us:.1f}",
                f"{e.default_us:.1f}",
                f"{e.default_us / e.best_us:.2f}x",
            )
            for b, e in sorted(self.entries.items())
        ]
        header = ("bucket", "best config", "best µs", "default µs", "speedup")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in [header] + rows
        ]
        return "\n".join([f"tuned {self.signature.name}"] + lines)


class Tuner:
    """Times ``candidates`` (config dicts) against ``default`` with ``run`` per bucket.

    ``timer`` defaults to :class:`CudaTimer`. A candidate that raises (e.g. a tile that
    needs more shared memory than the GPU has) is skipped; the default must run.
    The tuner is transient: keep only the :class:`TuningResult`.
    """

    def __init__(
        self,
        run: Runner,
        candidates: Sequence[Config],
        *,
        default: Optional[Config] = None,
        timer: Optional[Timer] = None,
    ) -> None:
        if not callable(run):
            raise TypeError(f"run: expected a callable run(config, inputs), got {type(run).__name__}")
        if isinstance(candidates, dict) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates: expected a sequence of config dicts, got {type(candidates).__name__}")
        self.run = run
        self.default = check_config({} if default is None else default)
        # Candidates equal to the default or to each other are timed once.
        seen = {_config_id(self.default)}
        self.candidates = []
        for config in candidates:
            if _config_id(check_config(config)) not in seen:
                seen.add(_config_id(config))
                self.candidates.append(config)
        self._known = seen
        if timer is not None and not callable(timer):
            raise TypeError(f"timer: expected a callable timer(fn) -> µs, got {type(timer).__name__}")
        self.timer: Timer = timer if timer is not None else CudaTimer()

    def tune(
        self,
        signature: ProblemSignature,
        max_num_tokens: int,
        make_inputs: InputFactory,
        cache: Optional[TuningCache] = None,
        *,
        min_num_tokens: int = 1,
        force: bool = False,
        progress: bool = True,
    ) -> TuningResult:
        """Tune every bucket of ``buckets(max_num_tokens, min_num_tokens)``.

        Buckets found in ``cache`` are not timed unless ``force``; new results are saved
        to ``cache`` after each bucket (a crash keeps the buckets already done). A cached
        configuration that is neither the default nor a candidate (a cache edited by hand, or
        written by a kernel of another version) is tuned anew, with a warning.
        Raises RuntimeError inside a CUDA-graph capture.
        """
        if capturing():
            raise RuntimeError("autotuning cannot run inside a CUDA graph capture: warm up (tune) before capturing")
        if not isinstance(signature, ProblemSignature):
            raise TypeError(f"signature: expected a ProblemSignature, got {type(signature).__name__}")
        if cache is not None and not isinstance(cache, TuningCache):
            raise TypeError(f"cache: expected a TuningCache or None, got {type(cache).__name__}")
        check_bool("force", force)
        check_bool("progress", progress)
        if not callable(make_inputs):
            raise TypeError(
                f"make_inputs: expected a callable make_inputs(num_tokens), got {type(make_inputs).__name__}"
            )
        entries: Dict[int, CacheEntry] = {}
        cached = []
        bar = tqdm(
            buckets(max_num_tokens, min_num_tokens),
            desc=f"tuning {signature.name}",
            unit="bucket",
            disable=not progress,
        )
        for bucket in bar:
            bar.set_postfix(T=bucket)
            hit = None if force or cache is None else cache.get(signature, bucket)
            if hit is not None and _config_id(hit.config) not in self._known:
                logger.warning(
                    "%s at %d tokens: the cached config %s is not one of this kernel's; tuning anew",
                    signature.name,
                    bucket,
                    _config_text(hit.config),
                )
                hit = None
            if hit is not None:
                entries[bucket] = hit
                cached.append(bucket)
                continue
            entries[bucket] = self._tune_bucket(bucket, make_inputs(bucket))
            if cache is not None:
                cache.put(signature, bucket, entries[bucket])
                cache.save()
        result = TuningResult(signature, max_num_tokens, min_num_tokens, entries, cached)
        logger.info("%s", result.summary())
        return result

    def _tune_bucket(self, bucket: int, inputs: Any) -> CacheEntry:
        try:
            default_us = self._time(self.default, inputs)
        except Exception as exc:
            raise RuntimeError(f"the default config failed at {bucket} tokens: {exc}") from exc
        best, best_us = self.default, default_us
        for config in self.candidates:
            try:
                us = self._time(config, inputs)
            except Exception as exc:  # an infeasible tactic: skip it, as Triton's autotuner does
                logger.debug("bucket %d: config %s failed: %s", bucket, _config_text(config), exc)
                continue
            if us < best_us:
                best, best_us = config, us
        logger.debug("bucket %d: best %s %.1f us (default %.1f us)", bucket, _config_text(best), best_us, default_us)
        return CacheEntry(best, best_us, default_us)

    def _time(self, config: Config, inputs: Any) -> float:
        us = self.timer(lambda: self.run(config, inputs))
        if not (math.isfinite(us) and us > 0):
            raise ValueError(f"timer returned {us} us")
        return us


def tune(
    kernel_runner: Runner,
    candidates: Sequence[Config],
    max_num_tokens: int,
    signature: ProblemSignature,
    cache: Optional[TuningCache],
    make_inputs: InputFactory,
    *,
    min_num_tokens: int = 1,
    default: Optional[Config] = None,
    timer: Optional[Timer] = None,
    force: bool = False,
    progress: bool = True,
) -> TuningResult:
    """Tune ``kernel_runner`` over ``candidates`` for every bucket up to ``max_num_tokens``.

    ``kernel_runner(config, inputs)`` launches the kernel once; ``make_inputs(T)`` builds a
    bucket's inputs (e.g. :func:`moe_backend.tuning.inputs.moe_inputs`). See :class:`Tuner`.
    """
    tuner = Tuner(kernel_runner, candidates, default=default, timer=timer)
    return tuner.tune(
        signature, max_num_tokens, make_inputs, cache, min_num_tokens=min_num_tokens, force=force, progress=progress
    )
