"""A derived function of the test app: cached with tiered_cache.cached, depending on three
models (tests/test_derived.py reads it in another process, tests/process_tasks.py)."""

from __future__ import annotations

from tiered_cache import cached

from .models import GlobalModel, Provider, ProviderModel


@cached(depends_on=[Provider, ProviderModel, GlobalModel], timeout=3600, negative_timeout=60)
def resolve_global_model(name: str) -> GlobalModel | None:
    """The GlobalModel a client means by `name`: an active offer of that name through an
    active provider first, then GlobalModel.name; None (remembered) when nothing matches."""
    name = name.strip()
    if not name:
        return None
    offer = (
        ProviderModel.objects.filter(
            provider_model_name=name,
            is_active=True,
            provider__is_active=True,
            global_model__is_active=True,
        )
        .select_related("global_model")
        .order_by("pk")
        .first()
    )
    if offer is not None:
        return offer.global_model
    return GlobalModel.objects.filter(name=name, is_active=True).first()
