"""Top-k selection against plain python loops (ties included)."""

import math

import numpy as np
import pytest
import torch

from moe_backend.routing import RoutingConfig, noaux_tc_topk, renormalize_topk, sigmoid_topk, softmax_topk


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _argsort_desc(values):
    """Indices by decreasing value, lower index first among equals."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def _f32_add(a: float, b: float) -> float:
    return float(np.float32(a) + np.float32(b))


def _loop_noaux_tc(logits, bias, k, n_group, topk_group, norm, scale):
    """The selection logic in plain python on the same fp32 scores (sigmoid, +bias and the
    two-member group sums rounded as fp32), so ties and near-ties are the implementation's."""
    ids_all, w_all = [], []
    scores = torch.sigmoid(logits)
    for s_row, b_row in zip(scores.tolist(), (scores + bias).tolist(), strict=True):
        s, b = s_row, b_row
        per = len(s) // n_group
        gscore = []
        for g in range(n_group):
            members = sorted(b[g * per : (g + 1) * per], reverse=True)
            gscore.append(_f32_add(members[0], members[1]))
        keep = set(_argsort_desc(gscore)[:topk_group])
        masked = [b[e] if e // per in keep else -math.inf for e in range(len(s))]
        ids = _argsort_desc(masked)[:k]
        w = [s[e] for e in ids]
        if norm:
            tot = sum(w) + 1e-20
            w = [x / tot for x in w]
        ids_all.append(ids)
        w_all.append([x * scale for x in w])
    return ids_all, w_all


@pytest.mark.parametrize(
    "t, e, k, n_group, topk_group", [(9, 16, 4, 4, 2), (5, 32, 8, 8, 4), (3, 8, 1, 1, 1), (4, 12, 6, 3, 3)]
)
def test_noaux_tc_matches_loop(t, e, k, n_group, topk_group):
    logits = torch.randn(t, e)
    bias = 0.1 * torch.randn(e)
    ids, w = noaux_tc_topk(logits, bias, k, n_group, topk_group, norm_topk_prob=True, routed_scaling_factor=2.5)
    want_ids, want_w = _loop_noaux_tc(logits, bias, k, n_group, topk_group, True, 2.5)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == want_ids
    torch.testing.assert_close(w, torch.tensor(want_w), rtol=1e-5, atol=1e-6)


def test_noaux_tc_ties_break_to_lower_index():
    # every score equal: groups and experts tie everywhere
    logits = torch.zeros(2, 16)
    bias = torch.zeros(16)
    ids, w = noaux_tc_topk(logits, bias, 4, 4, 2, norm_topk_prob=False, routed_scaling_factor=1.0)
    want_ids, _ = _loop_noaux_tc(logits, bias, 4, 4, 2, False, 1.0)
    assert ids.tolist() == want_ids == [[0, 1, 2, 3]] * 2
    torch.testing.assert_close(w, torch.full((2, 4), 0.5))
    # ties between quantized logits
    logits = torch.randint(-2, 3, (20, 16)).float()
    bias = torch.randint(-1, 2, (16,)).float() * 0.5
    ids, _ = noaux_tc_topk(logits, bias, 4, 4, 2)
    assert ids.tolist() == _loop_noaux_tc(logits, bias, 4, 4, 2, True, 1.0)[0]


def test_noaux_tc_scaling_left_to_caller_and_no_norm():
    logits, bias = torch.randn(4, 16), torch.randn(16)
    ids, w = noaux_tc_topk(
        logits, bias, 4, 4, 2, norm_topk_prob=False, routed_scaling_factor=2.5, apply_routed_scaling=False
    )
    want_ids, want_w = _loop_noaux_tc(logits, bias, 4, 4, 2, False, 1.0)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(w, torch.tensor(want_w))


def test_bias_selects_but_does_not_weight():
    logits = torch.zeros(1, 8)
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0, 5.0])
    ids, w = noaux_tc_topk(logits, bias, 1, 1, 1, norm_topk_prob=False)
    assert ids.tolist() == [[7]]
    assert w.item() == pytest.approx(0.5)  # sigmoid(0), not the biased score


def _loop_softmax(row):
    m = max(row)
    ex = [math.exp(x - m) for x in row]
    return [x / sum(ex) for x in ex]


def test_renormalize_softmax_sigmoid_match_loops():
    logits = torch.randn(6, 10)
    for fn, score, renorm in [
        (renormalize_topk, _loop_softmax, True),
        (softmax_topk, _loop_softmax, False),
        (sigmoid_topk, lambda r: [_sigmoid(x) for x in r], False),
    ]:
        ids, w = fn(logits, 3)
        for r, row in enumerate(logits.tolist()):
            p = score(row)
            want = _argsort_desc(p)[:3]
            assert ids[r].tolist() == want
            ww = [p[i] for i in want]
            if renorm:
                ww = [x / sum(ww) for x in ww]
            torch.testing.assert_close(w[r], torch.tensor(ww), rtol=1e-5, atol=1e-6)


def test_empty_batch():
    ids, w = noaux_tc_topk(torch.zeros(0, 16), torch.zeros(16), 4, 4, 2)
    assert ids.shape == (0, 4) and w.shape == (0, 4)


def test_config_dispatch_and_checks():
    cfg = RoutingConfig.deepseek_v3(4, 2, routed_scaling_factor=2.5)
    logits, bias = torch.randn(3, 16), torch.randn(16)
    ids, w = cfg.select(logits, 4, bias)
    ids2, w2 = noaux_tc_topk(logits, bias, 4, 4, 2, routed_scaling_factor=2.5)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)
    assert torch.equal(RoutingConfig("softmax").select(logits, 2)[0], softmax_topk(logits, 2)[0])
    with pytest.raises(ValueError, match="correction_bias: expected an fp32"):
        cfg.select(logits, 4)
    with pytest.raises(ValueError, match="correction_bias: only noaux_tc"):
        RoutingConfig("softmax").select(logits, 2, bias)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: softmax_topk(torch.randn(2, 4).double(), 2), "router_logits: expected dtype torch.float32"),
        (lambda: softmax_topk(torch.randn(2, 4, 1), 2), "router_logits: expected a 2-D tensor"),
        (lambda: softmax_topk(torch.randn(2, 4), 5), "top_k: expected at most the number of experts"),
        (lambda: softmax_topk(torch.randn(2, 4), 0), "top_k: expected an int >= 1"),
        (lambda: softmax_topk(torch.randn(4, 2).t(), 1), "router_logits: expected a contiguous tensor"),
        (
            lambda: noaux_tc_topk(torch.randn(2, 16), torch.randn(8), 4, 4, 2),
            r"correction_bias: expected shape \(16,\)",
        ),
        (lambda: noaux_tc_topk(torch.randn(2, 16), torch.randn(16), 4, 5, 2), "n_group: expected a divisor"),
        (lambda: noaux_tc_topk(torch.randn(2, 16), torch.randn(16), 4, 4, 5), "topk_group: expected at most n_group"),
        (lambda: noaux_tc_topk(torch.randn(2, 16), torch.randn(16), 9, 4, 2), "top_k: expected at most topk_group"),
        (lambda: noaux_tc_topk(torch.randn(2, 16), torch.randn(16), 1, 16, 2), "at least 2 experts per group"),
        (lambda: RoutingConfig("topk"), "method: expected one of"),
        (lambda: RoutingConfig("noaux_tc", 2, 3), "topk_group: expected at most n_group"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# -- config values: type-checked at construction, the field named -----------------------------------
@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: RoutingConfig(norm_topk_prob="no"), TypeError, "norm_topk_prob: expected a bool, got str 'no'"),
        (lambda: RoutingConfig(norm_topk_prob=1), TypeError, "norm_topk_prob: expected a bool"),
        (lambda: RoutingConfig(apply_routed_scaling=None), TypeError, "apply_routed_scaling: expected a bool"),
        (lambda: RoutingConfig.deepseek_v3(4, 2, "2.5"), TypeError, "routed_scaling_factor: expected a float, got str"),
        (lambda: RoutingConfig.deepseek_v3(4, 2, True), TypeError, "routed_scaling_factor: expected a float, got bool"),
        (
            lambda: RoutingConfig.deepseek_v3(4, 2, float("nan")),
            ValueError,
            "routed_scaling_factor: expected a finite positive float, got nan",
        ),
        (lambda: RoutingConfig.deepseek_v3(4, 2, float("inf")), ValueError, "routed_scaling_factor: expected a finite"),
        (lambda: RoutingConfig.deepseek_v3(4, 2, 0.0), ValueError, "routed_scaling_factor: expected a finite positive"),
        (
            lambda: RoutingConfig.deepseek_v3(4, 2, -2.5),
            ValueError,
            "routed_scaling_factor: expected a finite positive",
        ),
        (lambda: RoutingConfig.deepseek_v3(4.0, 2), TypeError, "n_group: expected an int"),
        (lambda: RoutingConfig.deepseek_v3(4, "2"), TypeError, "topk_group: expected an int"),
        (lambda: RoutingConfig(method=["softmax"]), ValueError, "method: expected one of"),
        (lambda: RoutingConfig(method="topk"), ValueError, "method: expected one of"),
    ],
)
def test_bad_config_fields_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_an_int_scaling_factor_is_the_same_float():
    cfg = RoutingConfig.deepseek_v3(4, 2, 3)
    assert isinstance(cfg.routed_scaling_factor, float) and cfg == RoutingConfig.deepseek_v3(4, 2, 3.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"norm_topk_prob": "no"}, TypeError, "norm_topk_prob: expected a bool"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routed_scaling_factor: expected a finite positive"),
        ({"routed_scaling_factor": "2.5"}, TypeError, "routed_scaling_factor: expected a float"),
        ({"apply_routed_scaling": 0}, TypeError, "apply_routed_scaling: expected a bool"),
    ],
)
def test_noaux_tc_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        noaux_tc_topk(torch.randn(3, 16), torch.zeros(16), 4, 4, 2, **kwargs)


@pytest.mark.parametrize("method", ["noaux_tc", "renormalize", "softmax", "sigmoid"])
def test_empty_logits_give_empty_top_k(method):
    cfg = RoutingConfig(method, 4, 2) if method == "noaux_tc" else RoutingConfig(method)
    ids, w = cfg.select(torch.zeros(0, 16), 4, torch.zeros(16) if method == "noaux_tc" else None)
    assert ids.shape == w.shape == (0, 4) and ids.dtype == torch.int32 and w.dtype == torch.float32


@pytest.mark.parametrize("method", ["noaux_tc", "renormalize", "softmax", "sigmoid"])
def test_nan_logits_reach_only_their_token(method):
    """The documented pass-through: routing reads no values, a NaN row gives NaN weights in that row
    and leaves every other token's selection as it was."""
    cfg = RoutingConfig(method, 4, 2) if method == "noaux_tc" else RoutingConfig(method)
    bias = torch.zeros(16) if method == "noaux_tc" else None
    logits = torch.randn(5, 16)
    clean = cfg.select(logits, 4, bias)
    logits[2, 3] = float("nan")
    ids, w = cfg.select(logits, 4, bias)
    rows = [0, 1, 3, 4]
    assert torch.equal(ids[rows], clean[0][rows]) and torch.equal(w[rows], clean[1][rows])
    assert bool(w[2].isnan().any())
