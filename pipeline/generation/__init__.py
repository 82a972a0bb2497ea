"""The engine and what it runs: configurations, models, scoring, the generation shard task."""
