"""The tuning warm-up calls ``layer.warmup(n)`` on every served layer that has one."""

from types import SimpleNamespace

import torch


def test_warm_up_calls_layers_that_can_tune():
    from moe_backend.integrations.sglang.binding import ATTR, Binding
    from moe_backend.integrations.sglang.warmup import warm_up

    calls = []
    tunable = SimpleNamespace(warmup=calls.append)
    model = torch.nn.Sequential(torch.nn.Module(), torch.nn.Module(), torch.nn.Module())
    setattr(model[0], ATTR, Binding(tunable, layer_id=3))
    setattr(model[1], ATTR, Binding(SimpleNamespace(), layer_id=4))  # a layer that cannot tune: skipped
    assert warm_up(model, 8192) == 1
    assert calls == [8192]
