"""Routing-replay buffer contract: int16 [R >= T, k], rows >= T untouched."""

import pytest
import torch

from moe_backend.routing import check_replay_out, write_routing_replay


def test_writes_first_t_rows_only():
    buf = torch.full((10, 3), -7, dtype=torch.int16)
    ids = torch.tensor([[1, 2, 3], [4, 5, -1]], dtype=torch.int32)
    write_routing_replay(ids, buf)
    assert buf[:2].tolist() == [[1, 2, 3], [4, 5, -1]]
    assert bool((buf[2:] == -7).all())


def test_none_is_a_no_op_and_t0():
    write_routing_replay(torch.zeros(2, 2, dtype=torch.int32), None)
    buf = torch.full((4, 2), 9, dtype=torch.int16)
    write_routing_replay(torch.zeros(0, 2, dtype=torch.int32), buf)
    assert bool((buf == 9).all())


@pytest.mark.parametrize(
    "buf, match",
    [
        (torch.zeros(4, 2, dtype=torch.int32), "routing_replay_out: expected dtype torch.int16"),
        (torch.zeros(4, 3, dtype=torch.int16), r"routing_replay_out: expected shape \(\*, 2\)"),
        (torch.zeros(2, 2, dtype=torch.int16), "routing_replay_out: expected at least 3 rows"),
        (torch.zeros(2, 4, dtype=torch.int16).t(), "routing_replay_out: expected a contiguous tensor"),
        (torch.zeros(8, dtype=torch.int16), r"routing_replay_out: expected shape \(\*, 2\), got shape \(8,\)"),
    ],
)
def test_bad_buffers(buf, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_replay_out(buf, 3, 2, torch.device("cpu"))
