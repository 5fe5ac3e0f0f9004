"""Bonsai (arXiv 2402.05406): perturbative structured pruning with forward passes only.

Rounds. Each round removes `prune_frac` of the ORIGINAL prunable parameters (the last round exactly
what is left, so the run stops at the target, overshooting by less than one MLP channel):

1. Prior: a metric method's per-unit scores on the current model (`prior`, default Wanda-sp).
2. Candidates: units outside the safe top of each module by prior, `candidate_ratio` (2) times the
   round's budget; attention groups pooled across layers, MLP channels per layer in bundles of about one
   GQA group's parameters (`candidates.round_candidates`; why, in `candidates`' docstring).
3. Perturbations: `masks_per_round` sub-models in antithetic pairs (a mask and its complement within
   the candidates; everything else is kept in both), each candidate dropped with a probability that
   grows as its prior falls, at a per-kind mean rate (`attn_drop_rate`, `mlp_drop_rate`, default 1/2).
   Each sub-model is scored by the method's evaluator (`Method.evaluator`, a `SubmodelEvaluator` unless
   one is injected) on the same `eval_windows` calibration windows, many sub-models per batched forward.
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
6. Protection (`protect`): a unit estimated to cost more loss alone than the whole round's pruning (and
   more than the spread of the sub-model losses) is never a candidate again (`candidates.to_protect`).
   The held-out Kendall tau is logged per round, overall and split into attention and MLP parts, with the
   prior alone for comparison, and stored in `plan.info["rounds"]`.

Repair between rounds (`round_repair`, default none): the final model is repaired after the search
(`surgery.reconstruct`), so the structure worth finding is the one whose repaired model is best. With
`round_repair=lstsq` (or `bias`) each round's slicing is the reconstruction step itself, on the method's
calibration windows, so the next round's prior and sub-model losses are those of a repaired model; the
composed plan is still relative to the dense model, which the pipeline repairs once more from its
original weights. Cost: one repair per round on an ever smaller model (about 30-40 s each on SmolLM2 at
32 x 128 tokens, 2 cores). A resumed run replays the finished rounds' plans, each repaired again.
With lstsq the round's repair chooses which units to keep for the round's counts (`round_select`, obs
by default, like the final repair): the final repair re-chooses every layer's units from the dense
model anyway, so what the rounds decide that survives is the counts, and those should be judged on the
model obs would make of them. The composed plan records the units each round's repair kept.

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
counters after every round (`RunCheckpoint`); `resume=True` re-applies the plan to a fresh copy of the
original model and continues to the same final plan as an uninterrupted run with the same seed. All
randomness comes from one `torch.Generator` seeded with `seed` (numpy/sklearn get explicit seeds derived
from it per round). `plan()` slices the caller's model itself, round after round, and gives it back
unchanged at the end (also on an error): its layers are read back from the model's own safetensors
(`surgery.restore.LayerSnapshot`), so no second copy of the model is held. A model without a matching
checkpoint on disk (built or changed in memory) costs a copy of its decoder layers instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from secateurs.checkpoint import RunCheckpoint, run_fingerprint
from secateurs.errors import ConfigError
from secateurs.eval.loss import masks_per_call
from secateurs.methods.base import Method, MethodConfig, MetricMethod, UnitScores, get_method, register
from secateurs.methods.bonsai.candidates import (
    POOL,
    Candidates,
    Lineage,
    antithetic_keep,
    drop_probabilities,
    dropped_counts,
    dropped_fractions,
    feature_masks,
    layer_lineage,
    protected_in_current,
    round_candidates,
    to_protect,
    unit_scores,
)
from secateurs.methods.bonsai.regression import (
    ANCHORS,
    DEFAULT_ALPHAS,
    PENALTIES,
    RegressionFit,
    fit_importance,
    robust_sd,
)
from secateurs.progress import progress
from secateurs.scoring.select import select, target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.reconstruct import MODES as REPAIR_MODES
from secateurs.surgery.reconstruct import SELECTS, ReconstructConfig, reconstruct_
from secateurs.surgery.restore import LayerSnapshot
from secateurs.units.masks import Masks
from secateurs.units.plan import Plan
from secateurs.units.space import FINE_KINDS, Kind, UnitSpace

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 1: pickled state.pt (secateurs <= 0.1.0)
_RESUMABLE = frozenset({"checkpoint_dir", "resume"})  # may differ between a run and its resumption
# The regression's seed (its fold split) per round: seed * ROUND_SEED_STRIDE + round. Any stride above the
# number of rounds gives every (seed, round) its own seed, so seed 0's round 1 and seed 1's round 0 do not
# share a split; 1009 (a prime, far above any round count) is the value plans have always been made with.
ROUND_SEED_STRIDE = 1009
# Slack when the per-round budget is rounded up to whole parameters, as in `target_params`.
PARAM_SLACK = 1e-6
_COUNTERS = ("forwards", "tokens", "prior_tokens", "wall_s")  # summed over rounds into plan.info
# Round figures copied from the regression's summary into plan.info["rounds"].
_FIT_FIGURES = ("tau", "tau_prior", "tau_groups", "alpha", "taus", "scales", "anchor_fallback")


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
    round_repair: str = field(
        default="none",
        metadata={
            "help": "repair the sliced model after every round with the reconstruction step "
            "(none | bias | lstsq, on the method's calibration windows), so later rounds score sub-models "
            "of a repaired model; the final plan is still relative to, and repaired from, the dense model"
        },
    )
    round_select: str = field(
        default="obs",
        metadata={
            "help": "which units a round's lstsq repair keeps (plan | obs, as --reconstruct-select): obs, the "
            "final repair's default, so the rounds see the model that repair will make of their counts"
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
        coarse = [u for u in self.units if u not in FINE_KINDS]
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
            (
                self.round_repair in REPAIR_MODES,
                f"round_repair must be one of {', '.join(REPAIR_MODES)}, got {self.round_repair!r}",
            ),
            (
                self.round_select in SELECTS,
                f"round_select must be one of {', '.join(SELECTS)}, got {self.round_select!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


class RoundResult(NamedTuple):
    """One round: its plan (current indices), its figures, and the units to protect from now on as
    (kind, layer, units) in current indices."""

    plan: Plan
    info: dict[str, Any]
    protect: list[tuple[Kind, int, list[int]]]


@dataclass
class _Run:
    """A run between rounds: what its checkpoint holds (composed plan, figures, counters, generator,
    protected units in original indices) and the working copy of the model that the plan is applied to."""

    orig: UnitSpace
    target: int  # parameters to remove in all
    per_round: int  # parameters to remove per round (the last round: what is left)
    n_rounds: int
    checkpoint: RunCheckpoint
    generator: torch.Generator
    composed: Plan
    rounds: list[dict[str, Any]] = field(default_factory=list)
    protected: dict[Kind, set[tuple[int, int]]] = field(
        default_factory=lambda: {k: set() for k in FINE_KINDS}
    )
    counters: dict[str, float] = field(
        default_factory=lambda: {"forwards": 0, "tokens": 0, "prior_tokens": 0, "wall_s": 0.0}
    )
    work: nn.Module | None = None
    cur: UnitSpace | None = None
    repair: ReconstructConfig | None = None  # between rounds (`round_repair`); None: slice only
    repair_calib: torch.Tensor | None = None
    round_plans: list[dict[str, Any]] = field(default_factory=list)  # current indices, for a resume's replay

    @property
    def total(self) -> int:
        return self.orig.total_cost

    @property
    def removed(self) -> int:
        """Parameters the rounds so far have removed."""
        return self.total - self.cur.total_cost

    def state(self) -> dict[str, Any]:
        """What the checkpoint saves after every round."""
        return {
            "plan": self.composed.to_dict(),
            "rounds": self.rounds,
            "counters": self.counters,
            "generator": self.generator.get_state(),
            "protected": {k: sorted(v) for k, v in self.protected.items()},
            "round_plans": self.round_plans,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.composed = Plan.from_dict(state["plan"])
        self.rounds, self.counters = list(state["rounds"]), dict(state["counters"])
        self.protected = {Kind(k): {tuple(x) for x in v} for k, v in state["protected"].items()}
        self.generator.set_state(state["generator"])
        self.round_plans = list(state.get("round_plans", []))

    def advance(self, plan: Plan, repair: ReconstructConfig | None = None) -> tuple[Plan, float]:
        """Slice the working model by one round's plan (current indices), repaired when `repair` is set,
        so that the next round's sub-models and prior see the repaired model. Returns the plan applied
        (with `obs`, the repair's own choice of units for the round's counts) and the repair's seconds."""
        repair = repair or self.repair
        if repair is None:
            apply_plan_(self.work, plan)
            return plan, 0.0
        t0 = time.perf_counter()
        record = reconstruct_(self.work, plan, self.repair_calib, repair)
        return record["plan"], time.perf_counter() - t0

    def replay(self) -> None:
        """A resumed run's working model: the finished rounds again, each repaired as it was (the
        applied plans are stored, so the replay keeps their units: select `plan`)."""
        if self.repair is None:
            apply_plan_(self.work, self.composed)
            return
        as_applied = dataclasses.replace(self.repair, reconstruct_select="plan")
        for plan in self.round_plans:
            self.advance(Plan.from_dict(plan), as_applied)

    def record(self, result: RoundResult, lineage: list[Lineage]) -> None:
        """Take in a finished round: indices to the original model, slice the working copy, compose."""
        info = result.info
        info["attn_candidates"] = [
            [lineage[li].layer, lineage[li].groups[g]] for li, g in info["attn_candidates"]
        ]
        for k, li, idx in result.protect:
            orig_units = lineage[li].units(k)
            self.protected[k].update((lineage[li].layer, orig_units[u]) for u in idx)
        applied, repair_s = self.advance(result.plan)
        info["repair_s"] = round(repair_s, 2)
        self.round_plans.append(applied.to_dict())
        self.composed = self.composed.then(applied, self.orig)
        self.cur = UnitSpace.from_model(self.work)
        self.rounds.append(info)
        for k in _COUNTERS:
            self.counters[k] += info[k]


# -- the method -------------------------------------------------------------------------------------


@register
class Bonsai(Method):
    name = "bonsai"
    description = "perturbative: regress sub-model losses on antithetic masks, prune in rounds (forward only)"
    config_class = BonsaiConfig

    config: BonsaiConfig

    def on_round_end(self, round_index: int, plan: Plan) -> None:
        """Called after round `round_index` (0-based) is applied and checkpointed (tests interrupt here)."""

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The fine kinds this run prunes, in `FINE_KINDS` order (the order of the regression features)."""
        return tuple(k for k in FINE_KINDS if k in self.config.units)

    # -- one round ---------------------------------------------------------------------------------
    def run_round(
        self,
        model: nn.Module,
        space: UnitSpace,
        calib: torch.Tensor,
        budget: int,
        generator: torch.Generator,
        round_index: int,
        n_rounds: int,
        protected: dict[Kind, list[torch.Tensor]] | None = None,
    ) -> RoundResult:
        """One round on the current (already sliced) model; `protected` as bool masks in current indices."""
        cfg = self.config
        t0 = time.perf_counter()
        windows, prior_windows = self._draw_windows(calib, generator)
        prior = self.prior_scores(model, space, prior_windows, round_index)
        cands = round_candidates(
            space, prior, budget, self.kinds, cfg.candidate_ratio, cfg.channel_bundle, protected
        )
        keep, masks = self._perturb(space, cands, generator)
        evaluator = self.evaluator(model, windows, space)
        losses, work = self._score_submodels(evaluator, masks, windows.shape[0], round_index, n_rounds)
        sub = losses[1:].double().numpy()  # row 0 is the current model
        fit = self._fit(cands, keep, sub, round_index)
        scores = unit_scores(space, cands, fit.coef, self.kinds)
        plan = select(
            scores, space, cfg.sparsity, "global", self.kinds, target=budget,
            uniform_attention=cfg.uniform_attention,
        )  # fmt: skip
        protect = self._newly_protected(space, cands, fit, plan, sub)
        info = self._round_info(
            round_index, budget, space, plan, cands, windows, losses, fit, work, protect, prior_windows
        )
        info["wall_s"] = round(time.perf_counter() - t0, 2)
        self._log_round(info, round_index, n_rounds)
        return RoundResult(plan, info, protect)

    def _draw_windows(
        self, calib: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This round's evaluation and prior windows: prefixes of one permutation (0 in the config: all)."""
        cfg = self.config
        n = calib.shape[0]
        perm = torch.randperm(n, generator=generator)
        n_eval, n_prior = cfg.eval_windows or n, cfg.prior_windows or n
        return calib[perm[: min(n_eval, n)]], calib[perm[: min(n_prior, n)]]

    def prior_scores(
        self, model: nn.Module, space: UnitSpace, windows: torch.Tensor, round_index: int
    ) -> UnitScores:
        """The prior method's per-unit scores on the current model (its seed moves with the round)."""
        cfg = self.config
        cls = get_method(cfg.prior)
        if not issubclass(cls, MetricMethod):
            raise ConfigError(f"prior {cfg.prior!r} is not a metric method (it has no per-unit scores)")
        prior_cfg = cls.config_class(
            sparsity=cfg.sparsity, units=cfg.units, seed=cfg.seed + round_index, batch_rows=cfg.batch_rows
        )
        with torch.inference_mode():
            return cls(prior_cfg).scores(model, space, windows)

    def _perturb(
        self, space: UnitSpace, cands: Candidates, generator: torch.Generator
    ) -> tuple[torch.Tensor, Masks]:
        """Antithetic keep indicators over the features [masks, F], and the unit masks to score: row 0 is
        the current model, then the sub-models."""
        cfg = self.config
        rates = {Kind.ATTN_GROUP: cfg.attn_drop_rate, Kind.MLP_CHANNEL: cfg.mlp_drop_rate}
        keep = antithetic_keep(drop_probabilities(cands, rates), cfg.masks_per_round, generator)
        return keep, Masks.stack([Masks.ones(space, 1), feature_masks(space, cands, keep)])

    def _score_submodels(
        self, evaluator: Any, masks: Masks, n_windows: int, round_index: int, n_rounds: int
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """Loss per mask row, and the forwards and tokens it took."""
        before = (evaluator.stats.forwards, evaluator.stats.tokens)
        losses = torch.empty(masks.batch)
        step = masks_per_call(n_windows, self.config.batch_rows)  # progress granularity only
        with progress(
            total=masks.batch, desc=f"bonsai round {round_index + 1}/{n_rounds}", unit="mask"
        ) as bar:
            for s in range(0, masks.batch, step):
                e = min(s + step, masks.batch)
                losses[s:e] = evaluator.losses(masks.rows(s, e)).detach().float().cpu()
                bar.update(e - s)
        work = {
            "forwards": evaluator.stats.forwards - before[0],
            "tokens": evaluator.stats.tokens - before[1],
        }
        return losses, work

    def _fit(self, cands: Candidates, keep: torch.Tensor, sub: np.ndarray, round_index: int) -> RegressionFit:
        """The regression from the sub-models' keep indicators to their losses (antithetic pairs as rows
        2i, 2i+1)."""
        cfg = self.config
        return fit_importance(
            keep.double().numpy(),
            sub,
            prior=cands.anchor_prior(),
            groups=cands.pools,
            pairs=np.repeat(np.arange(cfg.masks_per_round // 2), 2),
            penalty=cfg.penalty,
            alphas=cfg.alphas,
            folds=cfg.cv_folds,
            cap=cfg.loss_cap,
            seed=cfg.seed * ROUND_SEED_STRIDE + round_index,
            anchor=cfg.anchor,
        )

    def _newly_protected(
        self, space: UnitSpace, cands: Candidates, fit: RegressionFit, plan: Plan, sub: np.ndarray
    ) -> list[tuple[Kind, int, list[int]]]:
        """Features to keep out of every later round, as (kind, layer, units) in current indices."""
        if not self.config.protect:
            return []
        spread = robust_sd(sub)
        features = to_protect(fit.coef, dropped_fractions(space, cands, plan), spread).tolist()
        return [(cands.kind[f], cands.layer[f], cands.units[f].tolist()) for f in features]

    def _round_info(
        self,
        round_index: int,
        budget: int,
        space: UnitSpace,
        plan: Plan,
        cands: Candidates,
        windows: torch.Tensor,
        losses: torch.Tensor,
        fit: RegressionFit,
        work: dict[str, int],
        protect: list[tuple[Kind, int, list[int]]],
        prior_windows: torch.Tensor,
    ) -> dict[str, Any]:
        """The round's figures for `plan.info["rounds"]` (JSON-friendly; `wall_s` is added by the caller)."""
        kinds = self.kinds
        sub = losses[1:].double().numpy()
        summ = fit.summary()
        return {
            "round": round_index + 1,
            "budget": int(budget),
            "removed": plan.removed_params(space),
            "candidates": {k: cands.count(k) for k in kinds},
            "features": {POOL[k]: cands.n_features(k) for k in kinds},
            "dropped": dropped_counts(space, plan, kinds),
            "masks": self.config.masks_per_round,
            "windows": int(windows.shape[0]),
            "loss_current": round(float(losses[0]), 5),
            "losses": {
                "min": round(float(sub.min()), 5),
                "mean": round(float(sub.mean()), 5),
                "max": round(float(sub.max()), 5),
                "std": round(float(sub.std()), 5),
            },
            **{k: summ[k] for k in _FIT_FIGURES},
            **work,
            "attn_candidates": [  # (layer, group) in this round's model; plan() maps them to the original
                [li, int(idx[0])] for _, k, li, idx in cands.features() if k == Kind.ATTN_GROUP
            ],
            "protected": [[k, li, len(u)] for k, li, u in protect],  # kind, layer (current), units
            "prior_tokens": int(prior_windows.numel()),
        }

    @staticmethod
    def _log_round(info: dict[str, Any], round_index: int, n_rounds: int) -> None:
        g = info["tau_groups"]
        log.info(
            "bonsai round %d/%d: held-out Kendall tau %s (attention %s, MLP %s; prior alone %s), alpha %s; "
            "loss %.4f, sub-models %.4f..%.4f; dropped %s; %.1fs",
            round_index + 1,
            n_rounds,
            info["tau"],
            g.get("attn"),
            g.get("mlp"),
            info["tau_prior"],
            info["alpha"],
            info["loss_current"],
            info["losses"]["min"],
            info["losses"]["max"],
            info["dropped"],
            info["wall_s"],
        )
        if info["protected"]:
            log.info("bonsai: never candidates again (kind, layer, units): %s", info["protected"])

    # -- the loop ----------------------------------------------------------------------------------
    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        t_start = time.perf_counter()
        snapshot = LayerSnapshot(model)  # the rounds slice `model` itself; its layers come back after
        try:
            run = self._start(model, space, calib)
            self._log_budget(run, calib)
            while run.removed < run.target:
                self._next_round(run, calib)
            return self._finish(run, t_start)
        finally:
            snapshot.restore_(model)

    def _start(self, model: nn.Module, space: UnitSpace | None, calib: torch.Tensor) -> _Run:
        """Budgets, checkpoint (resumed when asked) and the model to slice, before any round."""
        cfg = self.config
        orig = UnitSpace.from_model(model)
        if space is not None and space.total_cost != orig.total_cost:
            raise ConfigError("the unit space given does not describe this model")
        get_method(cfg.prior)  # fail before any work when the prior is unknown
        target = target_params(orig, cfg.sparsity)
        per_round = max(1, math.ceil(cfg.prune_frac * orig.total_cost - PARAM_SLACK))
        checkpoint = RunCheckpoint(
            cfg.checkpoint_dir, self.name, CHECKPOINT_FORMAT, cfg.to_dict(), run_fingerprint(model, calib),
            _RESUMABLE,
        )  # fmt: skip
        run = _Run(
            orig=orig,
            target=target,
            per_round=per_round,
            n_rounds=math.ceil(target / per_round),
            checkpoint=checkpoint,
            generator=torch.Generator().manual_seed(cfg.seed),
            composed=Plan.keep_all(orig),
        )
        saved = checkpoint.start(cfg.resume)  # None unless resuming; a missing or foreign one raises
        if saved is not None:
            run.restore(saved["state"])
            log.info("bonsai: resuming after round %d from %s", len(run.rounds), cfg.checkpoint_dir)
        run.work = model
        if cfg.round_repair != "none":
            # with obs the repair picks the units for the round's counts; `record` composes what it applied
            repair = ReconstructConfig(reconstruct=cfg.round_repair, reconstruct_select=cfg.round_select)
            run.repair, run.repair_calib = repair, calib
        if run.rounds:
            run.replay()
        run.cur = UnitSpace.from_model(run.work)
        return run

    def _log_budget(self, run: _Run, calib: torch.Tensor) -> None:
        cfg = self.config
        n = calib.shape[0]
        n_eval, n_prior = min(cfg.eval_windows or n, n), min(cfg.prior_windows or n, n)
        tokens = run.n_rounds * ((cfg.masks_per_round + 1) * n_eval + n_prior) * calib.shape[1]
        log.info(
            "bonsai: %.1f%% of %d prunable params in %d rounds of %d; per round %d sub-models x %d windows x %d "
            "tokens (+ prior over %d windows): about %.2fM tokens in all",
            100 * cfg.sparsity,
            run.total,
            run.n_rounds,
            run.per_round,
            cfg.masks_per_round + 1,
            n_eval,
            calib.shape[1],
            n_prior,
            tokens / 1e6,
        )

    def _next_round(self, run: _Run, calib: torch.Tensor) -> None:
        """One round on the working copy, recorded, checkpointed."""
        r = len(run.rounds)
        lineage = layer_lineage(run.composed, run.orig)
        result = self.run_round(
            run.work,
            run.cur,
            calib,
            min(run.per_round, run.target - run.removed),
            run.generator,
            r,
            max(run.n_rounds, r + 1),
            protected_in_current(run.protected, lineage, run.cur),
        )
        run.record(result, lineage)
        run.checkpoint.save(run.state())
        self.on_round_end(r, run.composed)

    def _finish(self, run: _Run, t_start: float) -> Plan:
        """The composed plan with the run's record (settings, figures per round, totals)."""
        cfg = self.config
        composed, counters, total = run.composed, run.counters, run.total
        removed = composed.removed_params(run.orig)
        composed.method, composed.settings, composed.seed = self.name, cfg.to_dict(), cfg.seed
        composed.info = {
            "target_params": run.target,
            "removed_params": removed,
            "removed_fraction": removed / total,
            "rounds": run.rounds,
            "n_rounds": len(run.rounds),
            "forwards": counters["forwards"],
            "tokens": counters["tokens"],
            "prior_tokens": counters["prior_tokens"],
            "rounds_wall_s": round(counters["wall_s"], 2),
            "wall_s": round(time.perf_counter() - t_start, 2),  # this call (a resumed run: since resuming)
            "protected": {  # original indices
                Kind.ATTN_GROUP: sorted(run.protected[Kind.ATTN_GROUP]),
                Kind.MLP_CHANNEL: len(run.protected[Kind.MLP_CHANNEL]),
            },
            "penalty": cfg.penalty,
            "default_alphas": list(DEFAULT_ALPHAS[cfg.penalty]) if not cfg.alphas else None,
        }
        log.info(
            "bonsai: removed %d of %d prunable params (%.2f%%, target %d) in %d rounds, %d forwards, %d tokens",
            removed,
            total,
            100 * removed / total,
            run.target,
            len(run.rounds),
            counters["forwards"],
            counters["tokens"] + counters["prior_tokens"],
        )
        return composed
