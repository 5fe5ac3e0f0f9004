"""Pruning methods. Each module registers itself; importing this package makes them all available."""

from secateurs.methods import (
    block_influence,  # noqa: F401
    bonsai,  # noqa: F401
    flap,  # noqa: F401
    magnitude,  # noqa: F401
    policy_gradient,  # noqa: F401
    random_method,  # noqa: F401
    taylor,  # noqa: F401
    wanda_sp,  # noqa: F401
)
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
