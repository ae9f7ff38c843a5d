"""The test suite's own app: every model shape Django has, each behind a cached manager."""
