"""Functions that tests run inside worker processes (tests/processes.py)."""

from __future__ import annotations

from typing import Any

from django.apps import apps

import tiered_cache


def get(label: str, field: str, **lookup: Any) -> Any:
    """One field of a row read through the cache, or "DoesNotExist"."""
    model = apps.get_model(label)
    try:
        return getattr(model.objects.get_cached(**lookup), field)
    except model.DoesNotExist:
        return "DoesNotExist"


def update(label: str, pk: Any, **fields: Any) -> None:
    model = apps.get_model(label)
    obj = model.objects.get(pk=pk)
    for name, value in fields.items():
        setattr(obj, name, value)
    obj.save()


def stats(label: str) -> dict[str, Any]:
    return tiered_cache.stats().get(label, {})


def clear_local() -> None:
    tiered_cache.clear_local()


def resolve(name: str) -> Any:
    from tests.testapp.resolvers import resolve_global_model

    gm = resolve_global_model(name)
    return None if gm is None else gm.name


def imported(module: str) -> bool:
    """Whether this process has imported `module` (tests of what a process never loaded)."""
    import sys

    return module in sys.modules
