"""secateurs: structured pruning of causal LMs with forward passes only."""

__version__ = "0.1.0"
