"""Prunable units, their costs, keep-masks on a live model, and plans."""

from secateurs.units.masks import Masks, masked
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import SPARSITY_DEFINITION, Kind, UnitSpace, count_parameters

__all__ = [
    "SPARSITY_DEFINITION",
    "Kind",
    "LayerPlan",
    "Masks",
    "Plan",
    "UnitSpace",
    "count_parameters",
    "masked",
]
