"""Top-k selection (DeepSeek-V3 grouped and the common variants), the packed codec, replay."""

from .packed import MAX_PACKED_ID, pack_topk, unpack_topk
from .replay import check_replay_out, write_routing_replay
from .topk import (
    METHODS,
    RoutingConfig,
    noaux_tc_topk,
    renormalize_topk,
    sigmoid_topk,
    softmax_topk,
)

__all__ = [
    "MAX_PACKED_ID",
    "METHODS",
    "RoutingConfig",
    "check_replay_out",
    "noaux_tc_topk",
    "pack_topk",
    "renormalize_topk",
    "sigmoid_topk",
    "softmax_topk",
    "unpack_topk",
    "write_routing_replay",
]
