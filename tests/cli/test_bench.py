"""``moe-backend bench``'s pure parts: options, ceilings, the table, the peers' availability."""

import argparse
import json
import sys
import types

import pytest
import torch

from moe_backend.cli import bench, bench_peers
from moe_backend.kernels.registry import KERNELS
from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_options():
    assert _args().peers == [] and _args("--peers", "vllm").peers == ["vllm"]
    with pytest.raises(SystemExit):
        _args("--peers", "sglang")


def test_ceiling_is_the_slower_of_stream_and_compute():
    peaks = {"fp8_tflops": 1000.0, "bf16_tflops": 500.0}
    # T=1: 8 x 3 x 7168 x 2048 x 2 flops = 0.7 GFLOP: 0.7 µs at 1 PFLOP/s; the stream dominates.
    small = bench.ceiling_fields(80.0, 1, 8, 7168, 2048, "fp8_block", peaks)
    assert small["stream_us"] == 80.0 and small["ceiling_us"] == 80.0
    assert small["compute_floor_us"] == pytest.approx(2 * 8 * 3 * 7168 * 2048 / 1e15 * 1e6)
    nvfp4 = bench.ceiling_fields(80.0, 1, 8, 7168, 2048, "nvfp4", peaks)
    assert nvfp4["stream_us"] == pytest.approx(45.0)  # 0.5625 bytes a weight
    big = bench.ceiling_fields(80.0, 8192, 8, 7168, 2048, "nvfp4", peaks)
    assert big["ceiling_us"] == big["compute_floor_us"] == pytest.approx(2 * 8192 * 8 * 3 * 7168 * 2048 / 5e14 * 1e6)
    bf16 = bench.ceiling_fields(80.0, 8192, 8, 7168, 2048, "bf16", peaks)
    assert bf16["stream_us"] == 160.0 and bf16["compute_floor_us"] == big["compute_floor_us"]  # 2 bytes, bf16 MMA


def test_bf16_layers_are_timed_when_asked_for():
    """bf16 (twice FP8's weight bytes) is a precision of its own, not in a plain run's default."""
    assert _args().precision == ["fp8_block", "fp8_tensor", "nvfp4"]
    assert _args("--precision", "bf16").precision == ["bf16"]
    assert bench.DENSE_KINDS["bf16"] == "bf16" and bench_peers.PEER_IMPLS["bf16"] == "vllm_triton"
    w = bench.random_bf16_weights(3, 256, 128, torch.device("cpu"))
    assert w.w13.shape == (3, 256, 256) and w.w2.shape == (3, 256, 128) and w.w13.dtype == torch.bfloat16
    assert w.w13.float().std().item() == pytest.approx(256**-0.5, rel=0.1)
    assert w.w2.float().std().item() == pytest.approx(128**-0.5, rel=0.1)
    layer = bench.Layer(3, 256, 128, 2, torch.device("cpu"))
    assert layer.weights["bf16"]() is layer.weights["bf16"]()  # built once, the largest weights


def test_table_reports_speedups_over_each_peer_and_failures():
    base = dict(E=32, T=1, ceiling_us=80.0)
    records = [
        dict(base, precision="fp8_block", impl="moe_backend", median_us=100.0, dense_us=60.0),
        dict(base, precision="fp8_block", impl="vllm_triton", median_us=110.0),
        dict(base, precision="nvfp4", impl="moe_backend", median_us=50.0),
        dict(base, precision="nvfp4", impl="vllm_marlin", median_us=100.0),
        dict(base, precision="fp8_rowwise", impl="torch_scaled_grouped_mm", median_us=300.0),
        dict(base, precision="fp8_block", impl="moe_backend[deterministic]", median_us=None),
    ]
    lines = bench.format_table(records).splitlines()
    assert "vllm_triton x" in lines[0] and "vllm_marlin x" in lines[0]
    fp8, nv, det = lines[1].split(), lines[2].split(), lines[3].split()
    assert "dense/ours" in lines[0]
    assert fp8[:7] == ["32", "1", "fp8_block", "100.0", "80.0", "0.80", "0.60"] and fp8[7:] == ["3.00", "-", "1.10"]
    assert nv[3:] == ["50.0", "80.0", "1.60", "-", "-", "2.00", "-"]
    assert det[3] == "failed"


def test_peers_refuse_clearly_without_vllm(monkeypatch):
    monkeypatch.setattr(bench_peers, "vllm_version", lambda: None)
    with pytest.raises(ImportError, match="--peers vllm"):
        bench_peers.vllm_peers({}, ["fp8_block"])


def test_incomplete_vllm_is_no_peer(monkeypatch):
    # a partly unpacked offline bundle: the package imports, its lazily resolved __version__
    # fails on a missing dependency
    partial = types.ModuleType("vllm")

    def missing(name):
        raise ModuleNotFoundError("No module named 'cbor2'")

    partial.__getattr__ = missing
    monkeypatch.setitem(sys.modules, "vllm", partial)
    assert bench_peers.vllm_version() is None
    partial.__version__ = "0.26.0"
    assert bench_peers.vllm_version() == "0.26.0"


def test_peers_are_keyed_by_precision(monkeypatch):
    # FP8 block and bf16 are both vLLM's Triton fused experts: keyed by impl, one would replace
    # the other and its times be recorded under the wrong precision
    monkeypatch.setattr(bench_peers, "vllm_version", lambda: "0.26.0")
    for name in ("vllm_triton", "vllm_triton_bf16", "vllm_marlin"):
        monkeypatch.setattr(bench_peers, name, lambda w, name=name: (name, w))
    weights = {p: (lambda p=p: f"{p} weights") for p in ("fp8_block", "bf16", "nvfp4", "fp8_tensor")}
    peers = bench_peers.vllm_peers(weights, ["fp8_block", "bf16", "nvfp4", "fp8_tensor"])
    assert peers == {
        "fp8_block": ("vllm_triton", ("vllm_triton", "fp8_block weights")),
        "bf16": ("vllm_triton", ("vllm_triton_bf16", "bf16 weights")),
        "nvfp4": ("vllm_marlin", ("vllm_marlin", "nvfp4 weights")),
    }


def test_main_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(_args("--peers", "vllm")) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_each_run_is_timed_in_both_orders_and_averaged():
    calls = []
    clock = iter(range(100))

    def run(name):
        def call():
            calls.append(name)
            if name == "broken":
                raise RuntimeError("not on this build")
            return float(next(clock)), "cuda_graph"  # a GPU that slows down as the point goes on

        return call

    timed = bench.time_in_both_orders({name: run(name) for name in ("a", "broken", "b", "c")})
    assert calls == ["a", "broken", "b", "c", "c", "b", "a"]  # a failed run is not timed again
    assert timed["broken"] == (None, None, [])
    assert timed["a"] == (2.5, "cuda_graph", [0.0, 5.0])
    assert timed["b"] == (2.5, "cuda_graph", [1.0, 4.0]) and timed["c"] == (2.5, "cuda_graph", [2.0, 3.0])


def test_a_point_records_every_implementation_with_both_passes_and_the_ceiling(monkeypatch):
    """``run_bench``'s wiring on the CPU: the GPU parts (layer, stream kernel, timer) stubbed."""
    called = []

    class FakeLayer:
        def __init__(self, e, h, i, top_k, device):
            self.w13 = self.w2 = None

        def ours(self, precision):
            return lambda hidden, ids, weights, out: called.append((precision, hidden.shape[0], out.shape))

        def baseline(self, hidden, ids, weights, out):
            called.append(("fp8_rowwise", hidden.shape[0], out.shape))

    def fake_time(fn, quick):
        before = len(called)
        for s in range(bench.INPUT_SETS):
            fn(s)
        return (100.0 if len(called) > before else 50.0), "cuda_graph"  # the stream calls nothing

    monkeypatch.setattr(bench, "Layer", FakeLayer)
    monkeypatch.setattr(bench, "expert_stream", lambda w13, w2, ids: lambda: None)
    dense = []

    def fake_dense(kind, m, h, i, device):
        dense.append((kind, m, h, i))
        return lambda: None

    monkeypatch.setattr(bench, "dense_gemms", fake_dense)
    monkeypatch.setattr(bench, "_time", fake_time)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    args = _args("--E", "8", "--T", "3", "--precision", "fp8_block", "nvfp4", "--hidden", "256", "--inter", "128")
    points = []
    records = bench.run_bench(args, torch.device("cpu"), {"fp8_tflops": 1e3, "bf16_tflops": 5e2}, points.append)
    assert [(r["precision"], r["impl"]) for r in records] == [
        ("fp8_block", "moe_backend"),
        ("nvfp4", "moe_backend"),
        ("fp8_rowwise", "torch_scaled_grouped_mm"),
    ]
    assert all(r["passes_us"] == [100.0, 100.0] and r["median_us"] == 100.0 for r in records)
    assert records[0]["stream_us"] == 50.0 and records[1]["stream_us"] == 50.0 * 0.5625
    # the dense GEMMs of each precision's MMA kind, at T * top_k rows; the baseline gets FP8 block's
    assert sorted(dense) == [("bf16", 24, 256, 128), ("fp8_block", 24, 256, 128)]
    assert [r["dense_us"] for r in records] == [50.0, 50.0, 50.0]
    assert len(called) == 2 * 3 * bench.INPUT_SETS and called[0] == ("fp8_block", 3, (3, 256))
    assert len(points) == 1


def test_results_header_records_the_options_and_versions():
    args = _args("--T", "1", "8", "--peers", "vllm", "--no-baseline")
    args.func = bench.main  # what the CLI dispatcher adds: not an option, not recorded
    header = bench.run_header(args, "NVIDIA H200", {"read_gbs": 4490.0}, "0.26.0")
    assert header["device"] == "NVIDIA H200" and header["vllm"] == "0.26.0" and header["peaks"] == {"read_gbs": 4490.0}
    assert header["command"]["T"] == [1, 8] and header["command"]["peers"] == ["vllm"]
    assert header["command"]["no_baseline"] is True and "func" not in header["command"]
    assert header["versions"]["torch"] == torch.__version__
    assert set(header["versions"]) >= {"moe_backend", "triton", "nvidia-cutlass-dsl", "quack-kernels"}
    json.dumps(header)  # the results file is JSON


def test_results_file_is_replaced_whole(tmp_path):
    """Each partial write leaves a complete JSON file (a run stopped by a time limit keeps its points)."""
    path = str(tmp_path / "h200.json")
    header = {"device": "GPU", "date": "2026-12-02", "peaks": {"read_gbs": 1.0}, "vllm": None}
    bench.write_results(path, header, [{"E": 8, "T": 1}])
    bench.write_results(path, header, [{"E": 8, "T": 1}, {"E": 8, "T": 2}])
    with open(path) as f:
        data = json.load(f)
    assert data == dict(header, records=[{"E": 8, "T": 1}, {"E": 8, "T": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h200.json"]


@pytest.mark.parametrize("name", sorted(bench.VARIANTS))
def test_variants_name_a_kernel_and_a_configuration_it_accepts(name):
    precision, override = bench.VARIANTS[name]
    module = {"fp8_block": fp8_moe, "nvfp4": nvfp4_moe}[precision]
    assert bench.VARIANT_KERNELS[precision] in KERNELS
    config = module.resolve_config(override, 1, 8, 256)  # raises on an unknown key or path
    assert override is None or all(config[key] == value for key, value in override.items())
    layer = bench.Layer(4, 256, 128, 2, torch.device("cpu"))
    assert callable(layer.variant(name))


def test_dense_gemms_do_the_layers_mma_work_in_cublas_layouts(monkeypatch):
    """Two GEMMs, [m, H] x [H, 2I] and [m, I] x [I, H]; FP8 block scales 1x128 (M contiguous) and
    128x128 (K contiguous), the weight operand column-major: what cuBLAS's block-scaled GEMM takes."""
    from moe_backend.cli import bench_ceilings

    seen = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, sa, sb, out_dtype: seen.append((a, b, sa, sb, out_dtype)))
    bench_ceilings.dense_gemms("fp8_block", 24, 256, 384, torch.device("cpu"))()
    assert [(tuple(a.shape), tuple(b.shape)) for a, b, *_ in seen] == [((24, 256), (256, 768)), ((24, 384), (384, 256))]
    for a, b, sa, sb, out_dtype in seen:
        k, n = b.shape
        assert a.dtype == b.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16
        assert b.stride() == (1, k)
        assert tuple(sa.shape) == (24, k // 128) and sa.stride() == (1, 24)
        assert tuple(sb.shape) == (k // 128, n // 128) and sb.stride() == (1, k // 128)
    seen.clear()
    bench_ceilings.dense_gemms("fp8_tensor", 24, 256, 384, torch.device("cpu"))()
    assert all(sa.numel() == sb.numel() == 1 for _, _, sa, sb, _ in seen) and len(seen) == 2


def test_dense_gemms_bf16_runs_and_bad_kind_is_named():
    from moe_backend.cli import bench_ceilings

    bench_ceilings.dense_gemms("bf16", 5, 128, 64, torch.device("cpu"))()
    with pytest.raises(ValueError, match="kind: expected one of .*got 'fp4'"):
        bench_ceilings.dense_gemms("fp4", 5, 128, 64, torch.device("cpu"))


def test_random_routing_draws_distinct_experts_whose_loads_vary():
    gen = torch.Generator().manual_seed(0)
    ids = bench.random_ids(48, 8, 32, gen, torch.device("cpu"))
    assert ids.shape == (48, 8) and ids.dtype == torch.int32
    assert all(len(set(row.tolist())) == 8 for row in ids) and 0 <= ids.min() and ids.max() < 32
    loads = torch.bincount(ids.flatten().long(), minlength=32)
    assert loads.sum() == 48 * 8 and loads.max() > 12 > loads.min()  # not balanced
    balanced = bench.balanced_ids(48, 8, 32, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.bincount(balanced.flatten().long(), minlength=32).eq(12).all()
    assert _args().routing == "balanced" and _args("--routing", "random").routing == "random"
    with pytest.raises(SystemExit):
        _args("--routing", "zipf")
