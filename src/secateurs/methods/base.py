"""The method interface: model + units + calibration windows + a config dataclass -> a Plan.

Methods register by name with `@register`; the CLI's `--method`, `secateurs methods` and the comparison
harness find them in `REGISTRY`. Metric methods (`MetricMethod`) also expose per-unit scores, which other
methods use as priors (Bonsai) or initialisations (policy gradient).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.units.plan import Plan
from secateurs.units.space import FINE_KINDS, Kind, UnitSpace

ALLOCATIONS = ("uniform", "global")


@dataclass
class MethodConfig:
    """Settings every method shares. Subclass it (a dataclass) to add a method's own settings.

    `sparsity` is the fraction of attention+MLP parameters to remove (see `SPARSITY_DEFINITION`).
    """

    sparsity: float = 0.5
    units: tuple[str, ...] = FINE_KINDS
    allocation: str = field(
        default="global", metadata={"help": "uniform: same count per layer; global: anywhere"}
    )
    attention_allocation: str = field(
        default="inherit",
        metadata={
            "help": "inherit (as --allocation) | uniform: the same GQA groups count in every layer (what "
            "vLLM's per-layer architecture needs), MLP channels still as --allocation | global"
        },
    )
    seed: int = 0
    batch_rows: int = field(default=8, metadata={"help": "rows per forward (memory bound)"})

    def __post_init__(self) -> None:
        if not 0.0 < float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if isinstance(self.units, str):
            self.units = tuple(u.strip() for u in self.units.split(",") if u.strip())
        valid = {k.value for k in Kind}
        bad = [u for u in self.units if u not in valid]
        if bad or not self.units:
            raise ConfigError(f"unknown unit kinds {bad or '(none)'}; choose from {', '.join(sorted(valid))}")
        self.units = tuple(Kind(u) for u in self.units)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.attention_allocation not in ("inherit", *ALLOCATIONS):
            raise ConfigError(
                f"attention_allocation must be inherit, uniform or global, got {self.attention_allocation!r}"
            )
        if self.attention_allocation == "global" and self.allocation == "uniform":
            raise ConfigError("attention_allocation global with allocation uniform is not supported")

    @property
    def uniform_attention(self) -> bool:
        """Whether every layer must keep the same number of GQA groups (`attention_allocation`)."""
        return self.attention_allocation == "uniform" or (
            self.attention_allocation == "inherit" and self.allocation == "uniform"
        )

    def scored_repair(self) -> dict[str, str]:
        """The repair settings (`ReconstructConfig` fields) the search scores its sub-models for, when
        it models the final repair: a run repairing otherwise chose its shape for a model that does not
        ship (`pipeline.search` warns). Empty: the method assumes no repair."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class UnitScores:
    """Importance per unit (higher = keep), per layer: {kind: [tensor per layer]}.

    For global allocation scores must be comparable across layers and kinds; methods put them on a
    per-parameter scale (e.g. a mean over the unit's weights) or standardise them.
    """

    scores: dict[str, list[torch.Tensor]]

    def __getitem__(self, kind: str) -> list[torch.Tensor]:
        return self.scores[kind]

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {k: [t.tolist() for t in v] for k, v in self.scores.items()}


EvaluatorFactory = Callable[[nn.Module, torch.Tensor, UnitSpace], Any]


class Method(ABC):
    """A pruning method. Subclasses set `name`, `description`, `config_class` and implement `plan`.

    Methods that score sub-models get their evaluator from `self.evaluator(...)`, never by building a
    `SubmodelEvaluator` themselves: `evaluator_factory(model, windows, space)` (anything with
    `.losses(masks) -> [batch]`) replaces it, which is how tests plug in synthetic losses and how every
    method gets the same batching (and, later, the same workers).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_backprop: ClassVar[bool] = False

    def __init__(
        self,
        config: MethodConfig | None = None,
        evaluator_factory: EvaluatorFactory | None = None,
        repair_windows: torch.Tensor | None = None,
    ):
        self.config = config or self.config_class()
        self.evaluator_factory = evaluator_factory
        self.repair_windows = repair_windows

    def fit_windows(self, calib: torch.Tensor) -> torch.Tensor:
        """The windows a method fits a *sample repair* on (refits that score sub-models as repaired):
        the run's repair windows where the caller gave them (`pipeline.search` does), else `calib`.

        Why not the search's own windows: refits of a 1,536-input MLP fitted on 32 x 128 tokens overfit
        them. SmolLM2-135M at 50%, the policy gradient's shape (seed 0): its sub-model's perplexity is
        72.1 on the search's windows and 152.0 on held-out text with the refits fitted on those windows;
        112.1 and 121.5 fitted on the repair's 128 x 256 (`bench/proxy_fidelity.py`). A search on the
        overfitted proxy rewards shapes whose refits fit the calibration noise."""
        return calib if self.repair_windows is None else self.repair_windows

    def evaluator(self, model: nn.Module, windows: torch.Tensor, space: UnitSpace):
        """The sub-model evaluator on `windows` (see the class docstring)."""
        if self.evaluator_factory is not None:
            return self.evaluator_factory(model, windows, space)
        from secateurs.eval.loss import SubmodelEvaluator

        return SubmodelEvaluator(model, windows, max_rows=self.config.batch_rows, space=space)

    @abstractmethod
    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        """Decide what to remove. `calib` is [N, T] token ids.

        The method owns `model` while it runs: it may prune it in place (Bonsai slices it round after
        round, so later rounds run on the smaller model), but holds no second full copy of it, and gives
        it back as it came, on success and on an error, by reading its layers back from the model's own
        safetensors (`surgery.restore.LayerSnapshot`; only a model with no matching checkpoint on disk
        costs a copy of its decoder layers). The caller's repair then refits against the dense weights.
        """


class MetricMethod(Method):
    """A method that scores units once and keeps the best under the budget."""

    @abstractmethod
    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        """Per-unit importance for the fine kinds (and coarse kinds where the method defines them)."""

    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        from secateurs.scoring.select import select

        cfg = self.config
        scores = self.scores(model, space, calib)
        plan = select(
            scores, space, cfg.sparsity, cfg.allocation, cfg.units, uniform_attention=cfg.uniform_attention
        )
        plan.method, plan.settings, plan.seed = self.name, cfg.to_dict(), cfg.seed
        return plan


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by `cls.name` everywhere (CLI, compare, priors)."""
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import secateurs.methods  # noqa: F401  (registers the built-in methods)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def fine_units(units: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(u for u in units if u in FINE_KINDS)
