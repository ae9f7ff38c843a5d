"""The demo app: the models whose reads tiered_cache serves."""
