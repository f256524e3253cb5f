"""The GPU-side vLLM scripts' host logic: report checks, model sizes, fat-binary pruning (no vLLM needed)."""

import argparse
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    if str(SCRIPTS) not in sys.path:  # the scripts import their shared vllm_runs.py
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CONFIG = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_experts_per_tok": 2, "n_routed_experts": 8}


def _output(prompt_len, tokens, ids):
    """One run's output: ``tokens`` generated, every routed row of the MoE layers set to ``ids``."""
    rows = [[[0, 0], list(ids), list(ids)] for _ in range(prompt_len + len(tokens) - 1)]
    return {"tokens": tokens, "routed_experts": rows}


def test_e2e_checks_of_routed_experts():
    e2e = _script("vllm_e2e")
    prompts = [[5] * 4, [6] * 3]
    ours = [_output(4, [1, 2, 3], (1, 2)), _output(3, [4, 5], (3, 4))]
    assert e2e.routed_shape_problems(ours, prompts, CONFIG) == []
    bad = [_output(4, [1, 2, 3], (1, 9)), {"tokens": [4, 5], "routed_experts": ours[1]["routed_experts"][:-1]}]
    problems = e2e.routed_shape_problems(bad, prompts, CONFIG)
    assert any("out of range" in p for p in problems) and any("expected 4" in p for p in problems)
    # where vLLM's own capture returns another row count for the same request, ours must match it
    ref_rows = [ours[0], {"tokens": [4, 5], "routed_experts": ours[1]["routed_experts"][:-1]}]
    assert e2e.routed_shape_problems([ours[0], bad[1]], prompts, CONFIG, ref_rows) == []

    # The reference parts after the first generated token of prompt 0: rows past the shared
    # prefix (4 prompt tokens + 1 equal generated token) are not compared.
    ref = [_output(4, [1, 7, 7], (2, 1)), _output(3, [4, 5], (3, 4))]
    for row in ref[0]["routed_experts"][5:]:
        row[1] = row[2] = [6, 7]
    assert e2e.token_agreement(ours, ref) == pytest.approx(3 / 5)
    assert e2e.capture_agreement(ours, ref, prompts, [1, 2]) == 1.0
    ref[1]["routed_experts"][0][2] = [3, 5]
    assert e2e.capture_agreement(ours, ref, prompts, [1, 2]) == pytest.approx(1 - 1 / 18)
    assert e2e.capture_mismatches(ours, ref, prompts, 1) == []
    assert e2e.capture_mismatches(ours, ref, prompts, 2) == [
        {"prompt": 1, "row": 0, "in_prompt": True, "ours": [3, 4], "reference": [3, 5]}
    ]


def test_e2e_paired_agreements():
    e2e = _script("vllm_e2e")
    # Prompt [5, 6] + generated [7, 8, 9]: top1[j] predicts position j + 1.
    outputs = [{"tokens": [7, 8, 9]}]
    assert e2e.top1_hits(outputs, [[6, 7, 8, 9, 0]], [[5, 6]]) == [True, True, True]
    assert e2e.top1_hits(outputs, [[6, 7, 1, 9, 0]], [[5, 6]]) == [True, False, True]
    # Routing: rows beyond rows[i] are not compared; expert sets, not orders.
    recomputed = [{1: [[1, 2], [3, 4], [5, 6]]}]
    routed = [[[[0], [2, 1]], [[0], [3, 9]], [[0], [9, 9]]]]
    assert e2e.routing_hits(routed, recomputed, [2]) == [True, False]
    result = e2e.paired([True] * 60 + [False] * 40, [True] * 50 + [False] * 10 + [True] * 20 + [False] * 20)
    assert result["moe_backend"] == 0.6 and result["reference"] == 0.7 and result["discordant"] == 30
    assert result["z"] == pytest.approx(-10 / 30**0.5)
    assert e2e.paired([True, False], [True, False])["z"] == 0.0


def test_e2e_teacher_forced_agreement_and_prompt_top1():
    e2e = _script("vllm_e2e")

    class Logprob:  # the fields of vllm.logprobs.Logprob that the script reads
        def __init__(self, rank):
            self.rank = rank

    # Prompt [5, 6] + reference tokens [7, 8, 9]; vLLM lists the prompt token and the top-1.
    scored = [None, {6: Logprob(1)}, {7: Logprob(2), 3: Logprob(1)}, {8: Logprob(1)}, {9: Logprob(1)}]
    top1 = e2e.top1_of_prompt(scored)
    assert top1 == [6, 3, 8, 9]
    ref = [{"tokens": [7, 8, 9]}]
    # Position 2 (first generated) predicted 3 instead of 7; positions 3 and 4 agree.
    assert e2e.teacher_forced_agreement([top1], ref, [[5, 6]]) == pytest.approx(2 / 3)
    assert e2e.teacher_forced_agreement([[6, 7, 8, 9]], ref, [[5, 6]]) == 1.0


def test_run_budget_limits_and_skips_child_runs(tmp_path):
    runs = _script("vllm_runs")
    assert runs.RunBudget(1000, 300, reserve_s=20, min_run_s=45).timeout() == 300
    short = runs.RunBudget(100, 300, reserve_s=20, min_run_s=45).timeout()
    assert 75 < short <= 80  # the budget minus the reserve, less the microseconds since
    assert runs.RunBudget(60, 300, reserve_s=20, min_run_s=45).timeout() is None
    assert runs.RunBudget(1000, 30, reserve_s=0, min_run_s=45).timeout() is None
    # A skipped run starts no process and leaves the spec's record path alone.
    spent = runs.RunBudget(0, 300, reserve_s=0, min_run_s=1)
    out = tmp_path / "record.json"
    out.write_text("{}")
    assert runs.run_child("absent.py", {"out": str(out)}, tmp_path / "run.log", spent) == {"error": runs.SKIPPED}
    assert out.exists() and not (tmp_path / "run.log").exists()


def test_run_options_parse_the_child_spec():
    parser = argparse.ArgumentParser()
    _script("vllm_runs").add_run_options(parser, child_timeout=270, budget_s=560)
    args = parser.parse_args([])
    assert (args.child_timeout, args.budget_s, args.child) == (270, 560, None)
    assert parser.parse_args(["--child", json.dumps({"out": "x.json"})]).child == {"out": "x.json"}


def test_e2e_checkpoints_keep_deepseek_mla_dims(tmp_path):
    e2e = _script("vllm_e2e")
    ckpts = e2e.make_checkpoints(tmp_path)
    assert set(ckpts) == {"bf16", "fp8", "nvfp4", "fp8_tensor"} and set(e2e.REFERENCE_BACKEND) == set(ckpts) - {"bf16"}
    for flavour in ("bf16", "fp8", "nvfp4", "fp8_tensor"):
        config = json.loads((ckpts[flavour] / "config.json").read_text())
        assert {k: config[k] for k in e2e.MLA_DIMS} == e2e.MLA_DIMS


def test_throughput_model_fits_one_h100(tmp_path):
    tp = _script("vllm_throughput")
    config = tp.write_config(tmp_path, 5, "fp8")
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    size = tp.weight_bytes(config, "fp8")
    # 4 MoE layers of 256 experts x 3 x 7168 x 2048 bytes, plus embeddings and attention
    assert size["moe_layers"] == 4 and size["experts_per_moe_layer_gib"] == pytest.approx(10.5, abs=0.01)
    # the dummy loader also needs an fp16 copy of one layer's w13 (15 GiB) while it initializes
    assert 40 < size["total_gib"] < 78 - 16
    assert tp.weight_bytes(tp.write_config(tmp_path, 5, "nvfp4"), "nvfp4")["total_gib"] < size["total_gib"]


def _elf_with_fatbin(entries):
    """A minimal ELF64 whose ``.nv_fatbin`` holds one container of ``(kind, arch, payload)`` entries."""
    body = b""
    for kind, arch, payload in entries:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, kind, 0x0101, 64, len(payload))
        struct.pack_into("<I", header, 28, arch)
        body += bytes(header) + payload
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    shstrtab = b"\0.shstrtab\0.nv_fatbin\0"
    data_off = 64
    strtab_off = data_off + len(fatbin)
    shoff = strtab_off + len(shstrtab)
    elf = bytearray(64)
    elf[:4] = b"\x7fELF"
    struct.pack_into("<Q", elf, 0x28, shoff)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 1)
    sections = b"\0" * 64
    for name, offset, size in ((1, strtab_off, len(shstrtab)), (11, data_off, len(fatbin))):
        sh = bytearray(64)
        struct.pack_into("<IIQQQQ", sh, 0, name, 1, 0, 0, offset, size)
        sections += bytes(sh)
    return bytes(elf) + fatbin + shstrtab + sections


def test_bundle_prunes_only_what_sm90_cannot_load(tmp_path):
    bundle = _script("vllm_offline_bundle")
    entries = [(2, 80, b"A" * 32), (2, 90, b"B" * 32), (1, 80, b"C" * 32), (1, 100, b"D" * 32), (2, 100, b"E" * 32)]
    path = tmp_path / "ext.so"
    path.write_bytes(_elf_with_fatbin(entries))
    assert [(k, a, s) for k, a, _, s in bundle.fatbin_entries(path.read_bytes())] == [(k, a, 32) for k, a, _ in entries]
    assert bundle.prune_for_sm90(path) == 3 * 32
    data = path.read_bytes()
    kept = {(k, a): data[o : o + s] for k, a, o, s in bundle.fatbin_entries(data)}
    assert kept[(2, 90)] == b"B" * 32 and kept[(1, 80)] == b"C" * 32  # sm_90 SASS, PTX a sm_90 can JIT
    assert kept[(2, 80)] == kept[(1, 100)] == kept[(2, 100)] == bytes(32)


def test_ep2_options_and_checkpoint_split(tmp_path):
    ep2 = _script("vllm_ep2")
    args = ep2.build_parser().parse_args([str(tmp_path), "--prompts", "4"])
    assert (args.work, args.prompts, args.max_tokens, args.eager, args.child) == (tmp_path, 4, 32, False, None)
    spec = ep2.run_spec(tmp_path / "fp8", "moe_backend", [[3, 4]], args, tmp_path / "run.json")
    assert spec["engine_args"] == {
        "tensor_parallel_size": 2,
        "enable_expert_parallel": True,
        "disable_custom_all_reduce": True,
    }
    assert ep2.MULTICAST_OFF["NCCL_NVLS_ENABLE"] == "0"
    # the EP checkpoint splits into whole FP8 blocks on two ranks; the single-GPU one does not
    (ckpt,) = ep2.make_checkpoints(tmp_path, ["fp8"], ep2.EP_DIMS).values()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["moe_intermediate_size"] == 256 and config["num_attention_heads"] == 8
    assert ep2.tp_block_problems(config, 2) == []
    single = dict(config, moe_intermediate_size=128, num_attention_heads=4)
    assert ep2.tp_block_problems(single, 2) == ["shared expert intermediate: 128 over 2 ranks is not whole 128-blocks"]
    assert ep2.tp_block_problems(dict(config, num_attention_heads=2), 2) == [
        "q_b_proj rows: 384 over 2 ranks is not whole 128-blocks"
    ]


def _warmup_line(rank, first, end, tokens=512, layers=3):
    return (
        f"moe_backend: tuning warm-up of {layers} MoE layers for up to {tokens} tokens took 1.25 s "
        f"(rank {rank}, experts [{first}, {end}) of 16)"
    )


def test_ep2_rank_warmups():
    ep2 = _script("vllm_ep2")
    lines = [_warmup_line(1, 8, 16), _warmup_line(0, 0, 8)]
    warmups = ep2.rank_warmups(lines)
    assert warmups == {
        0: {"layers": 3, "max_tokens": 512, "seconds": 1.25, "experts": "[0, 8) of 16"},
        1: {"layers": 3, "max_tokens": 512, "seconds": 1.25, "experts": "[8, 16) of 16"},
    }
    assert ep2.warmup_problems(warmups, 16, 3, 512) == []
    assert ep2.warmup_problems(ep2.rank_warmups(lines[:1]), 16, 3, 512) == ["rank 0: no tuning warm-up logged"]
    # a rank that tuned every expert, or for another token count, is reported
    bad = ep2.rank_warmups([_warmup_line(0, 0, 16, tokens=1024), lines[0]])
    assert ep2.warmup_problems(bad, 16, 3, 512) == [
        "rank 0: max_tokens 1024, expected 512",
        "rank 0: experts '[0, 16) of 16', expected '[0, 8) of 16'",
    ]


def test_ep2_compare_and_checks():
    ep2 = _script("vllm_ep2")
    config = dict(CONFIG, n_routed_experts=16)
    prompts = [[5] * 4, [6] * 3]
    ref = {
        "outputs": [_output(4, [1, 2, 3], (1, 9)), _output(3, [4, 5], (3, 12))],
        "served_by_moe_backend": [],
        "tuning_warmup": [],
    }
    ours = {
        "outputs": [_output(4, [1, 2, 3], (1, 9)), _output(3, [4, 5], (3, 12))],
        "served_by_moe_backend": ["serving MoE layers with MoEBackendExperts"],
        "tuning_warmup": [_warmup_line(0, 0, 8, layers=2), _warmup_line(1, 8, 16, layers=2)],
    }
    entry = ep2.compare(ours, ref, prompts, config)
    assert entry["identical_sequences"] == entry["routed_experts_equal"] == 2 and entry["token_agreement"] == 1.0
    assert ep2.checks(entry, True, 2) == {
        "served": True,
        "routed_shape": True,
        "rank_warmups": True,
        "identical_sequences": True,
        "routed_experts_equal": True,
    }
    # one routed row differs (same tokens): the capture check fails, the token check holds
    ours["outputs"][1]["routed_experts"][2][2] = [3, 11]
    entry = ep2.compare(ours, ref, prompts, config)
    result = ep2.checks(entry, True, 2)
    assert result["identical_sequences"] and not result["routed_experts_equal"]
    # the accurate run checks no equality, only what must hold for any numerics
    assert set(ep2.checks(entry, False, 2)) == {"served", "routed_shape", "rank_warmups"}
    ours["tuning_warmup"] = []
    assert not ep2.checks(ep2.compare(ours, ref, prompts, config), False, 2)["rank_warmups"]


class _Index:
    """A package index in memory for the bundle's resolver: name -> version -> Requires-Dist lines."""

    def __init__(self, packages):
        self.packages = packages
        self.fetched = []

    def __call__(self, name, spec, extras):
        bundle = _script("vllm_offline_bundle")
        self.fetched.append((name, str(spec), sorted(extras)))
        versions = [v for v in self.packages[name] if spec.contains(v)]
        if not versions:
            raise SystemExit(f"no {name}{spec}")
        best = max(versions, key=lambda v: tuple(map(int, v.split("."))))
        return bundle.Dist(name, best, tuple(self.packages[name][best]))


def test_bundle_resolves_the_closure_against_the_target():
    bundle = _script("vllm_offline_bundle")
    index = _Index(
        {
            "llguidance": {"1.7.6": [], "1.8.0": []},
            "mistral-common": {
                "1.13.1": [
                    "pydantic>=2.12",
                    "numpy<2.4,>=1.25; python_version <= '3.12'",
                    "opencv-python-headless>=4; extra == 'opencv'",
                    "mistral_common[opencv]; extra == 'image'",
                    "soundfile; extra == 'audio'",
                    "pydantic-extra-types[pycountry]>=2.10.5",
                ]
            },
            "pydantic": {"2.11.0": [], "2.14.4": ["pydantic-core==2.50.5", "typing-extensions>=4.14"]},
            "pydantic-core": {"2.50.5": ["typing-extensions>=4.14"]},
            "pydantic-extra-types": {"2.11.1": ["pydantic>=2.5", "pycountry>=23; extra == 'pycountry'"]},
            "pycountry": {"26.2.16": []},
            "fastapi": {"0.136.3": ["starlette>=0.40", "pydantic>=2.7"]},
            "starlette": {"0.50.0": [], "1.10.0": []},
            "transformers": {"5.20.0": []},
            "winreg-helper": {"1.0.0": []},
        }
    )
    roots = [
        "llguidance<1.8.0,>=1.7.0; platform_machine == 'x86_64'",
        "mistral_common[image]>=1.11.5",
        "fastapi<0.137",
        "starlette>=1.0.1",
        "torch==2.11.0",
        "flashinfer-python==0.6.14",
        "transformers>=5.18",
        "numpy",
        "winreg-helper; sys_platform == 'win32'",
        "zentorch; extra == 'zen'",
    ]
    present = {
        "torch": "2.11.0",
        "numpy": "2.5.2",
        "opencv-python-headless": None,
        "typing-extensions": None,
        "transformers": "5.17.0",
    }
    result = bundle.resolve(
        roots, index, present, {"flashinfer-python": "not on Hopper"}, {"numpy": "the image's numpy"}, bundle.TARGET_ENV
    )
    assert {n: d.version for n, d in result.carried.items()} == {
        "llguidance": "1.7.6",
        "mistral-common": "1.13.1",
        "fastapi": "0.136.3",
        "starlette": "1.10.0",
        "transformers": "5.20.0",  # the target's 5.17.0 is too old: carried, and said so
        "pydantic": "2.14.4",
        "pydantic-core": "2.50.5",
        "pydantic-extra-types": "2.11.1",
        "pycountry": "26.2.16",
    }
    assert result.skipped == {"flashinfer-python": "not on Hopper"}
    assert set(result.replaced) == {"transformers"} and result.kept == {"numpy": "the image's numpy"}
    assert result.present["opencv-python-headless"]["required"] == ["mistral-common 1.13.1: >=4"]
    assert result.present["torch"] == {"version": "2.11.0", "required": ["the root: ==2.11.0"]}
    # starlette: fetched once, within both requirements; soundfile (extra 'audio') and win32 never asked for
    assert [f for f in index.fetched if f[0] == "starlette"] == [("starlette", ">=1.0.1", [])]
    assert not any(f[0] in ("soundfile", "winreg-helper", "zentorch") for f in index.fetched)
    assert ("mistral-common", ">=1.11.5", ["image"]) in index.fetched


def test_bundle_refetches_a_package_asked_for_more_narrowly():
    bundle = _script("vllm_offline_bundle")
    index = _Index({"a": {"1.0.0": ["c<2"]}, "c": {"1.0.0": [], "1.5.0": []}})
    result = bundle.resolve(["c", "a"], index, {}, {}, {}, bundle.TARGET_ENV)
    assert result.carried["c"].version == "1.5.0"
    assert [f for f in index.fetched if f[0] == "c"] == [("c", "", [])]  # 1.5.0 already satisfies <2
    index = _Index({"a": {"1.0.0": ["c<1.5"]}, "c": {"1.0.0": [], "1.5.0": []}})
    result = bundle.resolve(["c", "a"], index, {}, {}, {}, bundle.TARGET_ENV)
    assert result.carried["c"].version == "1.0.0"
    assert [f[1] for f in index.fetched if f[0] == "c"] == ["", "<1.5"]


def test_bundle_reads_the_target_list_and_wheel_metadata(tmp_path):
    bundle = _script("vllm_offline_bundle")
    listing = tmp_path / "present.txt"
    listing.write_text("# the image\nNumPy==2.5.2\ntyping_extensions\n\nprometheus-client  # no version\n")
    assert bundle.read_present(listing) == {"numpy": "2.5.2", "typing-extensions": None, "prometheus-client": None}
    shipped = bundle.read_present(Path(bundle.__file__).with_name("h200_image_packages.txt"))
    assert shipped["torch"] == "2.11.0" and shipped["triton"] == "3.6.0" and "pydantic" not in shipped
    wheel = tmp_path / "demo_pkg-1.2.0-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            "demo_pkg-1.2.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.2.0\nRequires-Dist: numpy>=1\n"
            "Requires-Dist: rich; extra == 'cli'\n\nA description.\n",
        )
    dist = bundle.wheel_dist(wheel)
    assert (dist.name, dist.version, dist.requires, dist.path) == (
        "demo-pkg",
        "1.2.0",
        ("numpy>=1", "rich; extra == 'cli'"),
        wheel,
    )
