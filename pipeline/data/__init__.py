"""The dataset adapters, the split and prompt sources."""
