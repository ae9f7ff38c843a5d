"""A runnable project that exercises tiered_cache on realistic models."""

from .celery import app as celery_app

__all__ = ["celery_app"]
