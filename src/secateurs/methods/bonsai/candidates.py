"""Bonsai's plain tensor steps: which units are candidates, how sub-models are drawn, and how the fitted
coefficients turn back into unit scores. No model here (tested with a `UnitSpace` and a prior only).

Candidates (`round_candidates`): units outside the safe top of each module by prior. The reference keeps
the top `1 - 2*prune_frac` of each module; here the candidates are `candidate_ratio` (2) times the
round's budget, as a fraction of what is left, so late rounds (on a smaller model) keep the same freedom.

Modules with few units (SmolLM2: 3 GQA groups per layer). The reference's per-module rule makes no
attention group a candidate there (the top 1 - 2*prune_frac of 3 is all 3), or drops the one candidate of
every layer at once and none in the complement. Instead:

* Attention groups are pooled across layers: the candidates are the lowest `fraction x all groups` by
  prior relative to their layer's mean (the per-module rule, pooled). Ranking by raw Wanda-sp scores
  instead put all 18 round-1 candidates of SmolLM2 in layers 0-7 (activations grow with depth), all
  3 groups of layer 0 among them, and the sub-models were wrecked (mean loss 6.4 against 3.6). MLP
  channels keep the per-layer (per-module) rule: 1536 channels per layer is plenty.
* MLP candidates are bundled into regression features of about one GQA group's parameters each
  (`channel_bundle`; 1 = one feature per channel, as in the reference), consecutive in prior order within
  a layer. At ~50 sub-models a round, thousands of single-channel features would leave each channel's
  coefficient mostly noise; bundles of a group's size are estimated as well as the groups themselves.
  A bundle's coefficient is shared by its channels, which keep their prior order within the bundle
  (`unit_scores`).

Perturbations (`drop_probabilities`, `antithetic_keep`, `feature_masks`): sub-models in antithetic
pairs, a mask and its complement within the candidates; everything else is kept in both. Each feature
is dropped independently (Bernoulli) with probability proportional to `max_prior - prior` (module max;
for attention on the relative scale), scaled to a per-kind mean drop rate, and its complement drops
exactly the others. So the number dropped per kind and per layer varies from sample to sample: the
regression can tell how attention as a whole compares with MLP and one layer with another, which a fixed
count per module would make unidentifiable (it would be collinear with the intercept).

Protection (`to_protect`, `Lineage`, `protected_in_current`): a unit estimated to cost more loss alone
than the whole round's pruning (and more than the spread of the sub-model losses) is never a candidate
again. SmolLM2 has an attention group in layer 1 worth ~2.8 nats: its prior is low for its layer, so
without this it would be a candidate in every round and break half of each round's sub-models.
Protected units are tracked in original indices, since every round slices the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from secateurs.methods.base import UnitScores
from secateurs.units.masks import Masks
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import FINE_KINDS, Kind, LayerUnits, UnitSpace

# Regression feature groups (anchor scales, split taus) per unit kind: the names `plan.info` reports.
POOL: dict[Kind, str] = {Kind.ATTN_GROUP: "attn", Kind.MLP_CHANNEL: "mlp"}

# Drop probabilities stay in [P_MIN, 1 - P_MIN]: every candidate is dropped in some sub-models and kept
# in others (a feature that never varies has no coefficient), even at the extremes of the prior.
P_MIN = 0.05

# Added to the sampling weights, as a fraction of their mean, before they are normalised: the module's
# top candidate (weight 0) keeps a share of its own instead of only the P_MIN floor.
WEIGHT_FLOOR = 1e-3

# Spread of the tie-breaking ramp inside a bundle, as a fraction of the largest |per-parameter
# coefficient|: small enough not to reorder features whose coefficients differ, large enough to
# order a bundle's channels by prior when the budget ends inside it.
BUNDLE_RAMP = 1e-4

# Slack when a fraction of a unit count is rounded up: ceil(0.3 * 10) must be 3, not 4.
COUNT_SLACK = 1e-9


def kept_units(layer_plan: LayerPlan, layer: LayerUnits, kind: Kind) -> list[int]:
    """The units of `kind` (GQA groups or MLP channels) that `layer_plan` keeps in `layer`."""
    if kind == Kind.ATTN_GROUP:
        return layer_plan.groups(layer.n_groups)
    return layer_plan.channels(layer.n_channels)


def _unit_masks(masks: Masks, kind: Kind) -> list[torch.Tensor]:
    """The per-layer [B, n] keep values of `kind` in `masks`."""
    return masks.groups if kind == Kind.ATTN_GROUP else masks.channels


@dataclass
class Candidates:
    """One round's regression features: each is a unit, or a bundle of channels of one layer."""

    kind: list[Kind]
    layer: list[int]
    units: list[torch.Tensor]  # unit indices in the layer, in ascending prior order
    prior: np.ndarray  # per-parameter prior, mean over the feature's units
    cost: np.ndarray  # parameters
    weight: np.ndarray  # sampling weight: module max prior - prior

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def pools(self) -> np.ndarray:
        return np.array([POOL[k] for k in self.kind])

    def anchor_prior(self) -> np.ndarray:
        """Prior on the loss scale up to one factor per kind: per-parameter prior x parameters."""
        return self.prior * self.cost

    def count(self, kind: Kind) -> int:
        """Units (not features) of `kind` among the candidates."""
        return sum(len(u) for k, u in zip(self.kind, self.units, strict=True) if k == kind)

    def n_features(self, kind: Kind) -> int:
        return sum(k == kind for k in self.kind)

    def features(self) -> Iterator[tuple[int, Kind, int, torch.Tensor]]:
        """(index, kind, layer, units) per feature."""
        for f, (k, li, idx) in enumerate(zip(self.kind, self.layer, self.units, strict=True)):
            yield f, k, li, idx


class _FeatureList:
    """Collects features during `round_candidates`; the prior is shifted so that it is non-negative."""

    def __init__(self, space: UnitSpace, shift: dict[Kind, float]):
        self.space, self.shift = space, shift
        self.kind: list[Kind] = []
        self.layer: list[int] = []
        self.units: list[torch.Tensor] = []
        self.prior: list[float] = []
        self.cost: list[int] = []
        self.weight: list[float] = []

    def add(
        self, kind: Kind, li: int, idx: torch.Tensor, score: torch.Tensor, rank: torch.Tensor, rank_max: float
    ) -> None:
        """One feature: units `idx` of layer `li`, with prior `score` and sampling rank `rank` per unit."""
        self.kind.append(kind)
        self.layer.append(li)
        self.units.append(idx)
        self.prior.append(float(score[idx].mean()) - self.shift[kind])
        self.cost.append(len(idx) * self.space.unit_costs(kind)[li])
        self.weight.append(max(rank_max - float(rank[idx].mean()), 0.0))

    def build(self) -> Candidates:
        return Candidates(
            self.kind,
            self.layer,
            self.units,
            np.array(self.prior),
            np.array(self.cost, dtype=np.float64),
            np.array(self.weight),
        )


def round_candidates(
    space: UnitSpace,
    prior: UnitScores,
    budget: float,
    kinds: tuple[Kind, ...],
    candidate_ratio: float = 2.0,
    channel_bundle: int = 0,
    protected: dict[Kind, list[torch.Tensor]] | None = None,
) -> Candidates:
    """The units that may go this round, as regression features (see the module docstring).

    The candidate fraction is `candidate_ratio * budget / (prunable parameters left)`, at most 1;
    attention groups are pooled across layers, MLP channels are taken per layer and bundled.
    `protected[kind][layer]` (bool per unit) marks units that are never candidates.
    """
    frac = min(1.0, candidate_ratio * budget / max(_available(space, kinds), 1))
    # Wanda-sp and friends are non-negative, but a prior may not be: shift each kind to start at 0.
    shift = {k: min(0.0, min((float(t.min()) for t in prior[k] if t.numel()), default=0.0)) for k in kinds}
    found = _FeatureList(space, shift)
    if Kind.ATTN_GROUP in kinds:
        _attn_candidates(found, space, prior, frac, protected)
    if Kind.MLP_CHANNEL in kinds:
        _mlp_candidates(found, space, prior, frac, channel_bundle, protected)
    return found.build()


def _available(space: UnitSpace, kinds: tuple[Kind, ...]) -> int:
    """Prunable parameters left in the fine units of `kinds`."""
    return sum(sum(c * n for c, n in zip(space.unit_costs(k), space.n_units(k), strict=True)) for k in kinds)


def _free(protected: dict[Kind, list[torch.Tensor]] | None, kind: Kind, li: int, n: int) -> torch.Tensor:
    """Bool per unit of layer `li`: may be a candidate."""
    if protected is None or kind not in protected:
        return torch.ones(n, dtype=torch.bool)
    return ~protected[kind][li]


def _attn_candidates(
    found: _FeatureList,
    space: UnitSpace,
    prior: UnitScores,
    frac: float,
    protected: dict[Kind, list[torch.Tensor]] | None,
) -> None:
    """GQA groups, pooled across layers and ranked by prior relative to the layer's mean: the reference's
    per-module rule, pooled. Raw scores would put every candidate in the early layers, where activations
    (and so Wanda-sp scores) are small, up to all groups of a layer at once."""
    k = Kind.ATTN_GROUP
    counts = space.n_units(k)
    flat = [(li, g) for li, n in enumerate(counts) for g in range(n)]
    if not flat:
        return
    rel = [_relative(prior[k][li].double() - found.shift[k]) for li in range(len(counts))]
    r_all = torch.cat([rel[li] for li, n in enumerate(counts) if n])
    ok = torch.cat([_free(protected, k, li, n) for li, n in enumerate(counts) if n])
    m = min(int(ok.sum()), math.ceil(frac * len(flat) - COUNT_SLACK))
    order = torch.argsort(torch.where(ok, r_all, math.inf), stable=True)[:m]
    top = float(r_all.max())
    for i in order.tolist():
        li, g = flat[i]
        found.add(k, li, torch.tensor([g]), prior[k][li].double(), rel[li], top)


def _mlp_candidates(
    found: _FeatureList,
    space: UnitSpace,
    prior: UnitScores,
    frac: float,
    channel_bundle: int,
    protected: dict[Kind, list[torch.Tensor]] | None,
) -> None:
    """MLP channels per layer (the per-module rule), lowest prior first, bundled into features."""
    k = Kind.MLP_CHANNEL
    for li, n in enumerate(space.n_units(k)):
        if not n:
            continue
        s = prior[k][li].double()
        ok = _free(protected, k, li, n)
        m = min(int(ok.sum()), math.ceil(frac * n - COUNT_SLACK))
        if not m:
            continue
        order = torch.argsort(torch.where(ok, s, math.inf), stable=True)[:m]
        top = float(s.max())
        for chunk in space.layers[li].channel_bundles(order, channel_bundle):
            found.add(k, li, chunk, s, s, top)


def _relative(s: torch.Tensor) -> torch.Tensor:
    """Scores over the layer's mean (1 = average unit of its module)."""
    mean = float(s.mean()) if s.numel() else 0.0
    return s / mean if mean > 0 else torch.ones_like(s)


def drop_probabilities(cands: Candidates, rates: dict[Kind, float]) -> torch.Tensor:
    """Per feature: proportional to (max_prior - prior) within its kind, mean `rates[kind]`, clipped."""
    p = torch.zeros(len(cands), dtype=torch.float64)
    kinds = np.array(cands.kind)
    for k, rate in rates.items():
        idx = np.flatnonzero(kinds == k)
        if not len(idx):
            continue
        w = torch.tensor(cands.weight[idx], dtype=torch.float64)
        w = torch.ones_like(w) if float(w.sum()) <= 0 else w + WEIGHT_FLOOR * w.mean()
        p[torch.from_numpy(idx)] = (rate * len(idx) * w / w.sum()).clamp(P_MIN, 1 - P_MIN)
    return p


def antithetic_keep(p_drop: torch.Tensor, n_masks: int, generator: torch.Generator) -> torch.Tensor:
    """[n_masks, F] keep indicators (1.0 = kept): rows 2i and 2i+1 are complements."""
    dropped = torch.rand(n_masks // 2, len(p_drop), generator=generator, dtype=torch.float64) < p_drop
    keep = torch.empty(n_masks, len(p_drop))
    keep[0::2] = (~dropped).float()
    keep[1::2] = dropped.float()
    return keep


def feature_masks(space: UnitSpace, cands: Candidates, keep: torch.Tensor) -> Masks:
    """Unit masks for the sub-models: candidates follow `keep`, every other unit is kept."""
    m = Masks.ones(space, keep.shape[0])
    for f, k, li, idx in cands.features():
        _unit_masks(m, k)[li][:, idx] = keep[:, f : f + 1]
    return m


def unit_scores(space: UnitSpace, cands: Candidates, coef: np.ndarray, kinds: tuple[Kind, ...]) -> UnitScores:
    """Per-parameter coefficients for candidates, +inf (never dropped) for every other unit.

    A bundle's channels share its coefficient; a tiny ramp (`BUNDLE_RAMP`) keeps their prior order, so
    when the budget ends inside a bundle its lowest-prior channels go first.
    """
    out = {k: [torch.full((n,), math.inf, dtype=torch.float64) for n in space.n_units(k)] for k in kinds}
    per_param = np.asarray(coef, dtype=np.float64) / cands.cost
    span = float(np.abs(per_param).max()) if len(per_param) else 0.0
    span = span if span > 0 else 1.0
    for f, k, li, idx in cands.features():
        ramp = torch.arange(len(idx), dtype=torch.float64) / max(len(idx), 1)
        out[k][li][idx] = per_param[f] + BUNDLE_RAMP * span * ramp
    return UnitScores(out)


def dropped_fractions(space: UnitSpace, cands: Candidates, plan: Plan) -> np.ndarray:
    """Per feature: the fraction of its units that `plan` drops."""
    canon = plan.canonical(space)
    out = np.zeros(len(cands))
    for f, k, li, idx in cands.features():
        kept = set(kept_units(canon.layers[li], space.layers[li], k))
        out[f] = sum(int(u) not in kept for u in idx.tolist()) / max(len(idx), 1)
    return out


def dropped_counts(space: UnitSpace, plan: Plan, kinds: tuple[Kind, ...]) -> dict[Kind, int]:
    """Units of each kind that `plan` drops, over all layers."""
    canon = plan.canonical(space)
    out = {}
    for k in kinds:
        layers = zip(canon.layers, space.layers, space.n_units(k), strict=True)
        out[k] = sum(n - len(kept_units(lp, lu, k)) for lp, lu, n in layers)
    return out


def to_protect(coef: np.ndarray, dropped: np.ndarray, loss_spread: float) -> np.ndarray:
    """Features too costly to ever drop: each alone is estimated to cost more loss than the whole round's
    pruning (`sum coef x dropped fraction`) and more than the spread of the sub-model losses.

    Such a unit (SmolLM2 has an attention group in layer 1 worth ~2.8 nats) would otherwise be a candidate
    again every round, since the prior that made it one is recomputed, and break half the sub-models.
    """
    coef = np.asarray(coef, dtype=np.float64)
    predicted = float((coef * dropped).sum())
    threshold = max(predicted, float(loss_spread), 0.0)
    return np.flatnonzero((coef > threshold) & (dropped == 0))


class Lineage(NamedTuple):
    """Where one layer of the current (pruned) model comes from: its original layer, groups, channels."""

    layer: int
    groups: list[int]
    channels: list[int]

    def units(self, kind: Kind) -> list[int]:
        """Original indices of the current layer's units of `kind`, in current order."""
        return self.groups if kind == Kind.ATTN_GROUP else self.channels


def layer_lineage(composed: Plan, orig: UnitSpace) -> list[Lineage]:
    """Per layer of the model that `composed` leaves of the original: where it comes from."""
    canon = composed.canonical(orig)
    return [
        Lineage(i, lp.groups(lu.n_groups), lp.channels(lu.n_channels))
        for i, (lp, lu) in enumerate(zip(canon.layers, orig.layers, strict=True))
        if not lp.drops_layer
    ]


def protected_in_current(
    protected: dict[Kind, set[tuple[int, int]]], lineage: list[Lineage], space: UnitSpace
) -> dict[Kind, list[torch.Tensor]]:
    """`protected` (original (layer, unit) pairs) as bool masks per layer of the current model."""
    out = {}
    for k in FINE_KINDS:
        out[k] = [
            torch.tensor(
                [(lineage[j].layer, u) in protected[k] for u in lineage[j].units(k)[:n]], dtype=torch.bool
            )
            for j, n in enumerate(space.n_units(k))
        ]
    return out
