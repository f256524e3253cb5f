"""Build one real SGLang MoE layer on the CPU with ``--moe-runner-backend moe_backend`` and check it.

Run as a script (one process per check: SGLang plugins load once per process)::

    python layer_check.py {fp8_block,fp8_tensor,nvfp4,refusals,scaling_rule}

It loads the plugins, publishes SGLang's runtime config for a tiny DeepSeek-V3
(``ServerArgs`` over a config.json, a world of one gloo rank), builds SGLang's
``FusedMoE`` with the precision's quantization config and a fused shared expert
(9 experts, top-3 of which the last is the shared one), loads quantized experts
one projection at a time through SGLang's weight loader (the checkpoint path),
runs ``process_weights_after_loading`` and the layer's forward on a top-k with
``-1`` ids (what the dispatcher hands a rank under expert parallelism), and prints
one JSON line: the quantization method, the runner backend, and whether the
output equals ``moe_backend.reference_fused_experts`` on the same weights with
the router weights times ``routed_scaling_factor`` (bit for bit). ``refusals``
builds layers the backend cannot serve and prints the start-up error of each.
``scaling_rule`` builds SGLang's own ModelOpt NVFP4 layer on its Marlin runner and
FP8 block layer on its Triton runner, then our FP8 block and NVFP4 layers, and
prints where each applies ``routed_scaling_factor``: folded into the top-k, in
SGLang's runner, or in our binding.
"""

import json
import os
import socket
import sys
import tempfile

import torch

E, K, H, I, T = 9, 3, 256, 256, 7  # expert E-1 is the fused shared expert
SCALING = 2.5


def _model_dir(precision):
    """A config.json for SGLang's ServerArgs (no weights: the layer is built by hand)."""
    quant = (
        {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            **({"weight_block_size": [128, 128]} if precision == "fp8_block" else {}),
        }
        if precision.startswith("fp8")
        else {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    )
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                "model_type": "deepseek_v3",
                "hidden_size": H,
                "intermediate_size": 512,
                "moe_intermediate_size": I,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "n_routed_experts": E - 1,
                "num_experts_per_tok": K - 1,
                "n_shared_experts": 1,
                "n_group": 1,
                "topk_group": 1,
                "routed_scaling_factor": SCALING,
                "first_k_dense_replace": 1,
                "vocab_size": 128,
                "q_lora_rank": None,
                "kv_lora_rank": 64,
                "qk_nope_head_dim": 32,
                "qk_rope_head_dim": 16,
                "v_head_dim": 32,
                "max_position_embeddings": 512,
                "torch_dtype": "bfloat16",
                "quantization_config": quant,
            },
            f,
        )
    return path


def _publish(precision, backend="moe_backend"):
    """The runtime config of a server started with ``--moe-runner-backend backend`` (last publish wins)."""
    from sglang.srt import runtime_context
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=_model_dir(precision), moe_runner_backend=backend, device="cpu")
    runtime_context.publish(args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0))
    initialize_moe_config()


def _init_sglang(precision, backend="moe_backend"):
    """Plugins, the runtime config of a server started with ``backend`` (ours by default), one gloo rank."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel

    _publish(precision, backend)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
    )
    initialize_model_parallel()


def _quant_config(precision):
    if precision == "nvfp4":
        from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config

        return ModelOptFp4Config(is_checkpoint_nvfp4_serialized=True, group_size=16, exclude_modules=[])
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    block = [128, 128] if precision == "fp8_block" else None
    return Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic", weight_block_size=block)


def _checkpoint_tensors(precision, weights, e):
    """(suffix, shard, tensor) of expert ``e`` as a checkpoint stores them (gate = w1, up = w3, down = w2)."""
    if precision == "fp8_block":
        s = I // 128
        yield "weight", "w1", weights.w13[e, :I]
        yield "weight", "w3", weights.w13[e, I:]
        yield "weight", "w2", weights.w2[e]
        yield "weight_scale_inv", "w1", weights.w13_scale[e, :s]
        yield "weight_scale_inv", "w3", weights.w13_scale[e, s:]
        yield "weight_scale_inv", "w2", weights.w2_scale[e]
        return
    if precision == "fp8_tensor":
        # Gate and up each carry the expert's scale, as a per-projection checkpoint stores them.
        yield "weight", "w1", weights.w13[e, :I]
        yield "weight", "w3", weights.w13[e, I:]
        yield "weight", "w2", weights.w2[e]
        for shard in ("w1", "w3"):
            yield "weight_scale", shard, weights.w13_scale[e]
        yield "weight_scale", "w2", weights.w2_scale[e]
        return
    yield "weight", "w1", weights.w13[e, :I]
    yield "weight", "w3", weights.w13[e, I:]
    yield "weight", "w2", weights.w2[e]
    yield "weight_scale", "w1", weights.w13_scale[e, :I]
    yield "weight_scale", "w3", weights.w13_scale[e, I:]
    yield "weight_scale", "w2", weights.w2_scale[e]
    yield "weight_scale_2", "w1", weights.w13_scale_2[e, 0]
    yield "weight_scale_2", "w3", weights.w13_scale_2[e, 1]
    yield "weight_scale_2", "w2", weights.w2_scale_2[e]
    for shard in ("w1", "w3", "w2"):
        yield "input_scale", shard, torch.tensor(1.0)


def _load(layer, precision, weights):
    params = dict(layer.named_parameters())
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for e in range(E):
        for suffix, shard, tensor in _checkpoint_tensors(precision, weights, e):
            param = params[("w13_" if shard != "w2" else "w2_") + suffix]
            # What the model loaders call: the parameter's own loader (it may wrap the layer's).
            param.weight_loader(
                param, tensor.clone(), f"experts.{e}.{names[shard]}.{suffix}", shard_id=shard, expert_id=e
            )


def _fused_moe(precision):
    """SGLang's ``FusedMoE`` for ``precision`` with a fused shared expert, as DeepSeek-V3 builds it."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE(
        num_experts=E,
        hidden_size=H,
        intermediate_size=I,
        layer_id=1,
        top_k=K,
        num_fused_shared_experts=1,
        params_dtype=torch.bfloat16,
        quant_config=_quant_config(precision),
        prefix="model.layers.1.mlp.experts",
        routed_scaling_factor=SCALING,
    )


def _loaded_weights(layer, precision):
    """Quantized experts loaded into ``layer`` through SGLang's loaders, then post-processed (binds ours)."""
    from moe_backend.expert_weights import WEIGHT_TYPES

    torch.manual_seed(0)
    # Gate and up get different magnitudes so NVFP4's two global scales differ.
    w13 = torch.cat([torch.randn(E, I, H) * 0.05, torch.randn(E, I, H) * 0.02], 1)
    weights = WEIGHT_TYPES[precision].quantize(w13, torch.randn(E, H, I) * 0.05)
    _load(layer, precision, weights)
    layer.quant_method.process_weights_after_loading(layer)
    return weights


def main(precision):
    _init_sglang(precision)
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from moe_backend import reference_fused_experts

    layer = _fused_moe(precision)
    weights = _loaded_weights(layer, precision)

    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids = torch.randint(0, E - 1, (T, K), dtype=torch.int32)
    ids[:, -1] = E - 1  # the fused shared expert
    ids[1, 0] = -1  # an expert on another EP rank
    ids[4, :2] = -1
    topk_weights = torch.rand(T, K)
    out = layer(x, StandardTopKOutput(topk_weights, ids, torch.zeros(T, E)))
    scaled = None if layer.should_fuse_routed_scaling_factor_in_topk else SCALING
    ref = reference_fused_experts(x, weights, ids, topk_weights * scaled if scaled else topk_weights)
    print(
        json.dumps(
            {
                "capture": _capture_check(layer, x, ids, topk_weights, out),
                "method": type(layer.quant_method).__name__,
                "runner": layer.runner_backend.value,
                "scaling_in_runner": scaled,
                "equal": bool(torch.equal(out, ref)),
                "max_abs_diff": (out.float() - ref.float()).abs().max().item(),
            }
        )
    )


def _capture_check(layer, x, ids, topk_weights, expected):
    """Hand SGLang's real routed-experts capturer to the layer's binding; run again; return what it recorded."""
    from sglang.srt.layers.moe.topk import StandardTopKOutput, TopK
    from sglang.srt.state_capturer.base import BaseDeviceCache
    from sglang.srt.state_capturer.routed_experts import RoutedExpertsCapturer, set_global_experts_capturer

    from moe_backend.integrations.sglang.capture import move_capture_to_experts

    # The capturer's __init__ also pins a host cache through CUDA; the device side is what the
    # forward pass writes, so build the capturer with its real device cache only.
    capturer = RoutedExpertsCapturer.__new__(RoutedExpertsCapturer)
    capturer.num_fused_shared_experts = 1
    capturer.device_cache = BaseDeviceCache(64, 2, K, "cpu", name="routed_experts")
    set_global_experts_capturer(capturer)
    block = torch.nn.Module()  # a DeepSeek MoE block: its TopK and its experts
    block.topk = TopK(K - 1, layer_id=1)
    block.experts = layer
    moved = move_capture_to_experts(block)
    out = layer(x, StandardTopKOutput(topk_weights, ids, torch.zeros(T, E)))
    recorded = capturer.device_cache.buffer[:T, 1, :]
    return {
        "moved": moved,
        "topk_capture_off": not block.topk.topk_config.allow_routed_experts_capture,
        "recorded_equal_ids": bool(torch.equal(recorded.long(), ids.long())),
        "output_unchanged": bool(torch.equal(out, expected)),
    }


def refusals():
    """The start-up error (or None) for each MoE layer SGLang would build that we cannot serve."""
    _init_sglang("fp8_block")
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from moe_backend.integrations.sglang import UnsupportedByMoEBackend

    cases = {
        "served": {},
        "unquantized": {"quant_config": None},
        "gelu": {"activation": "gelu"},
        "float16": {"params_dtype": torch.float16},
        "online_fp8": {"quant_config": Fp8Config(is_checkpoint_fp8_serialized=False)},
        "block_64": {"quant_config": Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[64, 64])},
    }
    errors = {}
    for name, overrides in cases.items():
        kwargs = dict(
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layer_id=1,
            top_k=K,
            params_dtype=torch.bfloat16,
            quant_config=_quant_config("fp8_block"),
            prefix="model.layers.1.mlp.experts",
            routed_scaling_factor=SCALING,
        )
        kwargs.update(overrides)
        try:
            FusedMoE(**kwargs)
        except UnsupportedByMoEBackend as err:
            errors[name] = str(err)
        else:
            errors[name] = None
    print(json.dumps(errors))


#: (case, precision, --moe-runner-backend): SGLang's own runners first (no moe_backend layer), then ours.
SCALING_CASES = (
    ("sglang_nvfp4_marlin", "nvfp4", "marlin"),
    ("sglang_fp8_block_triton", "fp8_block", "triton"),
    ("ours_fp8_block", "fp8_block", "moe_backend"),
    ("ours_nvfp4", "nvfp4", "moe_backend"),
)


def scaling_rule():
    """Where each case's layer applies ``routed_scaling_factor``, one process, re-publishing the backend.

    ``fused_in_topk``: the layer asks the model's top-k to fold the factor into the router
    weights (DeepSeek passes it as ``apply_routed_scaling_factor_on_output``).
    ``runner_factor``: ``moe_runner_config.routed_scaling_factor``, which SGLang's Marlin and
    Triton runners multiply by unconditionally (``runner_reads_layer_config``: the config their
    ``MoeRunner`` holds is the layer's). ``binding_factor`` (ours only): what our binding
    multiplies the router weights by (None: nothing); our runner never reads ``runner_factor``.
    SGLang's own layers are only built (not loaded or run): their runners need a GPU.
    """
    from moe_backend.integrations.sglang.binding import ATTR

    _init_sglang(SCALING_CASES[0][1], SCALING_CASES[0][2])
    cases = {}
    for name, precision, backend in SCALING_CASES:
        _publish(precision, backend)
        layer = _fused_moe(precision)
        case = {
            "method": type(layer.quant_method).__name__,
            "runner": layer.runner_backend.value,
            "fused_in_topk": layer.should_fuse_routed_scaling_factor_in_topk,
            "runner_factor": layer.moe_runner_config.routed_scaling_factor,
            "runner_reads_layer_config": layer.quant_method.runner.config is layer.moe_runner_config,
        }
        if backend == "moe_backend":
            _loaded_weights(layer, precision)
            case["binding_factor"] = getattr(layer, ATTR).routed_scaling_factor
        cases[name] = case
    print(json.dumps(cases))


CHECKS = {"refusals": refusals, "scaling_rule": scaling_rule}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]() if sys.argv[1] in CHECKS else main(sys.argv[1])
