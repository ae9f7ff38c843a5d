"""tiered_cache: a two-tier (process memory, then Redis) cache in front of model reads."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

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
# before settings are configured. Type checkers see the real names.
if TYPE_CHECKING:
    __version__: str  # the installed distribution's, from pyproject.toml (one place)

    from .derived import cached
    from .managers import CachedManager, CachedManagerMixin, CachedQuerySet
    from .reporting import stats
    from .tiers.local import clear_local

_LAZY = {
    "CachedManager": "managers",
    "CachedManagerMixin": "managers",
    "CachedQuerySet": "managers",
    "stats": "reporting",
    "cached": "derived",
    "clear_local": "tiers.local",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        # Read from the installed metadata on first use: pyproject.toml alone holds it.
        from importlib.metadata import version

        globals()[name] = value = version("django-tiered-cache")
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tiered_cache' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
