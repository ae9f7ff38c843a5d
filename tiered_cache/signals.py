"""Django signals sent by tiered_cache, for metrics or logging of your own."""

from django.dispatch import Signal

# sender: the model class; kwargs: tier ("l1", "l2"), key.
cache_hit = Signal()
# sender: the model class; kwargs: key.
cache_miss = Signal()
# sender: the model class; kwargs: rows (row ids), flush (bool).
cache_invalidated = Signal()
