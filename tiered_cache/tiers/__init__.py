"""The two tiers: L1 in this process's memory, L2 in Redis."""

from .local import LocalTier, local_tier
from .remote import RedisTier, Unavailable, redis_tier

__all__ = ["LocalTier", "RedisTier", "Unavailable", "local_tier", "redis_tier"]
