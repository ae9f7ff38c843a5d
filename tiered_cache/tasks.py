"""Celery tasks: warm a model's L2 and clean up Redis, never two runs at once.

The only module of tiered_cache that imports Celery (the optional extra
``tiered_cache[celery]``). Both tasks are idempotent, so ``acks_late`` redelivery after a
lost worker is harmless; a run that finds the lock taken returns at once.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import maintenance
from .registry import resolve_models
from .reporting import publisher

# A queued run older than this is dropped: the next scheduled one is as good.
WARMUP_EXPIRES = 10 * 60
CLEANUP_EXPIRES = 30 * 60
# Hard limits; the locks outlive them a little so a killed run frees its lock by expiry.
WARMUP_TIME_LIMIT = 15 * 60
CLEANUP_TIME_LIMIT = 30 * 60
_LOCK_MARGIN = 60


@shared_task(
    name="tiered_cache.tasks.warmup",
    acks_late=True,
    expires=WARMUP_EXPIRES,
    time_limit=WARMUP_TIME_LIMIT,
    soft_time_limit=WARMUP_TIME_LIMIT - 30,
)
def warmup(model_label: str, limit: int | None = None) -> dict[str, Any]:
    """Fill L2 with the model's warmup set; returns {"model", "stored", "refused", ...},
    or {"model", "skipped": "locked"} while another warmup of the model runs."""
    (model,) = resolve_models([model_label])
    limit = maintenance.warmup_limit(limit)
    publisher.start()
    label = model._meta.label
    with maintenance.exclusive(
        f"warmup:{model._meta.label_lower}", WARMUP_TIME_LIMIT + _LOCK_MARGIN
    ) as acquired:
        if not acquired:
            return {"model": label, "skipped": "locked"}
        return maintenance.warmup(model, limit)


@shared_task(
    name="tiered_cache.tasks.cleanup_expired",
    acks_late=True,
    expires=CLEANUP_EXPIRES,
    time_limit=CLEANUP_TIME_LIMIT,
    soft_time_limit=CLEANUP_TIME_LIMIT - 30,
)
def cleanup_expired() -> dict[str, Any]:
    """Delete what Redis can no longer serve and prune this worker's L1; returns counts,
    or {"skipped": "locked"} while another cleanup runs."""
    publisher.start()
    with maintenance.exclusive("cleanup", CLEANUP_TIME_LIMIT + _LOCK_MARGIN) as acquired:
        if not acquired:
            return {"skipped": "locked"}
        return maintenance.cleanup()
