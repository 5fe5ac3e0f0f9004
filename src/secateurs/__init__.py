"""secateurs: structured pruning of causal LMs with forward passes only.

The pipeline, one package each: model adapters (`models`) -> units and masks (`units`) -> what methods
share (`scoring`: calibration statistics, per-unit weight views, selection) -> methods (`methods`, one
module or package each, returning a `Plan`) -> surgery (`surgery`) -> evaluation (`eval`) -> CLI
(`cli`, `compare`); `export` writes a model for other runtimes (GGUF for llama.cpp). `pipeline` runs the prune job end to end; `io` and `checkpoint` hold the one
atomic-write helper and the one checkpoint rule.
"""

from __future__ import annotations

__version__ = "0.1.0"

from secateurs.export import export
from secateurs.models.loading import load_model
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.reconstruct import ReconstructConfig, reconstruct_
from secateurs.surgery.saving import load_pruned as load
from secateurs.surgery.saving import save_pruned as save
from secateurs.units import Masks, Plan, UnitSpace, masked


def plan(model, method: str, calib, **settings) -> Plan:
    """Run a registered method with its config built from `settings`; the model is left unchanged.

    The same path as `secateurs prune` (`pipeline.make_plan`): the target is checked reachable with the
    chosen units before the method starts.

    >>> p = secateurs.plan(model, "wanda-sp", calib=windows, sparsity=0.3)  # doctest: +SKIP
    """
    from secateurs.methods import get_method
    from secateurs.pipeline import make_plan

    return make_plan(model, method, get_method(method).config_class(**settings), calib)


__all__ = [
    "Masks",
    "Plan",
    "ReconstructConfig",
    "UnitSpace",
    "apply_plan_",
    "export",
    "load",
    "load_model",
    "masked",
    "plan",
    "reconstruct_",
    "save",
]
