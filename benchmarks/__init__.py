"""Benchmarks of tiered_cache (`make bench`, `make bench-peers`); not tests, not shipped.

They run against real PostgreSQL and Redis on the test app's settings (tests/settings.py),
in databases and Redis key prefixes of their own."""
