"""Loading streams: the host memory it needs stays near one MoE layer, however many layers there are."""

import dataclasses
import gc
import mmap

import pytest

from moe_backend.weights.checkpoint import Checkpoint
from moe_backend.weights.checkpoint_maker import TINY, make_checkpoints
from moe_backend.weights.loader import iter_moe_layers
from moe_backend.weights.memory import supported, track_peak_rss

#: 6 MoE layers of 32 experts, H 512, I 256: 25 MB of bf16 experts a layer, 151 MB in all.
SHAPE = dataclasses.replace(
    TINY, hidden_size=512, moe_intermediate_size=256, n_routed_experts=32, num_hidden_layers=7, n_group=4, topk_group=2
)
RELEASE_BYTES = 4 << 20


@pytest.mark.skipif(not supported(), reason="peak RSS is measured through Linux /proc")
def test_streaming_peak_stays_near_one_layer(tmp_path):
    path = make_checkpoints(tmp_path, SHAPE, flavours=["bf16"])["bf16"]
    sizes = []
    gc.collect()
    with Checkpoint(path, release_bytes=RELEASE_BYTES) as ckpt, track_peak_rss() as peak:
        for weights in iter_moe_layers(ckpt, progress=False):
            sizes.append(weights.experts.nbytes())
            del weights
    layer, total = max(sizes), sum(sizes)
    assert len(sizes) == 6 and layer > 25e6
    # one layer, the mapped-page budget twice over, and slack for the allocator; far below all layers
    assert peak.growth < layer + 2 * RELEASE_BYTES + 16e6, (peak.growth, layer)
    assert peak.growth < total / 3


@pytest.mark.skipif(not supported(), reason="peak RSS is measured through Linux /proc")
def test_tracker_sees_an_allocation():
    # A fresh anonymous mapping, every page written: new resident pages by construction. A heap
    # allocation (torch.ones) may reuse pages an earlier test on this worker freed but kept.
    size, page = 40 << 20, mmap.PAGESIZE
    with track_peak_rss() as peak:
        with mmap.mmap(-1, size) as region:
            for offset in range(0, size, page):
                region[offset] = 1
    assert peak.growth >= size - (1 << 20), peak
