"""secateurs: structured pruning of causal LMs with forward passes only.

The pipeline, one module each: model adapters (`models`) -> units and masks (`units`) -> methods
(`methods`, returning a `Plan`) -> surgery (`surgery`) -> evaluation (`eval`) -> CLI (`cli`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from secateurs.models.loading import load_model
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.saving import load_pruned as load
from secateurs.surgery.saving import save_pruned as save
from secateurs.units import Masks, Plan, UnitSpace, masked


def plan(model, method: str, calib, **settings) -> Plan:
    """Run a registered method with its config built from `settings`; the model is left unchanged.

    >>> p = secateurs.plan(model, "wanda-sp", calib=windows, sparsity=0.3)  # doctest: +SKIP
    """
    from secateurs.methods import get_method

    cls = get_method(method)
    return cls(cls.config_class(**settings)).plan(model, UnitSpace.from_model(model), calib)


__all__ = ["Masks", "Plan", "UnitSpace", "apply_plan_", "load", "load_model", "masked", "plan", "save"]
