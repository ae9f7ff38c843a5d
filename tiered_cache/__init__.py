"""tiered_cache: a two-tier (process memory, then Redis) cache in front of model reads."""

from __future__ import annotations

from typing import Any

from .exceptions import UncacheableArguments, UndeclaredLookup

__all__ = [
    "CachedManager",
    "CachedManagerMixin",
    "CachedQuerySet",
    "UncacheableArguments",
    "UndeclaredLookup",
    "cached",
    "clear_local",
    "stats",
]

# Managers import the ORM; loading them lazily keeps `import tiered_cache` cheap and safe
# before settings are configured.
_LAZY = {
    "CachedManager": "managers",
    "CachedManagerMixin": "managers",
    "CachedQuerySet": "managers",
    "stats": "counters",
    "cached": "derived",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tiered_cache' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def clear_local() -> None:
    """Empty this process's L1 (tests, benchmarks). Other processes are not touched."""
    from .tiers.local import local_tier

    local_tier.clear()
