"""dynoracle: distributed batch oracle search for dynamic layer selection in decoder-only transformers."""

__version__ = "0.1.0"
