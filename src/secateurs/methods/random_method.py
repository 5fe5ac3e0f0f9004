"""Random: seeded uniform scores for every unit kind.

Why: the floor every method must beat. A metric that does no better than random pruning at the same
budget and allocation is measuring nothing useful. Same seed, same plan.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.methods.base import MetricMethod, UnitScores, register
from secateurs.units.space import Kind, UnitSpace


def random_scores(space: UnitSpace, seed: int) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    return UnitScores({k: [torch.rand(n, generator=g) for n in space.n_units(k)] for k in Kind})


@register
class Random(MetricMethod):
    name = "random"
    description = "seeded random scores; the floor to beat"

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        return random_scores(space, self.config.seed)
