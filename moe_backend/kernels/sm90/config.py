"""Kernel configurations: a heuristic default per size, overridden by tuned or requested keys."""

from typing import Any, Dict, Optional, Sequence


def merge_config(default: Dict[str, Any], config: Optional[dict], keys: Sequence[str]) -> Dict[str, Any]:
    """``default`` updated with ``config`` (any subset of ``keys``); unknown keys are an error."""
    merged = dict(default)
    if config:
        unknown = set(config) - set(keys)
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}, expected a subset of {tuple(keys)}")
        merged.update(config)
    return merged
