"""The console script: demo and info run on a CPU and print their tables."""

import subprocess
import sys

import torch

from moe_backend import cli
from moe_backend.cli import demo


def test_demo_small_runs_and_passes(capsys):
    assert cli.main(["demo", "--tokens", "5", "--iters", "1"]) == 0
    text = capsys.readouterr().out
    for precision in ("bf16", "fp8_block", "fp8_tensor", "nvfp4"):
        assert text.count(precision) >= 2
    assert "forward_routed" in text and "reference" in text
    assert "above target" not in text and "KERNEL WRONG" not in text
    if not torch.cuda.is_available():  # nothing but the reference ran: the output must say so
        assert "only the torch reference runs on this machine" in text and " ok" not in text


def test_demo_errors_are_the_format_cost():
    rows = demo.run_demo(demo.DemoShape(32, 8, 256, 128, 16), torch.device("cpu"), iters=1)
    by = {(r.precision, r.entry): r for r in rows}
    assert len(rows) == 8
    # On a CPU the reference serves every row: there is no kernel error to report.
    assert all(r.kernel == "reference" and r.kernel_err is None and r.status == "reference only" for r in rows)
    # The reference's output is the format alone rounded to bf16 (<= 2**-9 relative per element).
    for r in rows:
        assert abs(r.format_err - r.format_cost) <= 2**-8, r
    assert by["bf16", "forward"].format_cost < 1e-2
    assert 0.05 < by["fp8_block", "forward"].format_cost < 0.08
    assert 0.05 < by["fp8_tensor", "forward"].format_cost < 0.08
    assert 0.14 < by["nvfp4", "forward"].format_cost < 0.20


def row(kernel, kernel_err, precision="fp8_block"):
    return demo.DemoRow(precision, "forward", kernel, 6.4e-2, 6.4e-2, kernel_err, 1.0)


def test_table_passes_a_kernel_on_its_reference_error_not_on_the_format_cost():
    good, wrong = row("sm90_triton_fp8", 5e-3), row("sm90_triton_fp8", 2e-2)
    assert good.kernel_ok and good.status == "ok"
    assert not wrong.kernel_ok and wrong.status == "KERNEL WRONG"
    text = demo.format_table([row("reference", None, "bf16"), good, wrong])
    assert "KERNEL WRONG" in text
    assert "the torch reference serves bf16 (no fused kernel)" in text
    assert "only the torch reference runs" not in text
    assert "only the torch reference runs on this machine" in demo.format_table([row("reference", None)])


def test_info_prints_kernels(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "torch" in text
    assert "sm100_flashinfer_nvfp4" in text and "never run on a Blackwell GPU" in text
    assert "sm90_triton_fp8, path=cute_grouped" in text and "sm90_triton_nvfp4, path=bf16_grouped" in text
    if not torch.cuda.is_available():
        assert "no: it needs an sm_90 GPU, got cpu" in text


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "moe_backend.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout


def test_bad_tokens_argument():
    import pytest

    with pytest.raises(SystemExit, match="--tokens: expected a positive int"):
        cli.main(["demo", "--tokens", "0"])
