"""Bonsai (arXiv 2402.05406): the method (`method`) and its regression estimator (`regression`)."""

from secateurs.methods.bonsai.method import Bonsai, BonsaiConfig

__all__ = ["Bonsai", "BonsaiConfig"]
