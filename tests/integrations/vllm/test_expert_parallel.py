"""Expert parallelism in the plugin: vLLM's own ``expert_map`` of each of two EP ranks becomes our
``local_expert_offset``, and the two bound layers together compute what one rank with every expert does."""

import json

CHECK = r"""
import json, types
import torch
from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
from moe_backend import FP8BlockWeights, MoEConfig, reference_fused_experts
from moe_backend.integrations.vllm import UnsupportedByMoEBackend
from moe_backend.integrations.vllm.convert import bind, expert_offset

result = {"offsets": {}, "refused": {}}
for e in (16, 9):  # 9: vLLM gives rank 0 the extra expert
    for rank in (0, 1):
        local, emap, _ = determine_expert_map(2, rank, e, "linear")
        result["offsets"][f"{e}/{rank}"] = [local, expert_offset(emap, local)]
result["offsets"]["single"] = expert_offset(None, 16)

def refusal(emap, local):
    try:
        expert_offset(emap, local)
    except UnsupportedByMoEBackend as err:
        return str(err)
    return None

local, rr, _ = determine_expert_map(2, 1, 16, "round_robin")
result["refused"]["round_robin"] = refusal(rr, local)
_, linear, _ = determine_expert_map(2, 1, 16, "linear")
swapped = linear.clone()
swapped[8], swapped[9] = linear[9], linear[8]  # contiguous global ids, local order permuted
result["refused"]["permuted"] = refusal(swapped, 8)
result["refused"]["count"] = refusal(linear, 7)  # the map holds 8 experts, the layer 7

# Two ranks bound as vLLM's FP8 layers would be, each over its slice of the same checkpoint.
torch.manual_seed(0)
e, k, h, i, t = 16, 4, 128, 128, 40
full = FP8BlockWeights.quantize(torch.randn(e, 2 * i, h) / 16, torch.randn(e, h, i) / 11)
hidden = torch.randn(t, h).to(torch.bfloat16)
ids = torch.stack([torch.randperm(e + 1)[:k] - 1 for _ in range(t)]).int()  # -1 and both halves
weights = torch.rand(t, k) + 0.1
outs = []
for rank in (0, 1):
    local, emap, _ = determine_expert_map(2, rank, e, "linear")
    lo = rank * local
    part = FP8BlockWeights(full.w13[lo:lo + local], full.w13_scale[lo:lo + local], full.w2[lo:lo + local],
                           full.w2_scale[lo:lo + local])
    layer = types.SimpleNamespace(expert_map=emap, local_num_experts=local, global_num_experts=e, top_k=k,
                                  apply_router_weight_on_input=False, layer_name=f"rank{rank}.mlp.experts")
    moe = bind(layer, part)
    result[f"rank{rank}"] = {"offset": moe.config.local_expert_offset, "num_experts": moe.config.num_experts}
    outs.append(moe.experts(hidden, ids, weights).double())
want = reference_fused_experts(hidden, full, ids, weights).double()
bound = 2 ** -7 * (outs[0].abs() + outs[1].abs() + want.abs()) + 1e-30
result["sum_within_bf16_rounding"] = bool(((outs[0] + outs[1] - want).abs() <= bound).all())
print(json.dumps(result))
"""


def test_two_ep_ranks_map_to_offsets_and_sum_to_one_rank(python):
    res = python(CHECK)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["offsets"] == {"16/0": [8, 0], "16/1": [8, 8], "9/0": [5, 0], "9/1": [4, 5], "single": 0}
    for case in ("round_robin", "permuted", "count"):
        message = result["refused"][case]
        assert message is not None and "not contiguous" in message and "--moe-backend auto" in message, case
    assert "[1, 3, 5, 7, 9, 11, 13, 15]" in result["refused"]["round_robin"]
    assert result["rank0"] == {"offset": 0, "num_experts": 16}
    assert result["rank1"] == {"offset": 8, "num_experts": 16}
    assert result["sum_within_bf16_rounding"]
