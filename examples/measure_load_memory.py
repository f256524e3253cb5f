"""Peak host memory of loading a checkpoint's MoE layers: streaming keeps it near one layer.

    python examples/measure_load_memory.py [CHECKPOINT_DIR ...] [--size tiny|medium]

Without directories it writes the chosen preset (default: medium, H 1024, I 512, 64
experts, 4 MoE layers) in bf16, FP8 and NVFP4 into a temporary directory. For each
checkpoint it reports the peak RSS above the starting RSS (the Linux high-water mark)
of (a) streaming every MoE layer and dropping it, as an engine that moves each layer to
its GPU does, and (b) keeping all layers, against one layer's and all layers' bytes.
Each measurement runs in a fresh process, so memory freed by one cannot hide in the next.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Tuple

from moe_backend.weights.checkpoint import Checkpoint
from moe_backend.weights.checkpoint_maker import MEDIUM, TINY, make_checkpoints
from moe_backend.weights.loader import iter_moe_layers
from moe_backend.weights.memory import track_peak_rss

SIZES = {"tiny": TINY, "medium": MEDIUM}


def peak_growth(path: Path, keep: bool) -> Tuple[int, int, int]:
    """(peak RSS growth, largest layer's expert bytes, all layers' expert bytes) of one load."""
    kept, sizes = [], []
    with Checkpoint(path) as ckpt, track_peak_rss() as peak:
        for weights in iter_moe_layers(ckpt, progress=False):
            sizes.append(weights.experts.nbytes())
            if keep:
                kept.append(weights)
            del weights
    return peak.growth, max(sizes), sum(sizes)


def in_fresh_process(path: Path, keep: bool) -> Tuple[int, int, int]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(peak_growth, path, keep).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="*", help="checkpoint directories")
    parser.add_argument("--size", choices=tuple(SIZES), default="medium", help="preset to write when none is given")
    args = parser.parse_args()
    mb = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.checkpoints or list(make_checkpoints(Path(tmp), SIZES[args.size]).values())
        for path in paths:
            streamed, layer, total = in_fresh_process(path, False)
            kept, _, _ = in_fresh_process(path, True)
            files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            print(
                f"{path.name:<10} files {files / mb:6.1f} MB; MoE experts: one layer {layer / mb:6.1f} MB, "
                f"all {total / mb:6.1f} MB; peak RSS growth: streaming {streamed / mb:6.1f} MB, "
                f"keeping all {kept / mb:6.1f} MB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
