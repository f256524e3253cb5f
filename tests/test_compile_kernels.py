"""scripts/compile_kernels.py: the launches it captures and the offline sm_90a build (no GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    # Its own process: the interpreter (on in this one) compiles nothing.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def test_capture_reaches_every_kernel_and_configuration():
    from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe, tiles

    run = _run("--list", "--shapes", "odd_128", "--tokens", "3", "400")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    names = {line.split()[0] for line in lines}
    assert names == {
        "align_in_one_program",
        "count_kernel",
        "_scan_kernel",
        "_scatter_kernel",
        "_act_quant_kernel",
        "_gemm1_kernel",
        "_gemm2_kernel",
        "_cast_kernel",
        "_sum_pairs_kernel",
        "_permute_kernel",
        "_align_permute_kernel",
        "_silu_mul_quant_kernel",  # the CuTe DSL paths' Triton kernels
        "_weighted_sum_kernel",
        "_kernel_layout_dequant_kernel",
        "_segments_kernel",
        "_place_kernel",
    }
    # the grouped path quantizes straight into its pairs' rows
    assert any(line.startswith("_act_quant_kernel") and "'SCATTER_K': 3" in line for line in lines)  # top-3
    gemm2 = [line for line in lines if line.startswith("_gemm2_kernel")]
    grouped = ("cute_grouped", "bf16_grouped")
    triton_configs = [c for c in (*fp8_moe.CANDIDATE_CONFIGS, *nvfp4_moe.CANDIDATE_CONFIGS) if c["path"] not in grouped]
    gemm1 = [line for line in lines if line.startswith("_gemm1_kernel")]
    for cfg in triton_configs:
        if cfg.get("FUSED_DOWN"):  # GEMM2 inside GEMM1's programs: no GEMM2 launch
            down = f"'DOWN': True, 'BLOCK_H': {cfg['BLOCK_N2']}, 'DOWN_STAGES': {cfg['num_stages2']}"
            assert any(down in line for line in gemm1), cfg
            continue
        launched = f"num_warps={cfg['num_warps2']} num_stages={cfg['num_stages2']}"
        rows = "BLOCK_T" if cfg["path"] == "swapab" else "BLOCK_M"  # swap-AB: pairs on the MMA's N side
        assert any(
            launched in line and f"'{rows}': {cfg['BLOCK_M']}" in line and f"'BLOCK_N': {cfg['BLOCK_N2']}" in line
            for line in gemm2
        ), cfg
    for cfg in fp8_moe.SWAPAB_VARIANTS.values():  # experimental, not tuner candidates
        if not cfg["FUSED_DOWN"]:
            assert any(f"'PDL': True, 'PREFETCH': {cfg['PREFETCH2']}" in line for line in gemm2), cfg
        # GEMM1 prefetching waits on act_quant as its programmatic dependent
        waits = cfg["PREFETCH1"] > 0
        assert any(f"'PREFETCH': {cfg['PREFETCH1']}, 'WAIT_INPUT': {waits}" in line for line in gemm1), cfg
    # built as a GPU launches them: the swap-AB default's programmatic dependent launches
    assert any("'LAUNCH_DEPENDENTS': True" in line for line in lines if line.startswith("_act_quant_kernel"))
    assert any("'PDL': True" in line for line in lines if line.startswith("_cast_kernel"))
    # the gathered NVFP4 GEMMs and the FP8 swap-AB GEMM2 run capped at tiles.GATHER_MAXNREG
    # registers, the aligned ones uncapped unless a configuration caps them (MAXNREG1 / MAXNREG2:
    # the NVFP4 decode variants)
    gathered = [line for line in lines if "'GATHER': True" in line]
    gathered += [line for line in gemm2 if "'BLOCK_T'" in line]
    assert gathered and all(f"maxnreg={tiles.GATHER_MAXNREG} " in line for line in gathered)
    caps = {cfg[key] for cfg in nvfp4_moe.DECODE_VARIANTS.values() for key in ("MAXNREG1", "MAXNREG2")} - {0}
    capped = [line for line in lines if "'GATHER': False" in line and "maxnreg" in line]
    assert all(any(f"maxnreg={cap} " in line for cap in caps) for line in capped)
    for cfg in nvfp4_moe.DECODE_VARIANTS.values():
        unrolled = [line for line in lines if "'GATHER': False" in line and f"'UNROLL': {cfg['UNROLL1']}" in line]
        assert unrolled, cfg
        cap = cfg["MAXNREG1"]
        assert any((f"maxnreg={cap} " in line) if cap else ("maxnreg" not in line) for line in unrolled), cfg
    vllm = fp8_moe.NUMERICS_CONFIGS["vllm_triton"]
    assert any(f"'BLOCK_M': {vllm['BLOCK_M']}" in line and "'VLLM_ORDER': 1" in line for line in lines)
    assert any("'VLLM_ORDER': 2" in line for line in lines)


def test_offline_build_for_sm90():
    run = _run("--shapes", "odd_16", "--tokens", "3", "--kernels", "_cast_kernel", "_sum_pairs_kernel")
    assert run.returncode == 0, run.stderr
    # the cast launched plainly, as a programmatic dependent launch (swap-AB) and as one that
    # also resets the swap-AB per-expert counters (WAIT2='expert'), the pair sum
    assert "4 of 4 kernel specializations compiled for sm_90a" in run.stderr


def test_experimental_configurations_can_be_left_out():
    """``--no-experimental`` (CI's older/newer Tritons) drops exactly the not-yet-candidate paths."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_kernels
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe

    for kernel, experimental in (
        ("sm90_triton_fp8", list(fp8_moe.SWAPAB_VARIANTS.values())),
        ("sm90_triton_nvfp4", [nvfp4_moe.SWAPAB_CONFIG, *nvfp4_moe.DECODE_VARIANTS.values()]),
    ):
        everything = compile_kernels.launcher_configs(kernel)
        tuned = compile_kernels.launcher_configs(kernel, experimental=False)
        assert all(cfg in everything and cfg not in tuned for cfg in experimental)
        assert [cfg for cfg in everything if cfg not in experimental] == tuned


def test_one_per_code_path_keeps_each_path_at_its_widest():
    """Specializations that differ only in a width constexpr (``PAIRS``) or in Triton's value
    specializations of an integer argument (1: ``constexpr``) are one code path, built at the
    widest; a different flag constexpr or pointer type is another path."""
    import inspect
    import json

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_kernels
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from moe_backend.kernels.sm90 import fp8_swapab

    params = list(inspect.signature(fp8_swapab._gemm1_kernel.fn).parameters)
    declared = compile_kernels.declared_constexprs("moe_backend.kernels.sm90.fp8_swapab._gemm1_kernel")
    assert {"PAIRS", "UE8M0"} <= declared and "stride_xm" not in declared

    def spec(pairs: int, ue8m0: bool = False, stride_is_one: bool = False, y: str = "*fp32") -> str:
        signature, keys, vals = {}, [], []
        for i, p in enumerate(params):
            if p in declared:
                signature[p] = "constexpr"
                keys.append([i])
                vals.append(pairs if p == "PAIRS" else ue8m0 if p == "UE8M0" else 16)
            elif p == "stride_xm" and stride_is_one:
                signature[p] = "constexpr"
                keys.append([i])
                vals.append(1)
            else:
                signature[p] = y if p == "y_ptr" else "*fp32" if p.endswith("_ptr") else "i32"
        name = "moe_backend.kernels.sm90.fp8_swapab._gemm1_kernel"
        return json.dumps(
            dict(name=name, signature=signature, constant_keys=keys, constant_vals=vals, options=dict(num_warps=8))
        )

    narrow, wide = spec(16), spec(1024, stride_is_one=True)
    other_flag, other_type = spec(16, ue8m0=True), spec(16, y="*fp8e4nv")
    kept = compile_kernels.one_per_code_path([narrow, spec(256), wide, other_flag, other_type])
    assert sorted(kept) == sorted([wide, other_flag, other_type])
