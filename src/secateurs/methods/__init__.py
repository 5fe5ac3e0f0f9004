"""Pruning methods. Each module registers itself; importing this package makes them all available."""

from secateurs.methods import magnitude  # noqa: F401
from secateurs.methods.base import (
    REGISTRY,
    Method,
    MethodConfig,
    MetricMethod,
    UnitScores,
    get_method,
    register,
)

__all__ = ["REGISTRY", "Method", "MethodConfig", "MetricMethod", "UnitScores", "get_method", "register"]
