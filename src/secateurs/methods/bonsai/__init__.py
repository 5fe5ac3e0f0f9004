"""Bonsai (arXiv 2402.05406): the method and its rounds (`method`), the plain tensor steps of a round
(`candidates`: candidates, antithetic masks, unit scores, protection) and its regression estimator
(`regression`)."""

from secateurs.methods.bonsai.method import Bonsai, BonsaiConfig

__all__ = ["Bonsai", "BonsaiConfig"]
