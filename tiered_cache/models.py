"""The outbox of invalidations that could not reach Redis, applied when it answers again."""

from django.db import models


class PendingInvalidation(models.Model):
    """Written only when Redis is unreachable after a commit; any process drains it
    before it trusts L2 again, so a write during an outage is never served stale."""

    GROUP, DERIVED = "group", "derived"

    # What the row invalidates: rows (or all, with flush) of an invalidation group, whose
    # id is in model_label ("alias:app.model"); or derived results, whose keys are in rows
    # and whose function is in model_label.
    kind = models.CharField(
        max_length=10,
        choices=[(GROUP, "model rows"), (DERIVED, "derived results")],
        default=GROUP,
    )
    model_label = models.CharField(max_length=200)
    rows = models.JSONField(default=list)
    flush = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        what = "flush" if self.flush else f"{len(self.rows)} rows"
        return f"{self.model_label}: {what}"
