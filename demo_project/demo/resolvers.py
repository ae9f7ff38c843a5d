"""Derived lookups of the demo, cached with tiered_cache.cached."""

from __future__ import annotations

import logging

from tiered_cache import cached

from .models import GlobalModel, Model, Provider

logger = logging.getLogger(__name__)


@cached(depends_on=[Provider, Model, GlobalModel], timeout=3600, negative_timeout=60)
def resolve_global_model(name: str) -> GlobalModel | None:
    """The GlobalModel a client means by `name`: first an active provider model whose
    provider_model_name matches (through an active provider), then GlobalModel.name.
    Provider-level aliases are deliberately not used: they only hold within one provider.
    None (remembered for a minute) when nothing matches."""
    name = name.strip()
    if not name:
        return None
    matches = (
        Model.objects.filter(
            provider_model_name=name,
            is_active=True,
            provider__is_active=True,
            global_model__is_active=True,
        )
        .select_related("global_model")
        .order_by("pk")
    )
    found: dict[int, GlobalModel] = {}
    for m in matches:
        found.setdefault(m.global_model_id, m.global_model)
    if found:
        if len(found) > 1:
            logger.warning(
                "model name %r maps to several global models (%s); using the first",
                name,
                ", ".join(gm.name for gm in found.values()),
            )
        return next(iter(found.values()))
    return GlobalModel.objects.filter(name=name, is_active=True).first()
