"""FLAP: fluctuation of a unit's input, times its weight, with the removed mean folded into a bias.

Why: a unit whose input barely varies over the data carries almost no information; its output is close
to a constant, `W[:, j] * mean(X_j)`, which a bias can replace. So the damage of removing unit j is the
part of its output that a constant cannot explain: the sample variance of X_j times `||W[:, j]||^2`.
The constant part is then added back as an output bias ("bias compensation"); without it FLAP would drop
low-variance, high-mean channels and be worse than Wanda-sp.

Scores, exactly (X = the input of `o_proj` / `down_proj` over all calibration tokens):
- column fluctuation `f_j = var(X_j) * ||W[:, j]||_2^2` (sample variance, divides by tokens - 1);
- standardised per module: the columns of one layer's `o_proj` are z-scored across that module's
  columns, and likewise `down_proj`'s (ALGORITHMS.md: never z-score only the 3 group scores of a layer);
- a GQA group (or head) scores the mean of its query dimensions' standardised scores; an MLP channel its
  own standardised score; blocks/layers the mean of their units';
- allocation is global across layers and modules by default.

Compensation, per layer that loses some but not all units of a block: `attn_bias = W_o[:, removed] @
mean(X[removed])` and `mlp_bias = W_down[:, removed] @ mean(X[removed])`, in the plan's `attn_bias` /
`mlp_bias`; surgery turns them into real biases and masks apply them, so on the calibration data each
pruned module's mean output equals the dense one. Where a family has no native bias the correction costs
`hidden_size` parameters, which the budget pays for (the selection is re-run until removed >= target).
A block that loses all its units is dropped with no correction (plans define it so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.methods.base import MethodConfig, MetricMethod, UnitScores, register
from secateurs.scoring.select import select, target_params
from secateurs.scoring.stats import (
    ActivationStats,
    Moments,
    collect_stats,
    output_column_scores,
    with_block_scores,
)
from secateurs.units.plan import Plan
from secateurs.units.space import UnitSpace

log = logging.getLogger(__name__)

# Re-selections that pay for the correction biases before falling back to the worst case. Each round's
# shortfall is only the biases of blocks the larger request newly touches, so it shrinks fast; the
# fallback (a bias on every block) bounds the rest.
BIAS_BUDGET_ROUNDS = 8


def fluctuation(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """`var(X_j) * ||W[:, j]||^2` for a weight [out, in] and input sample variances [in] -> [in]."""
    return var * weight.detach().to(var.dtype).square().sum(dim=0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """z-score across all entries of `x` (one module's columns); constant input gives zeros."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """`W[:, removed] @ mean(X[removed])`: the constant output the removed columns used to give [out]."""
    w = weight.detach().to(mean.dtype)
    return w[:, removed] @ mean[removed]


def flap_scores_from_stats(model: nn.Module, space: UnitSpace, stats: ActivationStats) -> UnitScores:
    groups, channels = output_column_scores(
        model, space, stats, lambda w, m: standardise(fluctuation(w, m.var))
    )
    return UnitScores(with_block_scores(groups, channels, space))


def add_compensation_(plan: Plan, model: nn.Module, space: UnitSpace, stats: ActivationStats) -> Plan:
    """Fill `attn_bias` / `mlp_bias` of each partly pruned block (in place on `plan`, which is returned)."""
    a = space.adapter
    for i, (layer, lu, lp) in enumerate(zip(a.decoder_layers(model), space.layers, plan.layers, strict=True)):
        width = lu.geometry.q_per_kv * lu.geometry.head_dim
        if not lp.drop_attn and lp.keep_groups is not None:
            gone = sorted(set(range(lu.n_groups)) - set(lp.keep_groups))
            cols = (torch.tensor(gone)[:, None] * width + torch.arange(width)).flatten()
            lp.attn_bias = _as_list(compensation(a.attn_linears(layer)[3].weight, _mean(stats.attn[i]), cols))
        if not lp.drop_mlp and lp.keep_channels is not None:
            gone = torch.tensor(sorted(set(range(lu.n_channels)) - set(lp.keep_channels)))
            lp.mlp_bias = _as_list(compensation(a.mlp_linears(layer)[2].weight, _mean(stats.mlp[i]), gone))
    return plan


def _mean(m: Moments | None) -> torch.Tensor:
    assert m is not None, "a pruned block must have been seen by the statistics pass"
    return m.mean.cpu()


def _as_list(t: torch.Tensor) -> list[float]:
    return t.cpu().double().tolist()


@dataclass
class FlapConfig(MethodConfig):
    bias_correction: bool = field(
        default=True, metadata={"help": "add W[:, removed] @ mean(X[removed]) to the output bias"}
    )


@register
class Flap(MetricMethod):
    name = "flap"
    description = "input variance x ||W[:,j]||^2, standardised per module, global, with bias compensation"
    config_class = FlapConfig

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        return flap_scores_from_stats(model, space, self._stats(model, space, calib))

    def _stats(self, model, space, calib) -> ActivationStats:
        return collect_stats(model, calib, space, batch_rows=self.config.batch_rows)

    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        cfg = self.config
        stats = self._stats(model, space, calib)
        scores = flap_scores_from_stats(model, space, stats)
        target = target_params(space, cfg.sparsity)
        plan, extra = self._plan_paying_for_biases(model, space, stats, scores, target)
        plan.method, plan.settings, plan.seed = self.name, cfg.to_dict(), cfg.seed
        plan.info["budget_added_for_bias_corrections"] = int(extra)
        log.info(
            "flap: removed %d of %d prunable parameters (target %d)",
            plan.removed_params(space), space.total_cost, target,
        )  # fmt: skip
        return plan

    def _plan_paying_for_biases(self, model, space, stats, scores, target: int) -> tuple[Plan, int]:
        """Corrections add `hidden` parameters to blocks without a native bias; pay for them by asking
        `select` for more, until the plan (biases counted) removes at least the target.

        Asking for `target + extra` with `extra` = the last shortfall converges in a few rounds; if it has
        not after `BIAS_BUDGET_ROUNDS`, ask for the worst case (every block gains a bias), which always
        reaches the target. A plan short of the target is an error, never a silent result.
        """
        extra = 0
        for _ in range(BIAS_BUDGET_ROUNDS):
            plan = self._select_with_biases(model, space, stats, scores, target + extra)
            short = target - plan.removed_params(space)
            if short <= 0:
                return plan, extra
            extra += short
        extra = max(extra, _worst_case_bias_cost(space))
        plan = self._select_with_biases(model, space, stats, scores, target + extra)
        if plan.removed_params(space) < target:
            raise ConfigError(
                f"flap: the plan removes {plan.removed_params(space)} parameters, short of the target {target} "
                "after paying for the bias corrections; use --no-bias-correction or a lower sparsity"
            )
        return plan, extra

    def _select_with_biases(self, model, space, stats, scores, remove: int) -> Plan:
        cfg = self.config
        plan = select(scores, space, cfg.sparsity, cfg.allocation, cfg.units, target=remove)
        if cfg.bias_correction:
            add_compensation_(plan, model, space, stats)
        return plan


def _worst_case_bias_cost(space: UnitSpace) -> int:
    """What corrections can add at most: a bias on every block that has none."""
    return sum(space.hidden_size * ((lu.attn_fixed == 0) + (lu.mlp_fixed == 0)) for lu in space.layers)
