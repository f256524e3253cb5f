"""Kernel configurations: a heuristic default per size, overridden by tuned or requested keys."""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple


def merge_config(default: Dict[str, Any], config: Optional[dict], keys: Sequence[str]) -> Dict[str, Any]:
    """``default`` updated with ``config`` (any subset of ``keys``); unknown keys are an error."""
    merged = dict(default)
    if config:
        unknown = set(config) - set(keys)
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}, expected a subset of {tuple(keys)}")
        merged.update(config)
    return merged


def resolve_path_config(
    config: Optional[dict],
    size_default: Callable[[], Dict[str, Any]],
    path_configs: Mapping[str, Dict[str, Any]],
    keys: Sequence[str],
    narrow_path: Optional[Tuple[str, Sequence[str], Sequence[str]]] = None,
) -> Dict[str, Any]:
    """``config``'s keys over a base: the base configuration of the path ``config`` names (one of
    ``path_configs``), else ``size_default()``, the heuristic default for the call's size.
    ``narrow_path``: ``(path, path_keys, own_keys)`` of a path that reads only some keys
    (:func:`check_path_keys`)."""
    path = (config or {}).get("path")
    if path is None:
        base = size_default()
    elif path in path_configs:
        base = path_configs[path]
    else:
        raise ValueError(f"config: path must be one of {tuple(path_configs)}, got {path!r}")
    cfg = merge_config(base, config, keys)
    if narrow_path is not None:
        check_path_keys(cfg, *narrow_path)
    return cfg


def check_path_keys(cfg: Mapping[str, Any], path: str, path_keys: Sequence[str], own_keys: Sequence[str]) -> None:
    """A resolved configuration of ``path`` holds ``path_keys`` only, and ``own_keys`` (a subset
    of them) appear in configurations of ``path`` alone; else ValueError naming the keys."""
    if cfg["path"] == path:
        foreign = sorted(set(cfg) - set(path_keys))
        if foreign:
            raise ValueError(f"config: path={path!r} reads {tuple(path_keys)} only, got also {foreign}")
    elif any(key in cfg for key in own_keys):
        raise ValueError(f"config: {' and '.join(own_keys)} apply to path={path!r} only, got path={cfg['path']!r}")
