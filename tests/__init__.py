"""Tests of tiered_cache and the demo project."""
