"""The end-to-end accuracy harness: transformers' DeepSeek-V3 as reference, our MoE layers served from
the tiny bf16, FP8 block, ModelOpt FP8 (per tensor) and NVFP4 checkpoints.

Measured by ``moe-backend accuracy --seeds 8`` on a CPU with the torch reference kernels (TINY seed 0,
8 x 64 tokens of seeds 0..7, dense linears dequantized from each checkpoint; worst of the 8 streams per
row), as recorded in ``moe_backend.cli.accuracy.MEASURED`` (an H100 gave the same within 5%):

    checkpoint  reference     KL(ref||ours)  top-1   rel err
    bf16        bf16          1.16e-02       0.982   4.15e-02
    bf16        dequantized   1.16e-02       0.982   4.15e-02
    fp8         bf16          3.53e-01       0.682   2.46e-01
    fp8         dequantized   1.02e-01       0.879   1.28e-01
    fp8_tensor  bf16          4.28e-01       0.682   2.62e-01
    fp8_tensor  dequantized   8.81e-02       0.865   1.22e-01
    nvfp4       bf16          9.10e-01       0.473   3.91e-01
    nvfp4       dequantized   9.57e-03       0.980   3.65e-02

Thresholds: KL 3x and relative error 2x the measured value, top-1 agreement 0.03 below it. This test
runs the token stream of seed 0 against them.
"""

import pytest
import torch

from moe_backend import cli
from moe_backend.cli.accuracy import (
    MEASURED,
    THRESHOLDS,
    AccuracyMetrics,
    BackendMoE,
    Thresholds,
    compare_logits,
    format_report,
    load_reference_model,
    run_accuracy,
    worst,
)
from moe_backend.weights.checkpoint import Checkpoint
from moe_backend.weights.checkpoint_maker import TINY, make_checkpoints
from moe_backend.weights.loader import build_moe_layer, read_moe_layer

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("tiny"))


def test_routing_reproduces_transformers_router(checkpoints):
    """Our noaux_tc selection (inside the layer) picks the experts transformers' router picks, with
    the same weights, on the checkpoint's router and correction bias."""
    config = transformers.AutoConfig.from_pretrained(str(checkpoints["bf16"]))
    with Checkpoint(checkpoints["bf16"]) as ckpt:
        weights = read_moe_layer(ckpt, 2)
        layer = build_moe_layer(weights, ckpt.spec)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(weights.router_weight.float())
        router.e_score_correction_bias.copy_(weights.correction_bias)
    hidden = torch.randn(512, TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(hidden)
    ids, ours = layer.config.routing.select(logits, layer.config.top_k, layer.correction_bias)
    # transformers returns the top-k unsorted: compare per token in expert order
    hf_order, our_order = hf_ids.sort(-1), ids.long().sort(-1)
    assert torch.equal(hf_order.values, our_order.values)
    torch.testing.assert_close(ours.gather(1, our_order.indices), hf_weights.gather(1, hf_order.indices))


def test_backend_moe_matches_transformers_moe_block(checkpoints):
    model = load_reference_model(checkpoints["bf16"], CPU, torch.float32)
    block = model.model.layers[3].mlp
    with Checkpoint(checkpoints["bf16"]) as ckpt:
        weights = read_moe_layer(ckpt, 3)
        ours = BackendMoE(build_moe_layer(weights, ckpt.spec), weights.router_weight, block.shared_experts)
    hidden = torch.randn(2, 64, TINY.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = block(hidden), ours(hidden)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert float((out - ref).norm() / ref.norm()) < 1e-2  # bf16 activations in our layer


def test_compare_logits():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    m = compare_logits(ref, ref)
    assert (m.kl, m.top1, m.rel_err) == (0.0, 1.0, 0.0)
    m = compare_logits(ref, torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]]))
    assert m.top1 == 0.5 and m.kl > 0 and m.rel_err == pytest.approx(2**0.5 * 2 / 6**0.5)


def test_default_setup_within_thresholds(checkpoints):
    results = run_accuracy(checkpoints, device=CPU)
    assert set(results) == set(MEASURED) == set(THRESHOLDS)
    failures = {key: THRESHOLDS[key].failures(m) for key, m in results.items() if THRESHOLDS[key].failures(m)}
    assert not failures, failures
    # what serving a checkpoint costs grows as its format narrows
    cost = [results[flavour, "bf16"].kl for flavour in ("bf16", "fp8", "nvfp4")]
    assert cost == sorted(cost)


def test_cli_reports_unchecked_variants(checkpoints, capsys):
    root = checkpoints["bf16"].parent
    assert (
        cli.main(
            [
                "accuracy",
                "--checkpoints",
                str(root),
                "--sequences",
                "2",
                "--seq-len",
                "16",
                "--seeds",
                "2",
                "--dense",
                "bf16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 x 16 tokens, seeds 0..1 (worst of each metric), dense weights: bf16" in out and "unchecked" in out
    assert all(f"{flavour:<11} dequantized" in out for flavour in ("bf16", "fp8", "fp8_tensor", "nvfp4"))


def test_report_flags_failures():
    good = AccuracyMetrics(kl=1e-3, top1=0.99, rel_err=1e-2)
    bad = AccuracyMetrics(kl=1.0, top1=0.5, rel_err=0.5)
    limits = Thresholds(max_kl=1e-2, min_top1=0.9, max_rel_err=0.1)
    report = format_report(
        {("fp8", "bf16"): good, ("fp8", "dequantized"): bad}, {("fp8", "bf16"): limits, ("fp8", "dequantized"): limits}
    )
    lines = report.splitlines()
    assert "FAIL" not in lines[2]
    assert "FAIL: KL 1.000e+00 > 1.000e-02; top-1 agreement 0.500 < 0.900; relative logit error" in lines[3]
    assert worst([{("a", "b"): good}, {("a", "b"): bad}]) == {("a", "b"): AccuracyMetrics(1.0, 0.5, 0.5)}
