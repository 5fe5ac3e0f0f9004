"""Policy-gradient Bernoulli masks (arXiv 2406.10576): the method (`method`) and its plain tensor maths
(`estimator`: score-function gradient, budget projection, init)."""

from secateurs.methods.policy_gradient.method import PolicyGradient, PolicyGradientConfig, UnitVector

__all__ = ["PolicyGradient", "PolicyGradientConfig", "UnitVector"]
