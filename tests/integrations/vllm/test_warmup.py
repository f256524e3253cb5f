"""The tuning warm-up calls ``layer.warmup(n)`` on every served layer that has one."""

import logging
from types import SimpleNamespace

import torch


def test_warm_up_calls_layers_that_can_tune(caplog):
    from moe_backend import MoEConfig
    from moe_backend.integrations.vllm.convert import ATTR, Binding
    from moe_backend.integrations.vllm.warmup import warm_up

    calls = []
    # rank 1 of two EP ranks: experts [8, 16) of 16
    tunable = SimpleNamespace(warmup=calls.append, config=MoEConfig(num_experts=16, top_k=4, local_expert_offset=8))
    model = torch.nn.Sequential(torch.nn.Module(), torch.nn.Module(), torch.nn.Module())
    model[0].local_num_experts = 8
    setattr(model[0], ATTR, Binding(tunable))
    setattr(model[1], ATTR, Binding(SimpleNamespace()))  # a layer that cannot tune: skipped
    with caplog.at_level(logging.INFO, logger="moe_backend"):
        assert warm_up(model, 8192, rank=1) == 1
    assert calls == [8192]
    assert "tuning warm-up of 1 MoE layers for up to 8192 tokens" in caplog.text
    assert "(rank 1, experts [8, 16) of 16)" in caplog.text
