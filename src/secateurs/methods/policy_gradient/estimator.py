"""Plain tensor maths for policy-gradient masks: the score estimator, the budget projection, the init.

No model here. Keep-probabilities live in one flat vector `s`: fine units (GQA groups, MLP channels)
first, then optional gates (whole layers or blocks). `CostLayout` says what each coordinate costs, so
the expected kept parameter count can be computed with every parameter counted once: a gate multiplies
the keep probabilities of everything inside the blocks it covers (the expectation of a product of
independent Bernoullis is the product of their means).

Example::

    layout = CostLayout.ungated(torch.tensor([3.0, 1.0, 1.0]))
    s = project(torch.tensor([0.9, 0.9, 0.2]), layout, budget=2.0)
    layout.expected(s)  # tensor(2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq

ESTIMATORS = ("reference", "exact")


# -- the estimator -----------------------------------------------------------------------------------
def score_gradient(
    losses: torch.Tensor,
    masks: torch.Tensor,
    s: torch.Tensor,
    baseline: torch.Tensor | float,
    estimator: str = "reference",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Score-function estimate of d E[L] / d s from K sampled masks.

    `losses` [K], `masks` [K, n] (0/1 samples of Bernoulli(s)), `s` [n], `baseline` a scalar or [K]
    (a per-sample baseline must not depend on its own sample, e.g. leave-one-out).

    * ``"exact"``: mean_k (L_k - b) (m_k - s) / (s (1 - s)). With a baseline independent of the samples
      this is an unbiased estimate of the gradient of E[L] (d log p(m) / d s = (m - s) / (s (1 - s))).
    * ``"reference"`` (the paper's code): sum_k (L_k - b) (m_k - s) / sqrt(s (1 - s)) / (K - 1), i.e. the
      exact form times sqrt(s (1 - s)) per coordinate (a preconditioner) times K / (K - 1) (a learning-rate
      factor). With K = 1 the divisor is 1 (the reference needs K >= 2).

    `s` is clamped to [eps, 1 - eps] in the denominators only.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    k = losses.shape[0]
    s = s.to(torch.float64)
    adv = (losses.to(torch.float64) - torch.as_tensor(baseline, dtype=torch.float64)).reshape(k, 1)
    weighted = adv * (masks.to(torch.float64) - s)  # [K, n]
    var = s.clamp(eps, 1 - eps) * (1 - s.clamp(eps, 1 - eps))
    if estimator == "exact":
        return weighted.mean(dim=0) / var
    return weighted.sum(dim=0) / var.sqrt() / max(k - 1, 1)


def moving_baseline(baseline: float | None, mean_loss: float, window: int) -> float:
    """b <- (1 - 1/w) b + mean(L) / w, starting from the first loss."""
    if baseline is None:
        return float(mean_loss)
    return (1.0 - 1.0 / window) * baseline + float(mean_loss) / window


def leave_one_out(losses: torch.Tensor) -> torch.Tensor:
    """Per-sample baseline: the mean of the other samples' losses on the same batch (needs K >= 2)."""
    k = losses.shape[0]
    return (losses.sum() - losses) / (k - 1)


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """lr * (1 + cos(pi * step / steps)) / 2 for step = 0 .. steps - 1."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


# -- expected cost -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostLayout:
    """What a flat probability vector keeps, in parameters.

    Coordinates 0 .. n_fine-1 are fine units: unit u has cost `fine_cost[u]` and lies in block
    `fine_block[u]`. The remaining n_gates coordinates are gates: gate j multiplies every block b with
    `gate_blocks[j, b]`. `block_fixed[b]` is the part of block b that no learned fine unit carries (an
    output bias, or units of a kind that is not being pruned). Then

        E[kept] = sum_b G_b * (block_fixed[b] + sum_{u in b} fine_cost[u] * s_u),  G_b = prod_{j covers b} s_j

    The numbers come from `LayerUnits` (see `UnitVector`); this is their expectation in tensor form. For
    a hard 0/1 vector it equals `Plan.kept_cost` of the same choice, except that `block_fixed` (an output
    bias) counts while a block's gates are on even if none of its units is kept, where a plan drops the
    block, bias included. In expectation that overstates by block_fixed[b] G_b prod_u (1 - s_u): nothing
    for models without output biases, negligible for blocks of many units.
    """

    fine_cost: torch.Tensor  # [n_fine] float64
    fine_block: torch.Tensor  # [n_fine] long
    block_fixed: torch.Tensor  # [n_blocks] float64
    gate_blocks: torch.Tensor  # [n_gates, n_blocks] bool

    @classmethod
    def ungated(cls, cost: torch.Tensor) -> CostLayout:
        """Independent units, one block, no fixed part: E[kept] = sum_u cost_u s_u."""
        n = cost.numel()
        return cls(
            cost.to(torch.float64).flatten(),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(1, dtype=torch.float64),
            torch.zeros(0, 1, dtype=torch.bool),
        )

    @property
    def n_fine(self) -> int:
        return self.fine_cost.numel()

    @property
    def n_gates(self) -> int:
        return self.gate_blocks.shape[0]

    @property
    def n(self) -> int:
        return self.n_fine + self.n_gates

    def _content(self, s: torch.Tensor) -> torch.Tensor:
        content = self.block_fixed.clone()
        return content.index_add_(0, self.fine_block, self.fine_cost * s[: self.n_fine])

    def _gate_factors(self, s: torch.Tensor) -> torch.Tensor:
        """[n_gates, n_blocks]: s_j where gate j covers block b, else 1."""
        z = s[self.n_fine :].reshape(-1, 1)
        return torch.where(self.gate_blocks, z, torch.ones_like(z))

    def block_gate(self, s: torch.Tensor) -> torch.Tensor:
        """G_b, [n_blocks]."""
        return self._gate_factors(s.to(torch.float64)).prod(dim=0)

    def expected(self, s: torch.Tensor) -> torch.Tensor:
        """Expected kept cost (float64 scalar)."""
        s = s.to(torch.float64)
        if not self.n_gates:  # the common case, and the root search's inner loop
            return self.block_fixed.sum() + (self.fine_cost * s[: self.n_fine]).sum()
        return (self.block_gate(s) * self._content(s)).sum()

    def full(self) -> float:
        """The cost with every coordinate at 1."""
        return float(self.expected(torch.ones(self.n, dtype=torch.float64)))

    def marginal(self, s: torch.Tensor) -> torch.Tensor:
        """d E[kept] / d s, [n]: fine unit u -> cost_u * G_b(u); gate j -> sum of the blocks it covers,
        each block's content times the other gates covering it."""
        s = s.to(torch.float64)
        factors = self._gate_factors(s)
        out = torch.empty(self.n, dtype=torch.float64)
        out[: self.n_fine] = self.fine_cost * factors.prod(dim=0)[self.fine_block]
        if self.n_gates:
            ones = torch.ones_like(factors[:1])
            before = torch.cat([ones, factors[:-1]]).cumprod(dim=0)
            after = torch.cat([factors[1:], ones]).flip(0).cumprod(dim=0).flip(0)
            others = before * after  # product over the other gates, without dividing by s_j
            out[self.n_fine :] = (self.gate_blocks * others * self._content(s)).sum(dim=1)
        return out

    def restrict(self, idx: torch.Tensor, blocks: torch.Tensor) -> CostLayout:
        """The layout of coordinates `idx` (fine ones first, then gates, in order) over the blocks in the
        bool mask `blocks`; other blocks count nothing. Used to budget a subset (one kind, one layer)."""
        idx = idx.to(torch.long)
        fine = idx[idx < self.n_fine]
        gates = idx[idx >= self.n_fine] - self.n_fine
        if not torch.equal(idx, torch.cat([fine, gates + self.n_fine])):
            raise ValueError("restrict: fine coordinates must come before gates")
        in_blocks = blocks[self.fine_block[fine]]
        return CostLayout(
            self.fine_cost[fine] * in_blocks,
            self.fine_block[fine],
            self.block_fixed * blocks,
            self.gate_blocks[gates] & blocks,
        )


# -- the projection ----------------------------------------------------------------------------------
# Rounds of re-evaluating the direction at the projected point when gates make the budget set curved.
# Every round lands on the budget; the rounds only move s towards the Euclidean projection's
# KKT fixed point, which they approach linearly where they converge (about 10x closer per round on the
# tests' random gated layouts, slower on some). 4 is the setting the reported results were made with:
# each further round costs one more solve per step for a small change of s.
GATED_ROUNDS = 4
# Slack of the reachability check, relative to the budget (or 1 parameter): E[kept] is a float64 sum of
# up to ~1e5 products, whose rounding stays below ~1e-11 relative (n machine epsilons), so a budget
# within 1e-9 of the reachable range is reachable in exact arithmetic and one further out is an error.
BUDGET_RTOL = 1e-9
# Root finding on lambda (`scipy.optimize.brentq`; E[kept] is monotone in lambda, and piecewise linear
# without gates) aims at the budget to this relative error, far inside BUDGET_RTOL (the bisection it
# replaced stopped at the same): lambda's tolerance is this error divided by the steepest slope E[kept]
# can have along d, d . marginal(ones), since E[kept] is multilinear with non-negative coefficients and
# its marginals grow with every coordinate.
BUDGET_HIT_RTOL = 1e-13
LAMBDA_RTOL = 4 * float(np.finfo(np.float64).eps)  # the least brentq accepts: lambda to rounding
# Brent's method needs at most a few times the ~50 halvings of the bracket that reach that tolerance; a
# solve that does not converge within this is a bug, and raises rather than return an off-budget
# point.
LAMBDA_MAXITER = 500


def project(
    v: torch.Tensor,
    layout: CostLayout,
    budget: float,
    lo: float = 0.0,
    hi: float = 1.0,
    direction: torch.Tensor | None = None,
    rounds: int = GATED_ROUNDS,
) -> torch.Tensor:
    """s = clip(v - lambda * d, lo, hi) with the scalar lambda found by root finding so E[kept](s) = budget.

    Without gates, d = cost and this is the exact Euclidean projection onto {s in [lo, hi],
    sum cost_u s_u = budget} (all costs equal: a plain shift). With gates the set is not convex; d is the
    gradient of the expected cost (`CostLayout.marginal`) re-evaluated at the projected point for `rounds`
    rounds, which is the Euclidean projection's KKT condition at its fixed point, and every round hits the
    budget exactly. `direction` fixes d instead (e.g. ones: a pure shift; zeros freeze coordinates).
    E[kept] is non-decreasing in every coordinate and d >= 0, so the budget is monotone in lambda.
    """
    v = v.to(torch.float64)
    s = v.clamp(lo, hi)
    n_rounds = 1 if (direction is not None or layout.n_gates == 0) else rounds
    for _ in range(n_rounds):
        d = layout.marginal(s) if direction is None else direction.to(torch.float64)
        s = _solve_lambda(v, d, layout, float(budget), lo, hi)
    return s


def _solve_lambda(
    v: torch.Tensor, d: torch.Tensor, layout: CostLayout, budget: float, lo: float, hi: float
) -> torch.Tensor:
    """clip(v - lambda * d, lo, hi) at the lambda where E[kept] = budget (`project`'s inner solve)."""

    def at(lam: float) -> torch.Tensor:
        return (v - lam * d).clamp(lo, hi)

    def excess(lam: float) -> float:  # non-increasing in lambda
        return float(layout.expected(at(lam))) - budget

    moving = d > 0
    if not moving.any():
        raise ValueError("projection: no coordinate can move (all directions are zero)")
    lam_lo = float(((v - hi) / d)[moving].min())  # every moving coordinate at hi
    lam_hi = float(((v - lo) / d)[moving].max())  # every moving coordinate at lo
    top, bottom = excess(lam_lo), excess(lam_hi)
    tol = BUDGET_RTOL * max(abs(budget), 1.0)
    if top < -tol or bottom > tol:
        raise ValueError(
            f"projection: budget {budget:.6g} outside the reachable range "
            f"[{bottom + budget:.6g}, {top + budget:.6g}]"
        )
    if top <= 0:  # the budget is (within rounding) the most the moving coordinates can keep
        return at(lam_lo)
    if bottom >= 0:  # ... or the least
        return at(lam_hi)
    # > 0 here: were it 0, E[kept] would not move with lambda and an end was returned above.
    steepest = float((d * layout.marginal(torch.ones_like(v))).sum())
    xtol = BUDGET_HIT_RTOL * max(abs(budget), 1.0) / steepest
    lam = brentq(excess, lam_lo, lam_hi, xtol=xtol, rtol=LAMBDA_RTOL, maxiter=LAMBDA_MAXITER)
    return at(lam)


# -- initialisation ----------------------------------------------------------------------------------
def zscore_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid of the z-score of `x` (a constant vector maps to 0.5 everywhere)."""
    x = x.to(torch.float64)
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    z = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
    return torch.sigmoid(z)
