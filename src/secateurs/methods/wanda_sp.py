"""Wanda-sp: weight magnitude times input activation norm, per output-projection input column.

Why: removing unit j zeroes column j of the output projection's input, so the damage to that module's
output is roughly |W[:, j]| times how large X_j usually is. Weight size alone (magnitude) misses that a
small column can carry a huge activation (and the other way round); this needs one forward pass only.

Scores, exactly (X = calibration inputs of the module, all tokens, `||X_j||_2` over tokens):
- column score `s_j = mean_i |W[i, j]| * ||X_j||_2` for `o_proj` and `down_proj` (ALGORITHMS.md);
- a GQA group (or single head) scores the mean of its query-head dimensions' column scores in `o_proj`;
- an MLP channel scores its `down_proj` column score only. The published Wanda-sp scores channels from
  `down_proj` alone as well; we do not add `gate_proj`/`up_proj` row terms, whose inputs (the normed
  hidden state) are shared by all channels and so carry no per-channel activation signal;
- blocks and layers: mean of their units' scores (per parameter), for completeness.

Both kinds are means of `|w| * ||x||` over output-projection weights feeding the same residual stream
from the same number of tokens, so they are on one per-parameter scale and `allocation="global"` works;
the default is `"uniform"` (same count per layer), as published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.methods.base import MethodConfig, MetricMethod, UnitScores, register
from secateurs.scoring.stats import ActivationStats, collect_stats, output_column_scores, with_block_scores
from secateurs.units.space import UnitSpace


def wanda_column_scores(weight: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """`mean_i |W[i, j]| * ||X_j||_2` for a weight [out, in] and input column norms [in] -> [in]."""
    return weight.detach().abs().to(l2.dtype).mean(dim=0) * l2


def wanda_scores_from_stats(model: nn.Module, space: UnitSpace, stats: ActivationStats) -> UnitScores:
    groups, channels = output_column_scores(model, space, stats, lambda w, m: wanda_column_scores(w, m.l2))
    return UnitScores(with_block_scores(groups, channels, space))


@dataclass
class WandaSpConfig(MethodConfig):
    allocation: str = field(
        default="uniform",
        metadata={"help": "uniform (as published): same count per layer; global: anywhere"},
    )


@register
class WandaSp(MetricMethod):
    name = "wanda-sp"
    description = "mean|W[:,j]| * ||X_j|| of o_proj/down_proj input columns; one forward pass"
    config_class = WandaSpConfig

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        stats = collect_stats(model, calib, space, batch_rows=self.config.batch_rows)
        return wanda_scores_from_stats(model, space, stats)
