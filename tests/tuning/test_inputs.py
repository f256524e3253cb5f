"""Profiling inputs: the approximate-max-load top-k of one EP rank and the seeded generators."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_backend.tuning.inputs import (
    expert_quotas,
    moe_inputs,
    profiling_hidden,
    profiling_router_logits,
    profiling_topk,
    rank_load,
)

REPO = Path(__file__).resolve().parents[2]


def check_assignment(ids, weights, t, k, num_experts, num_local, offset):
    """Every invariant of a profiling top-k; returns the per-local-expert token counts."""
    assert ids.shape == (t, k) and ids.dtype == torch.int32
    assert weights.shape == (t, k) and weights.dtype == torch.float32
    assert ((ids >= 0) & (ids < num_experts)).all()  # all slots filled with global ids
    assert all(len(set(row)) == k for row in ids.tolist())  # no token gets an expert twice
    local = (ids >= offset) & (ids < offset + num_local)
    counts = torch.bincount((ids[local] - offset).long(), minlength=num_local).tolist()
    assert counts == expert_quotas(t, k, num_experts, num_local)
    if t:
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(t))
    return counts


def test_load_formula():
    # T=16, k=8, EP8 of 256 experts: avg = 16, load = ceil(16 + sqrt(16 ln 8)) = 22.
    assert rank_load(16, 8, 256, 32) == math.ceil(16 + math.sqrt(16 * math.log(8))) == 22
    assert rank_load(16, 8, 256, 256) == 16 * 8  # ep = 1: every pair is local
    assert rank_load(1, 8, 256, 32) == 3  # ceil(1 + sqrt(ln 8)) = 3
    assert rank_load(1, 1, 2, 1) == 1  # ceil(1.09) = 2, capped at T*k
    assert rank_load(10, 8, 8, 4) == 40  # capped at T*E_local (E_local < k)
    assert rank_load(0, 8, 256, 32) == 0


def test_quotas_split_evenly_remainder_first():
    quotas = expert_quotas(16, 8, 256, 32)
    assert sum(quotas) == 22
    assert quotas == [1] * 22 + [0] * 10
    # T=100: load = ceil(100 + sqrt(100 ln 8)) = 115 = 3 * 32 + 19.
    assert expert_quotas(100, 8, 256, 32) == [4] * 19 + [3] * 13
    assert rank_load(100, 8, 256, 32) == 115


@pytest.mark.parametrize("num_experts, ep_size", [(256, 8), (256, 1), (64, 4), (8, 2), (16, 16)])
@pytest.mark.parametrize("t, k", [(0, 8), (1, 8), (1, 1), (37, 1), (37, 8), (200, 8)])
def test_every_ep_rank(num_experts, ep_size, t, k):
    k = min(k, num_experts)
    num_local = num_experts // ep_size
    for rank in range(ep_size):
        ids, w = profiling_topk(t, k, num_experts, num_local, rank * num_local, seed=rank)
        check_assignment(ids, w, t, k, num_experts, num_local, rank * num_local)


def test_zero_quota_experts_receive_nothing():
    # T=1, k=8, EP8: load 3 over 32 local experts; experts 3..31 have quota 0.
    ids, _ = profiling_topk(1, 8, 256, 32, 96, seed=3)
    local = sorted(i for i in ids[0].tolist() if 96 <= i < 128)
    assert local == [96, 97, 98]


def test_fewer_local_experts_than_k():
    # E_local = 4 < k = 8: every token holds all of the rank's experts plus 4 remote ones.
    ids, w = profiling_topk(10, 8, 8, 4, 4)
    check_assignment(ids, w, 10, 8, 8, 4, 4)
    assert all(set(range(4, 8)) <= set(row) for row in ids.tolist())


def test_balanced_over_tokens():
    # Local slots per token differ by at most one (the "most free slots first" rule).
    ids, _ = profiling_topk(300, 8, 256, 32, 32, seed=5)
    per_token = ((ids >= 32) & (ids < 64)).sum(1)
    assert per_token.max() - per_token.min() <= 1


@settings(max_examples=100, deadline=None)
@given(
    t=st.integers(0, 64), num_local=st.integers(1, 16), ep=st.integers(1, 8), extra=st.integers(0, 3), data=st.data()
)
def test_invariants_any_shape(t, num_local, ep, extra, data):
    # `extra` experts make E_global / E_local non-integral (e.g. a fused shared expert).
    num_experts = num_local * ep + extra
    k = data.draw(st.integers(1, min(num_experts, 9)))
    offset = data.draw(st.integers(0, num_experts - num_local))
    seed = data.draw(st.integers(0, 2**31))
    ids, w = profiling_topk(t, k, num_experts, num_local, offset, seed=seed)
    counts = check_assignment(ids, w, t, k, num_experts, num_local, offset)
    assert max(counts) <= t


def test_deterministic_and_seed_dependent():
    a = profiling_topk(64, 8, 256, 32, 64, seed=7)
    b = profiling_topk(64, 8, 256, 32, 64, seed=7)
    c = profiling_topk(64, 8, 256, 32, 64, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(profiling_hidden(5, 16, seed=1), profiling_hidden(5, 16, seed=1))
    assert not torch.equal(profiling_hidden(5, 16, seed=1), profiling_hidden(5, 16, seed=2))
    assert torch.equal(profiling_router_logits(5, 16, seed=1), profiling_router_logits(5, 16, seed=1))


_DIGEST = """
import hashlib, torch
from moe_backend.tuning.inputs import moe_inputs, profiling_router_logits
x = moe_inputs(48, 32, 8, 256, 32, 64, seed=11)
h = hashlib.sha256()
for t in (x.hidden.view(torch.int16), x.topk_ids, x.topk_weights, profiling_router_logits(48, 256, seed=11)):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_identical_across_processes():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = {}
    exec(_DIGEST.replace("print(h.hexdigest())", "digest = h.hexdigest()"), here)
    assert out == here["digest"]
    assert len(out) == 64  # a real digest came back


def test_generators_shapes_and_dtypes():
    h = profiling_hidden(3, 8)
    assert h.shape == (3, 8) and h.dtype == torch.bfloat16
    assert profiling_hidden(3, 8, dtype=torch.float32).dtype == torch.float32
    logits = profiling_router_logits(3, 16)
    assert logits.shape == (3, 16) and logits.dtype == torch.float32
    assert profiling_hidden(0, 8).shape == (0, 8)
    x = moe_inputs(6, 8, 2, 16, 4, 4, seed=2)
    assert x.hidden.shape == (6, 8) and x.topk_ids.shape == (6, 2) and x.topk_weights.shape == (6, 2)
    check_assignment(x.topk_ids, x.topk_weights, 6, 2, 16, 4, 4)


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: profiling_topk(-1, 8, 256, 32), ValueError, "num_tokens"),
        (lambda: profiling_topk(4, 0, 256, 32), ValueError, "top_k"),
        (lambda: profiling_topk(4, 9, 8, 8), ValueError, "top_k"),
        (lambda: profiling_topk(4, 8, 256, 0), ValueError, "num_local_experts"),
        (lambda: profiling_topk(4, 8, 256, 32, 240), ValueError, "local_expert_offset"),
        (lambda: profiling_topk(4, 8, 256.0, 32), TypeError, "num_experts"),
        (lambda: profiling_topk(4, 8, 256, 32, seed=-1), ValueError, "seed"),
        (lambda: profiling_hidden(4, 0), ValueError, "hidden_size"),
        (lambda: profiling_router_logits(4, 0), ValueError, "num_experts"),
    ],
)
def test_validation_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.gpu
def test_on_gpu_deterministic_and_same_topk_as_cpu():
    a = moe_inputs(64, 128, 8, 256, 32, 32, seed=4, device="cuda")
    b = moe_inputs(64, 128, 8, 256, 32, 32, seed=4, device="cuda")
    cpu = moe_inputs(64, 128, 8, 256, 32, 32, seed=4)
    assert a.hidden.is_cuda and a.topk_ids.is_cuda and a.topk_weights.is_cuda
    assert torch.equal(a.hidden, b.hidden)
    assert torch.equal(a.topk_ids.cpu(), cpu.topk_ids) and torch.equal(a.topk_weights.cpu(), cpu.topk_weights)
    logits = profiling_router_logits(8, 256, seed=1, device="cuda")
    assert torch.equal(logits, profiling_router_logits(8, 256, seed=1, device="cuda"))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: profiling_hidden(4, 16, dtype="bf16"), TypeError, "dtype: expected a floating torch.dtype"),
        (lambda: profiling_hidden(4, 16, dtype=torch.int32), TypeError, "dtype: expected a floating torch.dtype"),
        (lambda: profiling_hidden(4, 16, device=1), TypeError, "device: expected a torch.device or str"),
        (lambda: profiling_router_logits(4, 16, device="nowhere"), ValueError, "device: expected a device"),
        (lambda: profiling_topk(4, 2, 16, 4, device=None), TypeError, "device: expected a torch.device or str"),
        (lambda: profiling_topk(4, 2, 16, 4, seed=-1), ValueError, "seed: expected an int >= 0"),
        (lambda: moe_inputs(4, 16, 2, 16, 4, 14), ValueError, r"local_expert_offset: experts \[14, 18\) exceed"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_bucket_gives_empty_inputs():
    x = moe_inputs(0, 16, 2, 16, 4)
    assert x.hidden.shape == (0, 16) and x.topk_ids.shape == x.topk_weights.shape == (0, 2)
