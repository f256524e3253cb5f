"""The console script: demo and info run on a CPU and print their tables."""

import subprocess
import sys

from moe_backend import cli
from moe_backend.cli import demo


def test_demo_small_runs_and_passes(capsys):
    assert cli.main(["demo", "--tokens", "5", "--iters", "1"]) == 0
    text = capsys.readouterr().out
    for precision in ("bf16", "fp8_block", "fp8_tensor", "nvfp4"):
        assert text.count(precision) >= 2
    assert "forward_routed" in text and "reference" in text


def test_demo_errors_are_the_format_cost():
    rows = demo.run_demo(demo.DemoShape(32, 8, 256, 128, 16), __import__("torch").device("cpu"), iters=1)
    by = {(r.precision, r.entry): r for r in rows}
    assert len(rows) == 8 and all(r.kernel_ok for r in rows)
    assert by["bf16", "forward"].format_err < 1e-2
    assert 0.03 < by["fp8_block", "forward"].format_err < 0.08
    assert 0.10 < by["nvfp4", "forward"].format_err < 0.20


def test_info_prints_kernels(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "torch" in text
    assert "sm100_flashinfer_nvfp4" in text and "never run on a Blackwell GPU" in text


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "moe_backend.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout


def test_bad_tokens_argument():
    import pytest

    with pytest.raises(SystemExit, match="--tokens: expected a positive int"):
        cli.main(["demo", "--tokens", "0"])
