"""Policy-gradient Bernoulli masks (arXiv 2406.10576): learn a keep-probability per unit from losses only.

Every unit (GQA group, MLP channel, optionally whole layers or blocks) has a keep probability `s_u`.
Each step samples K masks m ~ Bernoulli(s) with a dedicated seeded generator, scores the K masked models
on one calibration batch in one batched `.losses` call of the method's evaluator (`Method.evaluator`: a
`SubmodelEvaluator` unless one is injected), forms the score-function gradient
(`estimator.score_gradient`), takes a cosine-scheduled step, and projects `s` back onto the parameter
budget. The finished probabilities are turned into a hard plan by `select`. Costs come from `LayerUnits`
(`UnitVector` lays them out as the tensor form `estimator.CostLayout`).

Budgets (`allocation`, `budget`):

* ``allocation="global", budget="global"`` (default): one parameter-weighted projection over all units,
  attention and MLP together -- the paper's "global heterogeneous" setting. Layers and kinds end with
  different kept fractions.
* ``allocation="global", budget="per-kind"``: the reference code's setting: attention and MLP are
  projected separately, each keeping (1 - sparsity) of its own parameters (layers still heterogeneous).
* ``allocation="uniform"``: every (layer, kind) is projected to (1 - sparsity) of its own parameters and
  the hard plan keeps the same count per layer (`select(..., "uniform")`).
* ``attention_allocation="uniform"`` with global allocation: each layer's GQA groups are projected to
  (1 - sparsity) of their own parameters and MLP channels globally to theirs (per-kind budget); the hard
  plan drops groups in bundles of one per layer, so every layer keeps the same count (what vLLM's
  per-layer architecture can serve), while channels still go anywhere.

Layer / block units (``units`` containing "layer", "attn_block" or "mlp_block", global budget only) are
gates: a sample's block is kept with probability (layer gate) x (block gate), and the expected kept cost
multiplies a block's content by its gates, so every parameter is counted once. The budget set is then
not convex; the projection moves along the gradient of the expected cost, re-evaluated at the projected
point (`estimator.project`), and hits the budget exactly each time. At the end a layer or block whose
probability is below 1/2 is a candidate to drop (lowest first, while it fits the budget); the fine units
take the rest of the budget.

MLP bundles (`channel_bundle`, default 0 = about one GQA group's parameters, 171 channels of SmolLM2):
channels share one probability in bundles, consecutive in init-score order within their layer. At this
budget a single channel's effect on the loss is far below the noise of the ~46k others, so per-channel
probabilities (the reference, `channel_bundle=1`) mostly random-walk away from the init; 30 x 9 bundles
+ 90 groups = 360 coordinates can be learned. Within a bundle, the final selection keeps the init
order. SmolLM2-135M at 50%, same 153,600 tokens: per channel 763.5 held-out perplexity, bundles 296.1
(block-influence 583.7, FLAP 945.2; dense 23.6).

Baseline (`baseline`, default leave-one-out): each step scores its K masks on ONE calibration window, so
the window's difficulty moves all K losses together. The reference's moving average (over earlier steps,
hence other windows) leaves that in the advantage; the mean of the other K-1 samples on the same window
removes it and keeps the estimator unbiased. SmolLM2 50%, bundles, same tokens: 231.7 against 296.1
with the moving average (one seed each).

Sample repair (`sample_repair`, default lstsq): the model that ships is repaired, and with the default
`--reconstruct lstsq --reconstruct-select obs` the repair keeps each layer's *counts* from the plan but
chooses which units and refits their weights. Scoring plain masked samples judges shapes on models that
never ship and rewards uneven shapes the repair cannot use. With lstsq each sample is scored as that
repair would leave its per-layer counts (`scoring.refits.RepairBank`: OBS-ordered units and precomputed
ridge refits, local to each layer on the dense stream), fitted on the repair's own windows where the
caller gives them (`Method.fit_windows`; the search's 32 x 128 tokens overfit). SmolLM2-135M, held-out
perplexity after the default repair, seeds 0/1/2: at 50% 88.41 / 95.08 / 104.31 (94.98 / 92.19 / 99.63
with the bank fitted on the search's windows; 107.96 / 121.33 / 139.11 with none); at 20% 36.17 / 36.81
/ 36.07 (39.02 / 38.15 / 37.20; 37.83 / 39.60 / 38.12 with none). It costs one dense pass over the
repair's windows, the greedy per module, 0.43 GiB of refits (30 layers x 8 MLP counts and 2 group
counts, over the kept columns only) and ~1.7x the search time.

Default budget (SmolLM2-135M to 50%, CPU): 300 steps x K=4 masks x 1 window of 128 tokens = 1,200
sub-model rows = 153,600 tokens, plus the wanda-sp init's one pass over the calibration windows (the CLI
default is 32 x 128 = 4,096 tokens): measured 13.2 minutes on 2 quiet CPU cores (~195 tokens/s); each
step is one forward of 4 x 128 tokens. This is about 0.5% of the reference's ~30k forwards of 8 x 128
tokens, so the metric init matters; the learning rate (0.05, cosine) is scaled up from the reference's
2e-3 for 100x fewer steps. Init z-scores are taken per layer and kind by default: across layers,
Wanda-sp's activation-norm scale grows with depth and a global z-score starts the first layers at ~1%
kept (held-out perplexity 1e5 instead of 6e3 before any step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.checkpoint import RunCheckpoint, run_fingerprint
from secateurs.errors import ConfigError, LossError
from secateurs.methods.base import Method, MethodConfig, UnitScores, fine_units, get_method, register
from secateurs.methods.policy_gradient.estimator import (
    ESTIMATORS,
    CostLayout,
    cosine_lr,
    leave_one_out,
    moving_baseline,
    project,
    score_gradient,
    zscore_sigmoid,
)
from secateurs.progress import progress
from secateurs.scoring.compensation import MeanCompensation
from secateurs.scoring.refits import RepairBank, even_counts
from secateurs.scoring.select import select, target_params
from secateurs.surgery.reconstruct import MODES as REPAIR_MODES
from secateurs.units.masks import Masks
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import COARSE_KINDS, FINE_KINDS, Kind, LayerUnits, UnitSpace

log = logging.getLogger(__name__)

BUDGETS = ("global", "per-kind")
BASELINES = ("moving", "leave-one-out")
INIT_SCOPES = ("layer", "global")
STATE_VERSION = 2  # 1: pickled state.pt (secateurs <= 0.1.0)
# Settings that may change between an interrupted run and its resumption.
_RESUMABLE = frozenset({"checkpoint_dir", "checkpoint_every", "resume", "log_every", "batch_rows"})

# The cost layout's blocks: block 2*l is layer l's attention, 2*l+1 its MLP.
_ATTN, _MLP = 0, 1
_FINE_BLOCK = {Kind.ATTN_GROUP: _ATTN, Kind.MLP_CHANNEL: _MLP}  # the block a fine unit lies in
# The blocks a gate multiplies. Its key order is the gate coordinates' order in the flat vector (after
# the fine units), which checkpoints and the seeded samples depend on; COARSE_KINDS lists the same
# kinds in another order, so it must not be used for the layout.
_GATE_COVERS = {Kind.LAYER: (_ATTN, _MLP), Kind.ATTN_BLOCK: (_ATTN,), Kind.MLP_BLOCK: (_MLP,)}
# The window order has its own stream (seed + 1), apart from the mask sampler (seed), so the windows a
# run sees do not depend on how many masks it samples.
_WINDOW_SEED_OFFSET = 1
# Within a bundle all channels share one probability; the final selection breaks the tie by init score
# with an offset of (rank / n) * 1e-6 < 1e-6 in a layer of n channels, meant to sit far below the
# differences learning makes between coordinates. (`_select` compares float32 scores, spaced 6e-8 near
# 0.5, so ranks closer than about n / 16 fall back to channel-index order.)
_RANK_TIE_BREAK = 1e-6
# A gate is a candidate to drop only where the sampler dropped it more often than not.
_GATE_DROP_BELOW = 0.5
# `plan.info["probabilities"]` is a record for reading and plotting: 5 decimals keep plan files small.
_INFO_DECIMALS = 5


@dataclass
class PolicyGradientConfig(MethodConfig):
    steps: int = field(default=300, metadata={"help": "optimisation steps (one calibration batch each)"})
    samples: int = field(default=4, metadata={"help": "K: masks sampled per step (reference: 2)"})
    lr: float = field(
        default=0.05,
        metadata={"help": "peak learning rate of the cosine schedule (reference: 2e-3, 30k steps)"},
    )
    estimator: str = field(
        default="reference",
        metadata={"help": "reference: /sqrt(s(1-s))/(K-1); exact: /(s(1-s)), mean over K"},
    )
    baseline: str = field(
        default="leave-one-out",
        metadata={"help": "moving: b <- (1-1/w) b + mean(L)/w; leave-one-out: mean of the other samples"},
    )
    baseline_window: int = field(default=5, metadata={"help": "w of the moving-average baseline"})
    eps: float = field(default=1e-3, metadata={"help": "probabilities stay in [eps, 1-eps]"})
    init: str = field(
        default="wanda-sp",
        metadata={"help": "'uniform' (all at the kept fraction) or a metric method's name (sigmoid z-score)"},
    )
    init_scope: str = field(
        default="layer",
        metadata={
            "help": "z-score init scores per layer and kind (layer) or per kind across layers (global)"
        },
    )
    sample_repair: str = field(
        default="lstsq",
        metadata={
            "help": "score each sampled sub-model as a repair would leave it: none (as masked), bias "
            "(FLAP's mean compensation of its removed units, one dense statistics pass), lstsq (the "
            "units greedy OBS keeps at its per-layer counts and their ridge refit, from the dense "
            "model's Gram matrices on the repair's windows, as --reconstruct lstsq with "
            "--reconstruct-select obs; give none "
            "with another --reconstruct)"
        },
    )
    gate_init: float = field(default=0.95, metadata={"help": "initial keep probability of layer/block gates"})
    budget: str = field(
        default="global",
        metadata={
            "help": "global: one parameter-weighted projection; per-kind: attention and MLP separately"
        },
    )
    split_len: int = field(
        default=128,
        metadata={"help": "calibration windows longer than this are cut into pieces this long (0: never)"},
    )
    windows_per_step: int = field(default=1, metadata={"help": "calibration windows per step (all K masks)"})
    channel_bundle: int = field(
        default=0,
        metadata={
            "help": "MLP channels sharing one probability, consecutive by init score within a layer "
            "(1: one per channel, as the reference; 0: about one GQA group's parameters)"
        },
    )
    checkpoint_dir: str | None = field(default=None, metadata={"help": "save the run state here"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint_dir"})
    log_every: int = field(default=10, metadata={"help": "steps between entries of the recorded curve"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "steps",
            "samples",
            "baseline_window",
            "windows_per_step",
            "checkpoint_every",
            "log_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.channel_bundle < 0:
            raise ConfigError(f"channel_bundle must be >= 0, got {self.channel_bundle}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.eps < 0.5:
            raise ConfigError(f"eps must be in (0, 0.5), got {self.eps}")
        if not self.eps <= self.gate_init <= 1 - self.eps:
            raise ConfigError(f"gate_init must be in [eps, 1-eps], got {self.gate_init}")
        if self.split_len < 0 or self.split_len == 1:
            raise ConfigError(f"split_len must be 0 (never split) or >= 2, got {self.split_len}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.baseline == "leave-one-out" and self.samples < 2:
            raise ConfigError("baseline leave-one-out needs samples >= 2")
        if self.init_scope not in INIT_SCOPES:
            raise ConfigError(f"init_scope must be one of {INIT_SCOPES}, got {self.init_scope!r}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        gates = [str(u) for u in self.units if u in COARSE_KINDS]
        if self.budget == "per-kind" and not all(k in self.units for k in FINE_KINDS):
            raise ConfigError("budget per-kind needs both attn_group and mlp_channel units")
        if gates and (self.budget != "global" or self.allocation != "global" or self.uniform_attention):
            raise ConfigError(
                f"units {gates} need allocation=global, budget=global and attention allocation global "
                "(a layer gate spans both kinds)"
            )
        if self.uniform_attention and not all(k in self.units for k in FINE_KINDS):
            raise ConfigError("uniform attention allocation needs both attn_group and mlp_channel units")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume needs checkpoint_dir")
        if self.sample_repair not in REPAIR_MODES:  # scored as the repair of that name leaves it
            raise ConfigError(
                f"sample_repair must be one of {', '.join(REPAIR_MODES)}, got {self.sample_repair!r}"
            )

    def scored_repair(self) -> dict[str, str]:
        if self.sample_repair == "lstsq":  # the bank's OBS units and refits
            return {"reconstruct": "lstsq", "reconstruct_select": "obs"}
        if self.sample_repair == "bias":
            return {"reconstruct": "bias"}
        return {}


@dataclass
class PGState:
    """Everything a run needs to continue exactly: probabilities, baseline, step, sampler state, curve."""

    s: torch.Tensor  # flat keep probabilities, float64
    baseline: float | None
    step: int
    generator: torch.Tensor  # torch.Generator state
    curve: dict[str, list[float]]
    tokens: int = 0  # tokens through the model: K masks x windows x length, summed over steps
    forwards: int = 0  # batched forward calls (where the evaluator counts them)
    ties: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # UnitVector ties (bundles)
    order: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # init score rank within a layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "s": self.s.clone(),
            "baseline": self.baseline,
            "step": self.step,
            "generator": self.generator.clone(),
            "curve": {k: list(v) for k, v in self.curve.items()},
            "tokens": self.tokens,
            "forwards": self.forwards,
            "ties": self.ties,
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PGState:
        return cls(
            d["s"], d["baseline"], d["step"], d["generator"], d["curve"], d["tokens"], d["forwards"],
            d.get("ties", {}), d.get("order", {}),
        )  # fmt: skip


def _unit_and_block_cost(lu: LayerUnits, kind: Kind) -> tuple[int, int]:
    """One unit of fine `kind` and the whole block it lies in, as `LayerUnits` costs them."""
    if kind == Kind.ATTN_GROUP:
        return lu.group_cost, lu.attn_cost
    return lu.channel_cost, lu.mlp_cost


class UnitVector:
    """The map between the flat probability vector and per-layer, per-kind units of one `UnitSpace`.

    Order: learned fine kinds (all layers of attn_group, then all of mlp_channel), then gate kinds
    (layer, attn_block, mlp_block; one coordinate per layer that has the block). Blocks for the cost
    layout: 2*l is layer l's attention, 2*l+1 its MLP.
    """

    def __init__(
        self, space: UnitSpace, units: tuple[str, ...], ties: dict[str, list[torch.Tensor]] | None = None
    ):
        self.space = space
        self.fine = [k for k in FINE_KINDS if k in units]
        self.gates = [k for k in _GATE_COVERS if k in units]
        # ties[kind][layer][u] = the coordinate (within the layer) that unit u shares; default: its own.
        self.ties = {k: [torch.arange(n) for n in space.n_units(k)] for k in self.fine}
        for kind, per_layer in (ties or {}).items():
            if kind in self.ties:
                self.ties[kind] = [t.to(torch.long) for t in per_layer]
        self.slices: dict[Kind, list[slice | None]] = {}
        pos = 0
        for kind in self.fine:
            self.slices[kind] = []
            for t in self.ties[kind]:
                n = _n_coords(t)
                self.slices[kind].append(slice(pos, pos + n))
                pos += n
        self.n_fine = pos
        for kind in self.gates:
            self.slices[kind] = []
            for n in space.n_units(kind):
                self.slices[kind].append(slice(pos, pos + 1) if n else None)
                pos += n
        self.n = pos
        self.layout = self._layout()

    def _layout(self) -> CostLayout:
        """`CostLayout` of this vector from `LayerUnits`' costs: a learned unit's cost times the units tied
        to it; a block's fixed part is its cost less what its learned units carry (all of it for a kind
        that is not learned), so the full layout costs exactly `space.total_cost`."""
        sp = self.space
        cost = torch.zeros(self.n_fine, dtype=torch.float64)
        block = torch.zeros(self.n_fine, dtype=torch.long)
        fixed = torch.zeros(2 * sp.n_layers, dtype=torch.float64)
        for i, lu in enumerate(sp.layers):
            for kind, off in _FINE_BLOCK.items():
                unit_cost, block_cost = _unit_and_block_cost(lu, kind)
                b = 2 * i + off
                fixed[b] = block_cost
                if kind in self.fine:
                    sl = self.slices[kind][i]
                    members = torch.bincount(self.ties[kind][i], minlength=sl.stop - sl.start)
                    cost[sl], block[sl] = float(unit_cost) * members.to(torch.float64), b
                    fixed[b] -= unit_cost * int(members.sum())
        gate_blocks = torch.zeros(self.n - self.n_fine, 2 * sp.n_layers, dtype=torch.bool)
        for kind in self.gates:
            for i, sl in enumerate(self.slices[kind]):
                if sl is not None:
                    for off in _GATE_COVERS[kind]:
                        gate_blocks[sl.start - self.n_fine, 2 * i + off] = True
        return CostLayout(cost, block, fixed, gate_blocks)

    def indices(self, kind: Kind, layers: list[int] | None = None) -> torch.Tensor:
        layers = range(self.space.n_layers) if layers is None else layers
        parts = [torch.arange(sl.start, sl.stop) for i in layers if (sl := self.slices[kind][i]) is not None]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def per_layer(self, flat: torch.Tensor, kind: Kind) -> list[torch.Tensor]:
        """Per layer, one value per coordinate (a bundle of tied units has one)."""
        return [flat[..., sl] if sl is not None else flat[..., :0] for sl in self.slices[kind]]

    def per_unit(self, flat: torch.Tensor, kind: Kind) -> list[torch.Tensor]:
        """Per layer, one value per unit: tied units repeat their bundle's value."""
        if kind not in self.ties:
            return self.per_layer(flat, kind)
        return [c[..., t] for c, t in zip(self.per_layer(flat, kind), self.ties[kind], strict=True)]

    def masks(self, samples: torch.Tensor) -> Masks:
        """Masks with one row per sample [K, n]; unlearned kinds stay at 1; gates multiply into blocks."""
        k = samples.shape[0]
        samples = samples.float()
        m = Masks.ones(self.space, k)
        for kind, target in ((Kind.ATTN_GROUP, m.groups), (Kind.MLP_CHANNEL, m.channels)):
            if kind in self.fine:
                for i, t in enumerate(self.per_unit(samples, kind)):
                    target[i] = t.clone()
        blocks = {_ATTN: m.attn_block, _MLP: m.mlp_block}
        for kind in self.gates:
            for i, sl in enumerate(self.slices[kind]):
                if sl is None:
                    continue
                gate = samples[:, sl.start]
                for off in _GATE_COVERS[kind]:
                    blocks[off][:, i] *= gate
        return m

    def segments(
        self, allocation: str, budget: str, uniform_attention: bool = False
    ) -> list[tuple[torch.Tensor, CostLayout]]:
        """(coordinates, layout) pairs, each projected to (1 - sparsity) of its own full cost.

        `uniform_attention`: each layer's GQA groups are their own segment (the same expected kept count
        everywhere), whatever `allocation` says of MLP channels."""
        n_blocks = 2 * self.space.n_layers
        if allocation == "global" and budget == "global" and not uniform_attention:
            return [(torch.arange(self.n), self.layout)]
        out = []
        every = [list(range(self.space.n_layers))]
        each = [[i] for i in range(self.space.n_layers)]
        for kind in self.fine:
            off = _FINE_BLOCK[kind]
            per_layer = allocation == "uniform" or (uniform_attention and kind == Kind.ATTN_GROUP)
            for layers in each if per_layer else every:
                idx = self.indices(kind, layers)
                if idx.numel() == 0:
                    continue
                blocks = torch.zeros(n_blocks, dtype=torch.bool)
                blocks[[2 * i + off for i in layers]] = True
                out.append((idx, self.layout.restrict(idx, blocks)))
        return out


def _split_windows(calib: torch.Tensor, split_len: int) -> torch.Tensor:
    """[N, T] -> [N * (T // split_len), split_len] (as given when split_len is 0 or not shorter than T)."""
    n, t = calib.shape
    if split_len == 0 or split_len >= t:
        return calib
    pieces = t // split_len
    return calib[:, : pieces * split_len].reshape(n * pieces, split_len)


def _bundles(
    space: UnitSpace, scores: UnitScores | None, size: int
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """MLP channels tied into bundles of `size` (0: about one GQA group's parameters), consecutive in
    init-score order within their layer, and each channel's rank in that order. Why: at ~1,000 sampled
    masks, a single channel's effect on the loss is far below the noise of the others', so per-channel
    probabilities mostly random-walk away from the init; a bundle's effect is large enough to learn."""
    kind = Kind.MLP_CHANNEL
    if size == 1:
        return {}, {}
    ties, ranks = [], []
    for i, (n, lu) in enumerate(zip(space.n_units(kind), space.layers, strict=True)):
        tie, rank = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        if n:
            s = scores[kind][i].flatten().double() if scores is not None else torch.zeros(n)
            order = torch.argsort(s, stable=True)
            rank[order] = torch.arange(n)
            for j, chunk in enumerate(lu.channel_bundles(order, size)):
                tie[chunk] = j
        ties.append(tie)
        ranks.append(rank)
    return {kind: ties}, {kind: ranks}


def _n_coords(tie: torch.Tensor) -> int:
    """Coordinates of one layer's tie vector (ties are numbered 0 .. n-1)."""
    return int(tie.max()) + 1 if tie.numel() else 0


def _coord_mean(values: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the units that share each coordinate."""
    n = _n_coords(tie)
    total = torch.zeros(n, dtype=values.dtype).index_add_(0, tie, values)
    return total / torch.bincount(tie, minlength=n).clamp(min=1).to(values.dtype)


def _kept_fractions(plan: Plan, space: UnitSpace) -> dict[str, list[float]]:
    """Per layer: kept share of its attention groups, of its MLP channels, and of its parameters."""
    out: dict[str, list[float]] = {"attn": [], "mlp": [], "params": []}
    for lp, lu in zip(plan.canonical(space).layers, space.layers, strict=True):
        g, c = len(lp.groups(lu.n_groups)), len(lp.channels(lu.n_channels))
        out["attn"].append(g / lu.n_groups if lu.n_groups else 0.0)
        out["mlp"].append(c / lu.n_channels if lu.n_channels else 0.0)
        kept = lu.kept_cost(g, c, lp.attn_bias is not None, lp.mlp_bias is not None)
        out["params"].append(kept / lu.cost if lu.cost else 0.0)
    return out


def _window_order(n_windows: int, seed: int) -> torch.Tensor:
    """The seeded order in which steps visit the calibration windows (cycling when steps outnumber them)."""
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + _WINDOW_SEED_OFFSET))


def _step_rows(order: torch.Tensor, step: int, per_step: int) -> torch.Tensor:
    """The windows of step `step`: the next `per_step` of `order`, wrapping around."""
    return order[(step * per_step + torch.arange(per_step)) % order.numel()]


def _sample_masks(s: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """K masks m ~ Bernoulli(s), [K, n] float, from the run's own generator (saved in checkpoints)."""
    return (torch.rand(k, s.numel(), generator=gen, dtype=torch.float64) < s).float()


def _tie_break(probs: list[torch.Tensor], ranks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer: probabilities plus a rank offset below `_RANK_TIE_BREAK`, so a bundle's channels (one
    shared probability) are selected in init-score order."""
    return [p + _RANK_TIE_BREAK * r / max(r.numel(), 1) for p, r in zip(probs, ranks, strict=True)]


def _count_work(state: PGState, tokens: int, evaluator: Any) -> None:
    """Add one step's tokens (K masks x the batch) and the evaluator's batched forwards, where it counts
    them (`stats.forwards`), to the run's totals."""
    state.tokens += int(tokens)
    state.forwards += int(getattr(getattr(evaluator, "stats", None), "forwards", 0))


def _show_progress(bar: tqdm, losses: torch.Tensor, state: PGState) -> None:
    """One step on the progress bar, with this step's mean loss and the moving baseline."""
    # refresh=False: the bar redraws on its own interval (a log line every 30 s off a terminal), not per step
    bar.set_postfix(loss=f"{float(losses.mean()):.3f}", baseline=f"{state.baseline:.3f}", refresh=False)
    bar.update(1)


@register
class PolicyGradient(Method):
    """Learn Bernoulli keep-probabilities with a score-function (policy) gradient; forward passes only.

    Sub-models are scored by `self.evaluator(model, windows, space)` (`Method`), so an
    `evaluator_factory(model, windows, space)` given to the constructor replaces the default
    `SubmodelEvaluator`; tests use it to plug in synthetic losses. One evaluator is made per step, on
    that step's windows.
    """

    name = "policy-gradient"
    description = (
        "Bernoulli keep-probabilities learned by policy gradient with a budget projection (2406.10576)"
    )
    config_class = PolicyGradientConfig

    # -- public ----------------------------------------------------------------------------------
    def plan(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> Plan:
        state = self.learn(model, space, calib)
        return self.finish(state, space)

    def learn(
        self, model: nn.Module, space: UnitSpace, calib: torch.Tensor, max_steps: int | None = None
    ) -> PGState:
        """Run (or resume) the optimisation; stop after `max_steps` steps in total if given.

        Each step: draw its windows, sample K masks, score them (a non-finite loss stops the run), update
        and project the probabilities, checkpoint, report progress."""
        cfg: PolicyGradientConfig = self.config
        checkpoint = RunCheckpoint(
            cfg.checkpoint_dir, self.name, STATE_VERSION, cfg.to_dict(), run_fingerprint(model, calib),
            _RESUMABLE,
        )  # fmt: skip
        state = self._start(model, space, calib, checkpoint)
        vec = self._unit_vector(space, state)
        segments = vec.segments(cfg.allocation, cfg.budget, cfg.uniform_attention)
        windows = _split_windows(calib, cfg.split_len)
        order = _window_order(windows.shape[0], cfg.seed)
        end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        log.info(
            "policy gradient: %d units, steps %d..%d of %d, K=%d, %d window(s) x %d tokens per step (%d tokens per step)",
            vec.n, state.step, end, cfg.steps, cfg.samples, cfg.windows_per_step, windows.shape[1],
            cfg.samples * cfg.windows_per_step * windows.shape[1],
        )  # fmt: skip
        repair = self._sample_repair(model, space, calib, vec) if state.step < end else None
        gen = torch.Generator()
        gen.set_state(state.generator)
        saved = state.step  # the step the last good checkpoint holds
        with progress(total=cfg.steps, initial=state.step, desc="policy-gradient", unit="step") as bar:
            while state.step < end:
                batch = windows[_step_rows(order, state.step, cfg.windows_per_step)]
                samples = _sample_masks(state.s, cfg.samples, gen)
                masks = repair(vec.masks(samples))
                losses, evaluator = self._evaluate(model, space, batch, masks, state.step, saved)
                state = self._step(state, samples, losses, vec, segments, gen)
                _count_work(state, cfg.samples * batch.numel(), evaluator)
                if self._checkpoint_due(state.step, end):
                    checkpoint.save(state.to_dict())
                    saved = state.step
                _show_progress(bar, losses, state)
        return state

    def finish(self, state: PGState, space: UnitSpace) -> Plan:
        """Hard plan from the learned probabilities, with the probabilities and curve in `plan.info`."""
        cfg: PolicyGradientConfig = self.config
        vec = UnitVector(space, cfg.units, state.ties)
        probs = {kind: vec.per_unit(state.s, kind) for kind in vec.fine + vec.gates}
        for kind, ranks in state.order.items():  # within a bundle, the lower init score goes first
            probs[kind] = _tie_break(probs[kind], ranks)
        plan = self._select(probs, space, vec)
        expected = float(vec.layout.expected(state.s)) / space.total_cost
        kept = _kept_fractions(plan, space)
        plan.method, plan.settings, plan.seed = self.name, cfg.to_dict(), cfg.seed
        plan.info.update(
            {
                "tokens": state.tokens,
                "forwards": state.forwards,
                "probabilities": {
                    k: [[round(float(x), _INFO_DECIMALS) for x in t] for t in v] for k, v in probs.items()
                },
                "expected_kept_fraction": expected,
                "kept_fraction_per_layer": kept,
                "training": {
                    "steps": state.step,
                    "tokens": state.tokens,
                    "curve": state.curve,
                    "final_baseline": state.baseline,
                },
            }
        )
        log.info(
            "policy gradient: removed %.2f%% of prunable parameters (expected kept before rounding %.2f%%)",
            100 * plan.removed_fraction(space), 100 * expected,
        )  # fmt: skip
        return plan

    # -- the steps of `learn` --------------------------------------------------------------------
    def _start(
        self, model: nn.Module, space: UnitSpace, calib: torch.Tensor, checkpoint: RunCheckpoint
    ) -> PGState:
        """The saved state when resuming (`RunCheckpoint.start` checks it is this run's), else a fresh one
        at the init probabilities."""
        cfg: PolicyGradientConfig = self.config
        saved = checkpoint.start(cfg.resume)
        if saved is not None:
            return PGState.from_dict(saved["state"])
        s, ties, order = self._init(model, space, calib)
        return PGState(
            s=s,
            baseline=None,
            step=0,
            generator=torch.Generator().manual_seed(cfg.seed).get_state(),
            curve={"step": [], "loss": [], "baseline": [], "lr": []},
            ties=ties,
            order=order,
        )

    def _unit_vector(self, space: UnitSpace, state: PGState) -> UnitVector:
        """The layout `state` was made with (its bundles); a state of another model is refused."""
        vec = UnitVector(space, self.config.units, state.ties)
        if state.s.numel() != vec.n:
            raise ConfigError(
                f"cannot resume: checkpoint has {state.s.numel()} coordinates, the model has {vec.n}"
            )
        return vec

    def _sample_repair(
        self, model: nn.Module, space: UnitSpace, calib: torch.Tensor, vec: UnitVector
    ) -> Callable[[Masks], Masks]:
        """What turns a batch of sampled masks into the sub-models scored (`sample_repair`): as they
        are, with FLAP's compensation biases, or as the OBS repair of their counts (`scoring.refits`;
        the MLP grid has one count per number of kept bundles, so most samples' counts have a refit)."""
        cfg: PolicyGradientConfig = self.config
        if cfg.sample_repair == "bias":
            return MeanCompensation.from_model(model, space, calib, cfg.batch_rows).add_to_
        if cfg.sample_repair == "lstsq":
            ties = vec.ties.get(Kind.MLP_CHANNEL)
            counts = None  # channels not learned, or one probability each: the bank's default grid
            if ties is not None and any(_n_coords(t) < t.numel() for t in ties):
                counts = [even_counts(t.numel(), _n_coords(t)) for t in ties]
            return RepairBank.from_model(model, space, self.fit_windows(calib), counts, cfg.batch_rows).apply_
        return lambda masks: masks

    def _checkpoint_due(self, step: int, end: int) -> bool:
        """Save every `checkpoint_every` steps and at the last step of this call (when saving at all)."""
        cfg: PolicyGradientConfig = self.config
        return bool(cfg.checkpoint_dir) and (step % cfg.checkpoint_every == 0 or step == end)

    def _evaluate(
        self,
        model: nn.Module,
        space: UnitSpace,
        batch: torch.Tensor,
        masks: Masks,
        step: int,
        saved: int,
    ) -> tuple[torch.Tensor, Any]:
        """Losses of the K sampled sub-models `masks` on `batch` (float64 [K]) and the evaluator that made
        them.

        A non-finite loss, or an evaluator's `LossError`, stops the run: a NaN would poison every
        probability through the gradient. The error names the last good checkpoint, which is intact."""
        cfg: PolicyGradientConfig = self.config
        try:
            evaluator = self.evaluator(model, batch, space)
            losses = torch.as_tensor(evaluator.losses(masks), dtype=torch.float64)
            if not torch.isfinite(losses).all():
                raise LossError(f"non-finite loss {losses.tolist()}")
        except LossError as e:
            where = (
                f"; the last good checkpoint (step {saved}) in {cfg.checkpoint_dir} is intact"
                if cfg.checkpoint_dir and saved
                else ""
            )
            raise LossError(f"policy gradient stopped at step {step}: {e}{where}") from e
        return losses, evaluator

    def _step(
        self,
        state: PGState,
        samples: torch.Tensor,
        losses: torch.Tensor,
        vec: UnitVector,
        segments: list[tuple[torch.Tensor, CostLayout]],
        gen: torch.Generator,
    ) -> PGState:
        """One update: baseline, score-function gradient, cosine-scheduled step, projection onto the
        budget; the curve records every `log_every`-th step and the last."""
        cfg: PolicyGradientConfig = self.config
        t = state.step
        mean_loss = float(losses.mean())
        if cfg.baseline == "leave-one-out":
            base = leave_one_out(losses)
        else:
            base = torch.tensor(mean_loss if state.baseline is None else state.baseline, dtype=torch.float64)
        g = score_gradient(losses, samples, state.s, base, cfg.estimator, cfg.eps)
        lr = cosine_lr(cfg.lr, t, cfg.steps)
        s = self._project(state.s - lr * g, segments)
        baseline = moving_baseline(state.baseline, mean_loss, cfg.baseline_window)  # after the gradient
        curve = state.curve
        if t % cfg.log_every == 0 or t + 1 == cfg.steps:
            for key, val in (("step", t), ("loss", mean_loss), ("baseline", baseline), ("lr", lr)):
                curve[key].append(float(val))
        return PGState(
            s, baseline, t + 1, gen.get_state(), curve, state.tokens, state.forwards, state.ties, state.order
        )

    def _project(self, v: torch.Tensor, segments: list[tuple[torch.Tensor, CostLayout]]) -> torch.Tensor:
        """Each segment's coordinates onto (1 - sparsity) of its full cost, within [eps, 1 - eps]."""
        cfg: PolicyGradientConfig = self.config
        out = v.clone()
        keep = 1.0 - cfg.sparsity
        for idx, layout in segments:
            out[idx] = project(v[idx], layout, keep * layout.full(), lo=cfg.eps, hi=1 - cfg.eps)
        return out

    # -- init ------------------------------------------------------------------------------------
    def _init(
        self, model: nn.Module, space: UnitSpace, calib: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Fine units: sigmoid(z-score of a metric) per kind, or the kept fraction; gates: `gate_init`.
        Then every segment is shifted (fine units only) so its expected kept cost is the budget.
        Returns the probabilities and the MLP bundles (ties and init-score ranks) they are over."""
        cfg: PolicyGradientConfig = self.config
        keep = 1.0 - cfg.sparsity
        scores = self._metric_scores(model, space, calib)
        ties, order = (
            _bundles(space, scores, cfg.channel_bundle) if Kind.MLP_CHANNEL in cfg.units else ({}, {})
        )
        vec = UnitVector(space, cfg.units, ties)
        v = torch.full((vec.n,), keep, dtype=torch.float64)
        v[vec.n_fine :] = cfg.gate_init
        for kind in vec.fine if scores is not None else ():
            coords = [
                _coord_mean(t.flatten().to(torch.float64), tie)
                for t, tie in zip(scores[kind], vec.ties[kind], strict=True)
            ]
            if cfg.init_scope == "global":
                v[vec.indices(kind)] = zscore_sigmoid(torch.cat(coords))
            else:
                for i, c in enumerate(coords):
                    if c.numel():
                        v[vec.indices(kind, [i])] = zscore_sigmoid(c)
        shift = torch.zeros(vec.n, dtype=torch.float64)
        shift[: vec.n_fine or vec.n] = 1.0  # gates stay at gate_init (unless alone); fine units move together
        out = v.clamp(cfg.eps, 1 - cfg.eps)
        for idx, layout in vec.segments(cfg.allocation, cfg.budget, cfg.uniform_attention):
            try:
                out[idx] = project(
                    v[idx], layout, keep * layout.full(), lo=cfg.eps, hi=1 - cfg.eps, direction=shift[idx]
                )
            except ValueError as e:
                raise ConfigError(f"cannot start at the budget with gate_init={cfg.gate_init}: {e}") from None
        return out, ties, order

    def _metric_scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores | None:
        """The init metric's per-unit scores of the fine kinds (None for a uniform init)."""
        cfg: PolicyGradientConfig = self.config
        fine = fine_units(cfg.units)
        if cfg.init == "uniform" or not fine:
            return None
        method = get_method(cfg.init)
        metric = method(MethodConfig(sparsity=cfg.sparsity, units=fine, seed=cfg.seed))
        if not hasattr(metric, "scores"):
            raise ConfigError(f"init {cfg.init!r} is not a metric method (it has no per-unit scores)")
        scores = metric.scores(model, space, calib)
        log.info("policy gradient: initialised from %s scores", cfg.init)
        return scores

    # -- finish ----------------------------------------------------------------------------------
    def _select(self, probs: dict[str, list[torch.Tensor]], space: UnitSpace, vec: UnitVector) -> Plan:
        cfg: PolicyGradientConfig = self.config
        scores = {k: [t.float().clone() for t in v] for k, v in probs.items()}
        if vec.fine:
            for kind in vec.gates:  # a gate goes only where the sampler drops it more often than not
                for t in scores[kind]:
                    t[t >= _GATE_DROP_BELOW] = math.inf
        if (cfg.budget == "global" and not cfg.uniform_attention) or cfg.allocation == "uniform":
            return select(UnitScores(scores), space, cfg.sparsity, cfg.allocation, cfg.units)
        # Per kind (also for uniform attention, which the projection budgets per layer and kind):
        # Attention takes its own share, to the nearest whole group; MLP channels land the total target.
        attn_total = sum(lu.attn_cost for lu in space.layers if lu.n_groups)
        half_group = min(lu.group_cost for lu in space.layers if lu.n_groups) / 2
        attn_target = max(0, math.ceil(cfg.sparsity * attn_total - half_group))
        attn = None
        removed_attn = 0
        if attn_target:
            attn = select(
                UnitScores(scores), space, cfg.sparsity, "global", (Kind.ATTN_GROUP,), target=attn_target,
                uniform_attention=cfg.uniform_attention,
            )  # fmt: skip
            removed_attn = attn.removed_params(space)
        mlp_target = target_params(space, cfg.sparsity) - removed_attn
        mlp = select(
            UnitScores(scores), space, cfg.sparsity, "global", (Kind.MLP_CHANNEL,), target=mlp_target
        )
        layers = [
            LayerPlan(
                keep_groups=attn.layers[i].keep_groups if attn else None,
                keep_channels=mlp.layers[i].keep_channels,
                drop_attn=attn.layers[i].drop_attn if attn else False,
                drop_mlp=mlp.layers[i].drop_mlp,
            )
            for i in range(space.n_layers)
        ]
        plan = Plan(layers).canonical(space)
        removed = plan.removed_params(space)
        if removed < target_params(space, cfg.sparsity):
            raise ConfigError(f"per-kind selection removed {removed} parameters, short of the target")
        return plan
