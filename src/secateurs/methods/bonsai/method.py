"""Bonsai (arXiv 2402.05406): perturbative structured pruning with forward passes only.

Rounds. Each round removes `prune_frac` of the ORIGINAL prunable parameters (the last round exactly
what is left, so the run stops at the target, overshooting by less than one MLP channel):

1. Prior: a metric method's per-unit scores on the current model (`prior`, default Wanda-sp).
2. Candidates: units outside the safe top of each module by prior. The reference keeps the top
   `1 - 2*prune_frac` of each module; here the candidates are `candidate_ratio` (2) times the round's
   budget, as a fraction of what is left, so late rounds (on a smaller model) keep the same freedom.
3. Perturbations: `masks_per_round` sub-models in antithetic pairs (a mask and its complement within
   the candidates; everything else is kept in both), each scored by `SubmodelEvaluator.losses` on the
   same `eval_windows` calibration windows, many sub-models per batched forward.
4. Regression from the binary candidate masks to -loss (`regression.fit_importance`): anchored at the
   prior (one scale per kind, fitted jointly with the corrections), L1 (sklearn Lasso, default, as the
   reference) or L2 (closed-form ridge) penalty chosen by k-fold cross-validation on Kendall's tau.
   SmolLM2, round 1 (10% of the parameters), loss increase of the selected pruning on 16 held-out
   calibration windows: L1 +0.161, the Wanda-sp prior alone (MLP channels, same count per layer) +0.218,
   L2 +0.494, the prior with global allocation +5.7; held-out tau of the sub-model ranking 0.74 (prior
   alone 0.17). A few units carry most of the loss, which suits L1.
5. Selection: per-parameter coefficients (coefficient / parameters) go to `select(..., target=budget)`
   with +inf for the safe units; the lowest go until the budget is spent. The model is then sliced
   (`apply_plan_`), so later rounds run faster, and the round plans compose (`Plan.then`) into one plan
   relative to the original model.

Modules with few units (SmolLM2: 3 GQA groups per layer). The reference's per-module rule makes no
attention group a candidate there (the top 1 - 2*prune_frac of 3 is all 3), or drops the one candidate of
every layer at once and none in the complement. Instead:

* Attention groups are pooled across layers: the candidates are the lowest `fraction x all groups` by
  prior relative to their layer's mean (the per-module rule, pooled). Ranking by raw Wanda-sp scores
  instead put all 18 round-1 candidates of SmolLM2 in layers 0-7 (activations grow with depth), all
  3 groups of layer 0 among them, and the sub-models were wrecked (mean loss 6.4 against 3.6). MLP
  channels keep the per-layer (per-module) rule: 1536 channels per layer is plenty.
* Each regression feature is dropped independently (Bernoulli) with probability proportional to
  `max_prior - prior` (module max; for attention on the relative scale), scaled to a per-kind mean drop
  rate (`attn_drop_rate`, `mlp_drop_rate`, default 1/2), and its complement drops exactly the others. So the number dropped per
  kind and per layer varies from sample to sample: the regression can tell how attention as a whole
  compares with MLP and one layer with another, which a fixed count per module would make
  unidentifiable (it would be collinear with the intercept).
* MLP candidates are bundled into regression features of about one GQA group's parameters each
  (`channel_bundle`; 1 = one feature per channel, as in the reference), consecutive in prior order within
  a layer. At ~50 sub-models a round, thousands of single-channel features would leave each channel's
  coefficient mostly noise; bundles of a group's size are estimated as well as the groups themselves.
  A bundle's coefficient is shared by its channels, which keep their prior order within the bundle.
* A unit estimated to cost more loss alone than the whole round's pruning (and more than the spread of
  the sub-model losses) is never a candidate again (`protect`). SmolLM2 has an attention group in layer 1
  worth ~2.8 nats: its prior is low for its layer, so without this it would be a candidate in every round
  and break half of each round's sub-models. Protected units are tracked in original indices.
* The held-out Kendall tau is logged per round, overall and split into attention and MLP parts, with the
  prior alone for comparison, and stored in `plan.info["rounds"]`.

Budget (defaults, SmolLM2-135M at 50% from the CLI's 32 x 128-token calibration windows): 5 rounds x
(40 sub-models + the current model) x 6 windows x 128 tokens = 157k tokens of sub-model evaluation, plus
5 prior passes over 16 windows (10k tokens): 0.17M tokens, later rounds on an ever smaller model (about
0.14M dense-model equivalents). That is about 0.06% of the reference's 10 rounds x 200 masks x 32 x 4096
tokens; the prior anchor and the bundles are what make it informative at this size. In general: rounds
x ((masks_per_round + 1) x eval_windows + prior_windows) x seq_len. Measured on the 2-core AMD EPYC
(AVX2) development machine: SmolLM2-135M in fp32 runs ~105 tokens/s per core (one thread), so ~200/s
on 2 cores: about 12-13 minutes for 50%. The earlier 48 x 8-window setting (0.27M tokens) would take
about 19 minutes there.

Long runs: `checkpoint_dir` keeps the composed plan, round index, generator state, per-round figures and
counters after every round; `resume=True` re-applies the plan to a fresh copy of the original model and
continues to the same final plan as an uninterrupted run with the same seed. All randomness comes from
one `torch.Generator` seeded with `seed` (numpy/sklearn get explicit seeds derived from it per round).
`plan()` works on a deep copy: the caller's model is left unchanged (memory: one extra copy).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.checkpoint import RunCheckpoint, run_fingerprint
from secateurs.errors import ConfigError
from secateurs.eval.loss import SubmodelEvaluator
from secateurs.methods.base import Method, MethodConfig, MetricMethod, UnitScores, get_method, register
from secateurs.methods.bonsai.regression import ANCHORS, DEFAULT_ALPHAS, PENALTIES, fit_importance
from secateurs.scoring.select import select, target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.units.masks import Masks
from secateurs.units.plan import Plan
from secateurs.units.space import FINE_KINDS, UnitSpace

log = logging.getLogger(__name__)

ATTN, MLP = "attn_group", "mlp_channel"
POOL = {ATTN: "attn", MLP: "mlp"}  # regression feature groups (anchor scales, split taus)
P_MIN = 0.05  # drop probabilities stay in [P_MIN, 1 - P_MIN]
CHECKPOINT_FORMAT = 2  # 1: pickled state.pt (secateurs <= 0.1.0)
_RESUMABLE = frozenset({"checkpoint_dir", "resume"})  # may differ between a run and its resumption


@dataclass
class BonsaiConfig(MethodConfig):
    prune_frac: float = field(
        default=0.1,
        metadata={
            "help": "per round: fraction of the ORIGINAL prunable parameters removed (reference: 0.05)"
        },
    )
    masks_per_round: int = field(
        default=40, metadata={"help": "sub-models scored per round, in antithetic pairs (reference: 200)"}
    )
    eval_windows: int = field(
        default=6,
        metadata={"help": "calibration windows each sub-model is scored on, redrawn per round (0: all)"},
    )
    prior_windows: int = field(
        default=16, metadata={"help": "calibration windows for the prior's pass each round (0: all)"}
    )
    prior: str = field(
        default="wanda-sp",
        metadata={"help": "metric method giving the prior: wanda-sp, magnitude, random, ..."},
    )
    penalty: str = field(
        default="l1", metadata={"help": "l1: sklearn Lasso (reference); l2: closed-form ridge"}
    )
    anchor: str = field(
        default="per-group",
        metadata={"help": "prior anchor scale: per-group (attention and MLP each) or shared"},
    )
    alphas: tuple[float, ...] = field(
        default=(),
        metadata={"help": "relative penalties tried by cross-validation (empty: built-in grid per penalty)"},
    )
    cv_folds: int = field(default=5, metadata={"help": "folds of the Kendall-tau cross-validation"})
    loss_cap: float = field(
        default=3.0,
        metadata={"help": "cap -loss targets at this many robust (MAD) standard deviations (0: none)"},
    )
    candidate_ratio: float = field(
        default=2.0,
        metadata={"help": "candidates per round, in multiples of the round's budget (reference: 2)"},
    )
    attn_drop_rate: float = field(
        default=0.5, metadata={"help": "mean fraction of attention candidates a sub-model drops"}
    )
    mlp_drop_rate: float = field(
        default=0.5, metadata={"help": "mean fraction of MLP candidates a sub-model drops"}
    )
    channel_bundle: int = field(
        default=0,
        metadata={
            "help": "MLP channels per regression feature (0: one GQA group's parameters; 1: per channel)"
        },
    )
    protect: bool = field(
        default=True,
        metadata={
            "help": "units whose estimated loss increase alone exceeds the round's whole predicted increase "
            "(and the spread of sub-model losses) are never candidates again"
        },
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "save the run state here after every round"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint_dir"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alphas, str):
            self.alphas = tuple(a for a in self.alphas.split(",") if a.strip())
        try:
            self.alphas = tuple(float(a) for a in self.alphas)
        except (TypeError, ValueError):
            raise ConfigError(f"alphas must be numbers, got {self.alphas!r}") from None
        coarse = [u for u in self.units if u not in {k.value for k in FINE_KINDS}]
        checks = [
            (not coarse, f"bonsai prunes attention groups and MLP channels only, not {coarse}"),
            (
                self.allocation == "global",
                "bonsai allocates across layers by regression: allocation must be global",
            ),
            (0.0 < self.prune_frac <= 1.0, f"prune_frac must be in (0, 1], got {self.prune_frac}"),
            (
                self.masks_per_round >= 4 and self.masks_per_round % 2 == 0,
                f"masks_per_round must be even and >= 4 (antithetic pairs), got {self.masks_per_round}",
            ),
            (
                self.eval_windows >= 0 and self.prior_windows >= 0,
                "eval_windows and prior_windows must be >= 0",
            ),
            (self.penalty in PENALTIES, f"penalty must be one of {PENALTIES}, got {self.penalty!r}"),
            (self.anchor in ANCHORS, f"anchor must be one of {ANCHORS}, got {self.anchor!r}"),
            (all(a > 0 for a in self.alphas), f"alphas must be positive, got {self.alphas}"),
            (self.cv_folds >= 2, f"cv_folds must be >= 2, got {self.cv_folds}"),
            (self.loss_cap >= 0, f"loss_cap must be >= 0, got {self.loss_cap}"),
            (self.candidate_ratio >= 1.0, f"candidate_ratio must be >= 1, got {self.candidate_ratio}"),
            (
                0 < self.attn_drop_rate < 1 and 0 < self.mlp_drop_rate < 1,
                "attn_drop_rate and mlp_drop_rate must be in (0, 1)",
            ),
            (self.channel_bundle >= 0, f"channel_bundle must be >= 0, got {self.channel_bundle}"),
            (not self.resume or bool(self.checkpoint_dir), "resume needs checkpoint_dir"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


# -- plain tensor steps (tested without a model) ----------------------------------------------------


@dataclass
class Candidates:
    """One round's regression features: each is a unit, or a bundle of channels of one layer."""

    kind: list[str]  # ATTN or MLP
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

    def count(self, kind: str) -> int:
        return sum(len(u) for k, u in zip(self.kind, self.units, strict=True) if k == kind)


def round_candidates(
    space: UnitSpace,
    prior: UnitScores,
    budget: float,
    kinds: tuple[str, ...],
    candidate_ratio: float = 2.0,
    channel_bundle: int = 0,
    protected: dict[str, list[torch.Tensor]] | None = None,
) -> Candidates:
    """The units that may go this round, as regression features (see the module docstring).

    The candidate fraction is `candidate_ratio * budget / (prunable parameters left)`, at most 1;
    attention groups are pooled across layers, MLP channels are taken per layer and bundled.
    `protected[kind][layer]` (bool per unit) marks units that are never candidates.
    """

    def free(k, li, n):
        if protected is None or k not in protected:
            return torch.ones(n, dtype=torch.bool)
        return ~protected[k][li]

    available = sum(
        sum(c * n for c, n in zip(space.unit_costs(k), space.n_units(k), strict=True)) for k in kinds
    )
    frac = min(1.0, candidate_ratio * budget / max(available, 1))
    kind, layer, units, pri, cost, weight = [], [], [], [], [], []
    shift = {k: min(0.0, min((float(t.min()) for t in prior[k] if t.numel()), default=0.0)) for k in kinds}

    def add(k, li, idx, s, rank, rank_max):
        kind.append(k)
        layer.append(li)
        units.append(idx)
        pri.append(float(s[idx].mean()) - shift[k])
        cost.append(len(idx) * space.unit_costs(k)[li])
        weight.append(max(rank_max - float(rank[idx].mean()), 0.0))

    if ATTN in kinds:
        # Pooled across layers, ranked by prior relative to the layer's mean: the reference's per-module
        # rule, pooled. Raw scores would put every candidate in the early layers, where activations
        # (and so Wanda-sp scores) are small, up to all groups of a layer at once.
        counts = space.n_units(ATTN)
        flat = [(li, g) for li, n in enumerate(counts) for g in range(n)]
        if flat:
            rel = [_relative(prior[ATTN][li].double() - shift[ATTN]) for li in range(len(counts))]
            r_all = torch.cat([rel[li] for li, n in enumerate(counts) if n])
            ok = torch.cat([free(ATTN, li, n) for li, n in enumerate(counts) if n])
            m = min(int(ok.sum()), math.ceil(frac * len(flat) - 1e-9))
            order = torch.argsort(torch.where(ok, r_all, math.inf), stable=True)[:m]
            top = float(r_all.max())
            for i in order.tolist():
                li, g = flat[i]
                add(ATTN, li, torch.tensor([g]), prior[ATTN][li].double(), rel[li], top)
    if MLP in kinds:
        for li, n in enumerate(space.n_units(MLP)):
            if not n:
                continue
            s = prior[MLP][li].double()
            ok = free(MLP, li, n)
            m = min(int(ok.sum()), math.ceil(frac * n - 1e-9))
            if not m:
                continue
            order = torch.argsort(torch.where(ok, s, math.inf), stable=True)[:m]
            top = float(s.max())
            for chunk in space.layers[li].channel_bundles(order, channel_bundle):
                add(MLP, li, chunk, s, s, top)
    return Candidates(kind, layer, units, np.array(pri), np.array(cost, dtype=np.float64), np.array(weight))


def _relative(s: torch.Tensor) -> torch.Tensor:
    """Scores over the layer's mean (1 = average unit of its module)."""
    mean = float(s.mean()) if s.numel() else 0.0
    return s / mean if mean > 0 else torch.ones_like(s)


def drop_probabilities(cands: Candidates, rates: dict[str, float]) -> torch.Tensor:
    """Per feature: proportional to (max_prior - prior) within its kind, mean `rates[kind]`, clipped."""
    p = torch.zeros(len(cands), dtype=torch.float64)
    kinds = np.array(cands.kind)
    for k, rate in rates.items():
        idx = np.flatnonzero(kinds == k)
        if not len(idx):
            continue
        w = torch.tensor(cands.weight[idx], dtype=torch.float64)
        w = torch.ones_like(w) if float(w.sum()) <= 0 else w + 1e-3 * w.mean()
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
    for f, (k, li, idx) in enumerate(zip(cands.kind, cands.layer, cands.units, strict=True)):
        target = m.groups if k == ATTN else m.channels
        target[li][:, idx] = keep[:, f : f + 1]
    return m


def unit_scores(space: UnitSpace, cands: Candidates, coef: np.ndarray, kinds: tuple[str, ...]) -> UnitScores:
    """Per-parameter coefficients for candidates, +inf (never dropped) for every other unit.

    A bundle's channels share its coefficient; a tiny offset keeps their prior order, so when the budget
    ends inside a bundle its lowest-prior channels go first.
    """
    out = {k: [torch.full((n,), math.inf, dtype=torch.float64) for n in space.n_units(k)] for k in kinds}
    per_param = np.asarray(coef, dtype=np.float64) / cands.cost
    span = float(np.abs(per_param).max()) if len(per_param) else 0.0
    span = span if span > 0 else 1.0
    for f, (k, li, idx) in enumerate(zip(cands.kind, cands.layer, cands.units, strict=True)):
        ramp = torch.arange(len(idx), dtype=torch.float64) / max(len(idx), 1)
        out[k][li][idx] = per_param[f] + 1e-4 * span * ramp
    return UnitScores(out)


def dropped_fractions(space: UnitSpace, cands: Candidates, plan: Plan) -> np.ndarray:
    """Per feature: the fraction of its units that `plan` drops."""
    canon = plan.canonical(space)
    out = np.zeros(len(cands))
    for f, (k, li, idx) in enumerate(zip(cands.kind, cands.layer, cands.units, strict=True)):
        lp, lu = canon.layers[li], space.layers[li]
        kept = set(lp.groups(lu.n_groups) if k == ATTN else lp.channels(lu.n_channels))
        out[f] = sum(int(u) not in kept for u in idx.tolist()) / max(len(idx), 1)
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


def _lineage(composed: Plan, orig: UnitSpace) -> list[tuple[int, list[int], list[int]]]:
    """For each layer of the current (pruned) model: its original layer, groups and channels."""
    canon = composed.canonical(orig)
    return [
        (i, lp.groups(lu.n_groups), lp.channels(lu.n_channels))
        for i, (lp, lu) in enumerate(zip(canon.layers, orig.layers, strict=True))
        if not lp.drops_layer
    ]


def _protected_now(protected: dict[str, set], lineage, space: UnitSpace) -> dict[str, list[torch.Tensor]]:
    out = {}
    for k, pos in ((ATTN, 1), (MLP, 2)):
        rows = []
        for j, n in enumerate(space.n_units(k)):
            orig_layer, orig_units = lineage[j][0], lineage[j][pos]
            rows.append(
                torch.tensor([(orig_layer, u) in protected[k] for u in orig_units[:n]], dtype=torch.bool)
            )
        out[k] = rows
    return out


def _removed(space: UnitSpace, plan: Plan) -> int:
    return space.total_cost - plan.kept_cost(space)


def _lcm_chunk(n_windows: int, max_rows: int) -> int:
    """Masks per evaluator call so that calls fill whole forwards (progress-bar granularity)."""
    return max(1, math.lcm(n_windows, max_rows) // n_windows)


# -- the method -------------------------------------------------------------------------------------


@register
class Bonsai(Method):
    name = "bonsai"
    description = "perturbative: regress sub-model losses on antithetic masks, prune in rounds (forward only)"
    config_class = BonsaiConfig

    config: BonsaiConfig

    # Hooks, overridable in tests: the evaluator factory and a callback after every saved round.
    def make_evaluator(self, model: nn.Module, windows: torch.Tensor, space: UnitSpace):
        return SubmodelEvaluator(model, windows, max_rows=self.config.batch_rows, space=space)

    def on_round_end(self, round_index: int, plan: Plan) -> None:
        """Called after round `round_index` (0-based) is applied and checkpointed."""

    # -- pieces of a round -------------------------------------------------------------------------
    def prior_scores(
        self, model: nn.Module, space: UnitSpace, windows: torch.Tensor, round_index: int
    ) -> UnitScores:
        cfg = self.config
        cls = get_method(cfg.prior)
        if not issubclass(cls, MetricMethod):
            raise ConfigError(f"prior {cfg.prior!r} is not a metric method (it has no per-unit scores)")
        prior_cfg = cls.config_class(
            sparsity=cfg.sparsity, units=cfg.units, seed=cfg.seed + round_index, batch_rows=cfg.batch_rows
        )
        with torch.inference_mode():
            return cls(prior_cfg).scores(model, space, windows)

    def run_round(
        self,
        model: nn.Module,
        space: UnitSpace,
        calib: torch.Tensor,
        budget: int,
        generator: torch.Generator,
        round_index: int,
        n_rounds: int,
        protected: dict[str, list[torch.Tensor]] | None = None,
    ) -> tuple[Plan, dict[str, Any], list[tuple[str, int, list[int]]]]:
        """One round on the current (already sliced) model.

        Returns the round's plan (current indices), its figures, and the units to protect from now on as
        (kind, layer, units) in current indices.
        """
        cfg = self.config
        t0 = time.perf_counter()
        kinds = tuple(k for k in (ATTN, MLP) if k in cfg.units)
        perm = torch.randperm(calib.shape[0], generator=generator)
        n_eval = cfg.eval_windows or calib.shape[0]
        n_prior = cfg.prior_windows or calib.shape[0]
        windows = calib[perm[: min(n_eval, calib.shape[0])]]
        prior_windows = calib[perm[: min(n_prior, calib.shape[0])]]
        prior = self.prior_scores(model, space, prior_windows, round_index)
        cands = round_candidates(
            space, prior, budget, kinds, cfg.candidate_ratio, cfg.channel_bundle, protected
        )
        p_drop = drop_probabilities(cands, {ATTN: cfg.attn_drop_rate, MLP: cfg.mlp_drop_rate})
        keep = antithetic_keep(p_drop, cfg.masks_per_round, generator)
        masks = Masks.stack([Masks.ones(space, 1), feature_masks(space, cands, keep)])  # row 0: current model

        evaluator = self.make_evaluator(model, windows, space)
        before = (evaluator.stats.forwards, evaluator.stats.tokens)
        losses = torch.empty(masks.batch)
        step = _lcm_chunk(windows.shape[0], cfg.batch_rows)
        with tqdm(total=masks.batch, desc=f"bonsai round {round_index + 1}/{n_rounds}", unit="mask") as bar:
            for s in range(0, masks.batch, step):
                e = min(s + step, masks.batch)
                losses[s:e] = evaluator.losses(masks.rows(s, e)).detach().float().cpu()
                bar.update(e - s)
        sub = losses[1:].double().numpy()
        pairs = np.repeat(np.arange(cfg.masks_per_round // 2), 2)
        fit = fit_importance(
            keep.double().numpy(),
            sub,
            prior=cands.anchor_prior(),
            groups=cands.pools,
            pairs=pairs,
            penalty=cfg.penalty,
            alphas=cfg.alphas,
            folds=cfg.cv_folds,
            cap=cfg.loss_cap,
            seed=cfg.seed * 1009 + round_index,
            anchor=cfg.anchor,
        )
        scores = unit_scores(space, cands, fit.coef, kinds)
        plan = select(scores, space, cfg.sparsity, "global", kinds, target=budget)
        canon = plan.canonical(space)
        new_protected = []
        if cfg.protect:
            spread = 1.4826 * float(np.median(np.abs(sub - np.median(sub))))
            for f in to_protect(fit.coef, dropped_fractions(space, cands, plan), spread).tolist():
                new_protected.append((cands.kind[f], cands.layer[f], cands.units[f].tolist()))
        dropped = {
            k: sum(
                (lu.n_groups - len(lp.groups(lu.n_groups)))
                if k == ATTN
                else (lu.n_channels - len(lp.channels(lu.n_channels)))
                for lp, lu in zip(canon.layers, space.layers, strict=True)
            )
            for k in kinds
        }
        summ = fit.summary()
        info = {
            "round": round_index + 1,
            "budget": int(budget),
            "removed": _removed(space, plan),
            "candidates": {k: cands.count(k) for k in kinds},
            "features": {POOL[k]: int((np.array(cands.kind) == k).sum()) for k in kinds},
            "dropped": dropped,
            "masks": cfg.masks_per_round,
            "windows": int(windows.shape[0]),
            "loss_current": round(float(losses[0]), 5),
            "losses": {
                "min": round(float(sub.min()), 5),
                "mean": round(float(sub.mean()), 5),
                "max": round(float(sub.max()), 5),
                "std": round(float(sub.std()), 5),
            },
            **{
                k: summ[k]
                for k in ("tau", "tau_prior", "tau_groups", "alpha", "taus", "scales", "anchor_fallback")
            },
            "forwards": evaluator.stats.forwards - before[0],
            "tokens": evaluator.stats.tokens - before[1],
            "attn_candidates": [  # (layer, group) in this round's model; plan() maps them to the original
                [li, int(idx[0])]
                for k, li, idx in zip(cands.kind, cands.layer, cands.units, strict=True)
                if k == ATTN
            ],
            "protected": [[k, li, len(u)] for k, li, u in new_protected],  # kind, layer (current), units
            "prior_tokens": int(prior_windows.numel()),
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        g = summ["tau_groups"]
        log.info(
            "bonsai round %d/%d: held-out Kendall tau %s (attention %s, MLP %s; prior alone %s), alpha %s; "
            "loss %.4f, sub-models %.4f..%.4f; dropped %s; %.1fs",
            round_index + 1,
            n_rounds,
            summ["tau"],
            g.get("attn"),
            g.get("mlp"),
            summ["tau_prior"],
            summ["alpha"],
            info["loss_current"],
            info["losses"]["min"],
            info["losses"]["max"],
            dropped,
            info["wall_s"],
        )
        if new_protected:
            log.info("bonsai: never candidates again (kind, layer, units): %s", info["protected"])
        return plan, info, new_protected

    # -- the loop ----------------------------------------------------------------------------------
    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        cfg = self.config
        t_start = time.perf_counter()
        orig_space = UnitSpace.from_model(model)
        if space is not None and space.total_cost != orig_space.total_cost:
            raise ConfigError("the unit space given does not describe this model")
        get_method(cfg.prior)  # fail before any work when the prior is unknown
        total = orig_space.total_cost
        target = target_params(orig_space, cfg.sparsity)
        per_round = max(1, math.ceil(cfg.prune_frac * total - 1e-6))
        n_rounds = math.ceil(target / per_round)
        checkpoint = RunCheckpoint(
            cfg.checkpoint_dir, self.name, CHECKPOINT_FORMAT, cfg.to_dict(), run_fingerprint(model, calib),
            _RESUMABLE,
        )  # fmt: skip

        generator = torch.Generator().manual_seed(cfg.seed)
        composed = Plan.keep_all(orig_space)
        rounds: list[dict[str, Any]] = []
        protected: dict[str, set[tuple[int, int]]] = {ATTN: set(), MLP: set()}  # original indices
        counters = {"forwards": 0, "tokens": 0, "prior_tokens": 0, "wall_s": 0.0}
        saved = checkpoint.start(cfg.resume)
        if saved is not None:
            state = saved["state"]
            composed = Plan.from_dict(state["plan"])
            rounds, counters = list(state["rounds"]), dict(state["counters"])
            protected = {k: {tuple(x) for x in v} for k, v in state["protected"].items()}
            generator.set_state(state["generator"])
            log.info("bonsai: resuming after round %d from %s", len(rounds), cfg.checkpoint_dir)
        elif cfg.resume:
            log.info("bonsai: no checkpoint in %s yet; starting from the beginning", cfg.checkpoint_dir)

        work = copy.deepcopy(model)
        if rounds:
            apply_plan_(work, composed)
        cur = UnitSpace.from_model(work)
        tokens_each = (cfg.masks_per_round + 1) * min(cfg.eval_windows or calib.shape[0], calib.shape[0])
        log.info(
            "bonsai: %.1f%% of %d prunable params in %d rounds of %d; per round %d sub-models x %d windows x %d "
            "tokens (+ prior over %d windows): about %.2fM tokens in all",
            100 * cfg.sparsity,
            total,
            n_rounds,
            per_round,
            cfg.masks_per_round + 1,
            min(cfg.eval_windows or calib.shape[0], calib.shape[0]),
            calib.shape[1],
            min(cfg.prior_windows or calib.shape[0], calib.shape[0]),
            n_rounds
            * (tokens_each + min(cfg.prior_windows or calib.shape[0], calib.shape[0]))
            * calib.shape[1]
            / 1e6,
        )
        while (removed := total - cur.total_cost) < target:
            r = len(rounds)
            budget = min(per_round, target - removed)
            lineage = _lineage(composed, orig_space)
            round_plan, info, new_protected = self.run_round(
                work,
                cur,
                calib,
                budget,
                generator,
                r,
                max(n_rounds, r + 1),
                _protected_now(protected, lineage, cur),
            )
            info["attn_candidates"] = [
                [lineage[li][0], lineage[li][1][g]] for li, g in info["attn_candidates"]
            ]
            for k, li, idx in new_protected:
                orig_layer, orig_units = lineage[li][0], lineage[li][1 if k == ATTN else 2]
                protected[k].update((orig_layer, orig_units[u]) for u in idx)
            apply_plan_(work, round_plan)
            composed = composed.then(round_plan, orig_space)
            cur = UnitSpace.from_model(work)
            rounds.append(info)
            for k in ("forwards", "tokens", "prior_tokens", "wall_s"):
                counters[k] += info[k]
            checkpoint.save(
                {
                    "plan": composed.to_dict(),
                    "rounds": rounds,
                    "counters": counters,
                    "generator": generator.get_state(),
                    "protected": {k: sorted(v) for k, v in protected.items()},
                }
            )
            self.on_round_end(r, composed)

        removed = _removed(orig_space, composed)
        composed.method, composed.settings, composed.seed = self.name, cfg.to_dict(), cfg.seed
        composed.info = {
            "target_params": target,
            "removed_params": removed,
            "removed_fraction": removed / total,
            "rounds": rounds,
            "n_rounds": len(rounds),
            "forwards": counters["forwards"],
            "tokens": counters["tokens"],
            "prior_tokens": counters["prior_tokens"],
            "rounds_wall_s": round(counters["wall_s"], 2),
            "wall_s": round(time.perf_counter() - t_start, 2),  # this call (a resumed run: since resuming)
            "protected": {ATTN: sorted(protected[ATTN]), MLP: len(protected[MLP])},  # original indices
            "penalty": cfg.penalty,
            "default_alphas": list(DEFAULT_ALPHAS[cfg.penalty]) if not cfg.alphas else None,
        }
        log.info(
            "bonsai: removed %d of %d prunable params (%.2f%%, target %d) in %d rounds, %d forwards, %d tokens",
            removed,
            total,
            100 * removed / total,
            target,
            len(rounds),
            counters["forwards"],
            counters["tokens"] + counters["prior_tokens"],
        )
        return composed
