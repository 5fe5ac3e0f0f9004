"""FLAP: fluctuation of a unit's input, times its weight; the removed mean is folded into a bias by the
repair step (`--reconstruct bias`, or refit with everything else by `--reconstruct lstsq`).

Why: a unit whose input barely varies over the data carries almost no information; its output is close
to a constant, `W[:, j] * mean(X_j)`, which a bias can replace. So the damage of removing unit j is the
part of its output that a constant cannot explain: the sample variance of X_j times `||W[:, j]||^2`.
The constant part is added back as an output bias ("bias compensation"); that is the repair's `bias`
mode (`surgery.reconstruct`), with the means taken from the pruned model's own stream, layer by layer,
one mechanism for every method rather than FLAP's own.

Scores, exactly (X = the input of `o_proj` / `down_proj` over all calibration tokens):
- column fluctuation `f_j = var(X_j) * ||W[:, j]||_2^2` (sample variance, divides by tokens - 1);
- standardised per module: the columns of one layer's `o_proj` are z-scored across that module's
  columns, and likewise `down_proj`'s (ALGORITHMS.md: never z-score only the 3 group scores of a layer);
- a GQA group (or head) scores the mean of its query dimensions' standardised scores; an MLP channel its
  own standardised score; blocks/layers the mean of their units';
- allocation is global across layers and modules by default.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.methods.base import MetricMethod, UnitScores, register
from secateurs.scoring.stats import ActivationStats, collect_stats, output_column_scores, with_block_scores
from secateurs.units.space import UnitSpace


def fluctuation(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """`var(X_j) * ||W[:, j]||^2` for a weight [out, in] and input sample variances [in] -> [in]."""
    return var * weight.detach().to(var.dtype).square().sum(dim=0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """z-score across all entries of `x` (one module's columns); constant input gives zeros."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def flap_scores_from_stats(model: nn.Module, space: UnitSpace, stats: ActivationStats) -> UnitScores:
    groups, channels = output_column_scores(
        model, space, stats, lambda w, m: standardise(fluctuation(w, m.var))
    )
    return UnitScores(with_block_scores(groups, channels, space))


@register
class Flap(MetricMethod):
    name = "flap"
    description = "input variance x ||W[:,j]||^2, standardised per module, global; bias compensation by --reconstruct bias"

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        stats = collect_stats(model, calib, space, batch_rows=self.config.batch_rows)
        return flap_scores_from_stats(model, space, stats)
