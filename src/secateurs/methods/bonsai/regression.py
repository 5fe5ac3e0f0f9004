"""Bonsai's estimator: from sub-model keep-masks and their losses to per-unit importances. No model here.

Given `S` sub-models described by binary keep vectors over `F` regression features (a feature is one
unit, or a bundle of units that are always kept or dropped together) and their losses, fit

    -loss(mask) ~ intercept + sum_f keep_f * beta_f

so `beta_f` is the loss increase when feature f is dropped (higher = keep). Targets are `-loss`,
capped at `cap` robust standard deviations (`robust_sd`: the MAD scaled to a normal standard deviation)
and mean-centred (one broken sub-model must not steer the fit).

The fit is anchored at the prior, the closed-form counterpart of the reference's "initialise the
coefficients at the normalised prior, then train with a penalty":

1. Anchor: `beta = c_g * prior_f` with one non-negative scale `c_g` per feature group (attention /
   MLP; `anchor="per-group"`, default) or one for all (`"shared"`). Per group calibrates how the prior's
   scale compares across unit kinds: two numbers, well determined by a few dozen sub-models. If a
   group's scale still fits to 0 the shared scale is used instead (`extra["anchor_fallback"]`): with a
   zero anchor every unresolved unit of that kind would look free to drop.
   The scales are fitted jointly with the corrections below (block coordinate descent), not first.
2. Correction: the residual is regressed on the masks with an L2 (ridge, closed form) or L1
   (`sklearn.linear_model.Lasso`, started from zero correction, i.e. at the scaled prior) penalty, so the penalty shrinks towards the scaled prior rather than
   towards zero. The penalty `alpha` is relative: for L2 it multiplies the mean diagonal of `X^T X`; for
   L1 it is a fraction of the smallest penalty that zeroes every correction. `alpha = inf` is the
   anchored prior alone and is always a candidate, so cross-validation falls back to the prior when
   the masks carry no information.
3. `alpha` is chosen by k-fold cross-validation on Kendall's tau between out-of-fold predictions and
   the observed targets. Antithetic pairs stay in one fold (`sklearn.model_selection.GroupKFold` with
   the pairs as groups, shuffled with the given seed).

Antithetic pairs (a mask x and its complement 1 - x): under a linear model the pair's sum of targets is
the same for every pair, so a pair is one equation on the coefficients (its difference), not two; fit
with at least as many pairs as features you want resolved, or lean on the prior. In exchange, pairwise
interactions between units cancel from the difference exactly (x'Qx - (1-x)'Q(1-x) is linear in x), so
the linear fit to pairs is exact up to third-order effects.

The returned taus say whether the estimate is informative: `tau` overall, `tau_prior` for the anchored
prior alone, and per feature group a partial-residual tau: the group's part of the out-of-fold
prediction against the target minus the other groups' parts (about 0 when the group's coefficients
carry no information).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls
from scipy.stats import kendalltau, median_abs_deviation

# sklearn (Lasso, GroupKFold) is imported where a fit runs, not here: this module is loaded with the method
# registry by every CLI command, and sklearn's import takes about 1.5 s.

PENALTIES = ("l2", "l1")
ANCHORS = ("shared", "per-group")
DEFAULT_ALPHAS = {
    "l2": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),  # x mean diagonal of X^T X
    "l1": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),  # x alpha_max (the penalty that zeroes every correction)
}

# Block coordinate descent (anchor scales <-> penalised corrections): at most this many sweeps, stopping
# early once the scales move by less than SCALE_RTOL (relative; SCALE_ATOL for scales at 0). The problem
# is jointly convex, and a few sweeps usually suffice; the cap bounds the cost on degenerate folds.
JOINT_ITERS = 30
SCALE_RTOL, SCALE_ATOL = 1e-6, 1e-15
# Lasso's coordinate descent: sklearn's default (1000) stops short on the strongly correlated mask
# columns of antithetic designs; warm starts keep the later sweeps cheap.
LASSO_MAX_ITER = 20000
# Ridge: the penalty is relative to the mean diagonal of X^T X, floored so that a constant design
# (every feature kept in every training sample) still gives an invertible system.
RIDGE_MIN_SCALE = 1e-12
# sklearn's GroupKFold seeds a numpy RandomState, which takes 32-bit seeds only.
SEED_MOD = 2**32


@dataclass
class RegressionFit:
    """Coefficients per feature (loss increase when dropped; higher = keep) and how good they are."""

    coef: np.ndarray
    intercept: float
    alpha: float  # chosen relative penalty; inf = anchored prior only
    tau: float  # out-of-fold Kendall tau of the chosen fit (nan when undefined)
    tau_prior: float  # same for the anchored prior alone
    tau_groups: dict[str, float]  # partial-residual tau per feature group
    taus: dict[float, float]  # out-of-fold tau per candidate alpha
    scales: dict[str, float]  # anchor scale c_g per feature group (full-data fit)
    folds: int
    samples: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-friendly figures for `Plan.info`."""

        def f(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 4)

        return {
            "tau": f(self.tau),
            "tau_prior": f(self.tau_prior),
            "tau_groups": {k: f(v) for k, v in self.tau_groups.items()},
            "alpha": "prior-only" if math.isinf(self.alpha) else self.alpha,
            "taus": {("prior-only" if math.isinf(a) else str(a)): f(t) for a, t in self.taus.items()},
            "scales": {k: float(f"{v:.4g}") for k, v in self.scales.items()},
            "folds": self.folds,
            "samples": self.samples,
            **self.extra,
        }


def robust_sd(x: np.ndarray) -> float:
    """The median absolute deviation scaled to estimate a normal standard deviation (x 1.4826): the
    standard deviation itself would be inflated by the very outliers it is used to recognise."""
    return float(median_abs_deviation(np.asarray(x, dtype=np.float64), scale="normal"))


def prepare_targets(losses: np.ndarray, cap: float = 3.0) -> np.ndarray:
    """`-loss`, capped at `cap` robust standard deviations around the median (0 = no cap), mean-centred.

    The scale is `robust_sd`; the plain standard deviation when the MAD is 0.
    """
    y = -(np.asarray(losses, dtype=np.float64))
    if cap > 0 and len(y) > 2:
        med = float(np.median(y))
        sd = robust_sd(y) or float(y.std())
        if sd > 0:
            y = np.clip(y, med - cap * sd, med + cap * sd)
    return y - y.mean()


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b; nan when either side is constant."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b).statistic)


def _group_index(groups, n_features: int) -> tuple[list[str], np.ndarray]:
    if groups is None:
        return ["all"], np.zeros(n_features, dtype=np.int64)
    groups = np.asarray(groups)
    names = list(dict.fromkeys(groups.tolist()))
    return [str(n) for n in names], np.array([names.index(g) for g in groups.tolist()], dtype=np.int64)


@dataclass
class _Model:
    coef: np.ndarray
    x_mean: np.ndarray
    y_mean: float
    scales: np.ndarray

    def parts(self, x: np.ndarray, gidx: np.ndarray, n_groups: int) -> np.ndarray:
        """Per-group contributions to the centred prediction: [S, n_groups]."""
        xc = x - self.x_mean
        return np.stack([xc[:, gidx == g] @ self.coef[gidx == g] for g in range(n_groups)], axis=1)


def _fit_one(
    x: np.ndarray,
    y: np.ndarray,
    prior: np.ndarray,
    gidx: np.ndarray,
    n_groups: int,
    penalty: str,
    alpha: float,
    seed: int,
    shared: bool = False,
) -> _Model:
    """Anchor scales and corrections fitted jointly: `y ~ X (c_g prior + delta)`, penalty on delta only.

    Joint, because a lone unit with a huge effect and a low prior (SmolLM2 has one) would otherwise
    drive the anchor's least-squares scale to 0 before any correction could explain that unit; with a
    zero anchor, L1 shrinks every unresolved unit to "free to drop". Alternating non-negative least
    squares for the scales and the penalised fit for the corrections converges: the problem is jointly
    convex.
    """
    x_mean, y_mean = x.mean(axis=0), float(y.mean())
    xc, yc = x - x_mean, y - y_mean
    if shared:
        gidx, n_groups = np.zeros_like(gidx), 1
    z = np.stack([xc[:, gidx == g] @ prior[gidx == g] for g in range(n_groups)], axis=1)
    anchor = _anchor_solver(z)
    scales = anchor(yc)
    delta = np.zeros(x.shape[1])
    if math.isfinite(alpha):
        correct = _corrector(xc, yc - z @ scales, penalty, alpha, seed)
        for _ in range(JOINT_ITERS):
            delta = correct(yc - z @ scales)
            new = anchor(yc - xc @ delta)
            if np.allclose(new, scales, rtol=SCALE_RTOL, atol=SCALE_ATOL):
                break
            scales = new
    return _Model(scales[gidx] * prior + delta, x_mean, y_mean, scales)


def _anchor_solver(z: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Non-negative least squares for the anchor scales, one per group: `target ~ z @ c`, c >= 0.

    `z[:, g]` is group g's prior-weighted mask; a group whose column is all 0 keeps scale 0."""
    usable = np.abs(z).sum(axis=0) > 0

    def anchor(target: np.ndarray) -> np.ndarray:
        c = np.zeros(z.shape[1])
        if usable.any():
            c[usable] = nnls(z[:, usable], target)[0]
        return c

    return anchor


def _corrector(
    xc: np.ndarray, r0: np.ndarray, penalty: str, alpha: float, seed: int
) -> Callable[[np.ndarray], np.ndarray]:
    """The penalised fit of a residual on the centred masks: ridge (closed form, dual S x S) or Lasso.

    The Lasso's penalty is `alpha` x the smallest one that zeroes every correction of the first residual
    `r0`; at or above it (or when that is 0) the corrections stay 0."""
    n_samples, n_features = xc.shape
    if penalty == "l2":
        lam = alpha * max(float((xc**2).sum()) / n_features, RIDGE_MIN_SCALE)
        solve = np.linalg.inv(xc @ xc.T + lam * np.eye(n_samples))

        return lambda r: xc.T @ (solve @ r)

    from sklearn.linear_model import Lasso

    alpha_max = float(np.abs(xc.T @ r0).max()) / n_samples
    if not (alpha_max > 0 and alpha < 1):
        return lambda r: np.zeros(n_features)
    lasso = Lasso(
        alpha=alpha * alpha_max,
        fit_intercept=False,
        max_iter=LASSO_MAX_ITER,
        random_state=seed,
        warm_start=True,  # each sweep starts from the last corrections
    )

    def correct(r: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny folds
            return lasso.fit(xc, r).coef_.astype(np.float64).copy()

    return correct


def _test_folds(pairs: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) sample indices of `k` folds; all samples sharing a pair id land in the same fold."""
    from sklearn.model_selection import GroupKFold

    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed % SEED_MOD)
    return list(splitter.split(np.zeros((len(pairs), 1)), groups=pairs))


@dataclass
class _Data:
    """The regression's inputs, validated: masks, targets, prior, feature groups and pair ids."""

    x: np.ndarray  # [S, F] keep indicators
    y: np.ndarray  # [S] prepared targets
    prior: np.ndarray  # [F] non-negative
    names: list[str]  # feature group names
    gidx: np.ndarray  # [F] group index per feature
    pairs: np.ndarray  # [S] pair id per sample

    @classmethod
    def prepare(cls, keep, losses, prior, groups, pairs, cap: float) -> _Data:
        x = np.asarray(keep, dtype=np.float64)
        s, f = x.shape
        prior = np.zeros(f) if prior is None else np.clip(np.asarray(prior, dtype=np.float64), 0, None)
        names, gidx = _group_index(groups, f)
        pairs = np.arange(s) if pairs is None else np.asarray(pairs)
        return cls(x, prepare_targets(losses, cap), prior, names, gidx, pairs)

    @property
    def n_groups(self) -> int:
        return len(self.names)

    def fit(self, rows, penalty: str, alpha: float, seed: int, shared: bool) -> _Model:
        return _fit_one(
            self.x[rows], self.y[rows], self.prior, self.gidx, self.n_groups, penalty, alpha, seed, shared
        )


def fit_importance(
    keep: np.ndarray,
    losses: np.ndarray,
    prior: np.ndarray | None = None,
    groups=None,
    pairs: np.ndarray | None = None,
    penalty: str = "l2",
    alphas: tuple[float, ...] = (),
    folds: int = 5,
    cap: float = 3.0,
    seed: int = 0,
    anchor: str = "per-group",
) -> RegressionFit:
    """Fit feature importances from `keep` [S, F] (1 = kept) and `losses` [S]; see the module docstring.

    `prior` [F] is a non-negative prior importance per feature on the loss scale up to one factor per
    group (e.g. per-parameter score x parameters); None anchors at zero. `groups` [F] labels features
    (e.g. "attn"/"mlp") for the anchor scales and the per-group taus. `pairs` [S] keeps antithetic pairs
    in one cross-validation fold.

    Example (the loss is a known linear function of the mask)::

        keep = rng.integers(0, 2, (64, 10)); w = np.arange(10.0)
        fit = fit_importance(keep, 5.0 - keep @ w * 0.01)
        # np.argsort(fit.coef) == np.arange(10)
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    data = _Data.prepare(keep, losses, prior, groups, pairs, cap)
    grid = [math.inf] + sorted(alphas or DEFAULT_ALPHAS[penalty], reverse=True)  # strongest first
    k = max(2, min(folds, len(np.unique(data.pairs))))
    shared = anchor == "shared"
    oof = _out_of_fold_parts(data, grid, k, penalty, seed, shared)
    taus = {a: kendall(oof[a].sum(axis=1), data.y) for a in grid}
    best = _best_alpha(grid, taus)
    final, shared, fallback = _final_fit(data, penalty, best, seed, shared)
    return RegressionFit(
        coef=final.coef,
        intercept=final.y_mean - float(final.x_mean @ final.coef),
        alpha=best,
        tau=taus[best],
        tau_prior=taus[math.inf],
        tau_groups=_partial_taus(oof[best], data.y, data.names) if data.n_groups > 1 else {},
        taus=taus,
        scales={"shared": float(final.scales[0])}
        if shared
        else {name: float(final.scales[g]) for g, name in enumerate(data.names)},
        folds=k,
        samples=len(data.y),
        extra={"anchor_fallback": fallback},
    )


def _out_of_fold_parts(
    data: _Data, grid: list[float], k: int, penalty: str, seed: int, shared: bool
) -> dict[float, np.ndarray]:
    """Per alpha: [S, groups] out-of-fold per-group parts of the prediction.

    Per-fold intercepts are left out: they would add fold-level offsets that carry no information about
    the masks (y is centred once, globally)."""
    oof = {a: np.zeros((len(data.y), data.n_groups)) for a in grid}
    for train, test in _test_folds(data.pairs, k, seed):
        for a in grid:
            m = data.fit(train, penalty, a, seed, shared)
            oof[a][test] = m.parts(data.x[test], data.gidx, data.n_groups)
    return oof


def _best_alpha(grid: list[float], taus: dict[float, float]) -> float:
    """The alpha with the highest out-of-fold tau; ties keep the stronger penalty (closer to the prior).

    `grid` is ordered strongest first; an undefined (nan) tau counts as below any real one (-2 < -1)."""
    best = grid[0]
    for a in grid[1:]:
        if np.nan_to_num(taus[a], nan=-2.0) > np.nan_to_num(taus[best], nan=-2.0):
            best = a
    return best


def _partial_taus(parts: np.ndarray, y: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per group: tau of its part of the prediction against the target minus the other groups' parts."""
    total = parts.sum(axis=1)
    return {name: kendall(parts[:, g], y - (total - parts[:, g])) for g, name in enumerate(names)}


def _final_fit(data: _Data, penalty: str, alpha: float, seed: int, shared: bool) -> tuple[_Model, bool, bool]:
    """The fit on all samples at the chosen alpha: (model, shared scale used, fell back to shared).

    Per-group scales fall back to the shared one when a group that has a prior fits scale 0: that kind's
    unresolved units would otherwise all look free to drop."""
    rows = slice(None)
    final = data.fit(rows, penalty, alpha, seed, shared)
    if shared or not (data.prior > 0).any():
        return final, shared, False
    has_prior = np.array([(data.prior[data.gidx == g] > 0).any() for g in range(data.n_groups)])
    if (final.scales[has_prior] <= 0).any():
        return data.fit(rows, penalty, alpha, seed, True), True, True
    return final, shared, False
