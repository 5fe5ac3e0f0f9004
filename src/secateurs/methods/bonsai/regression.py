"""Bonsai's estimator: from sub-model keep-masks and their losses to per-unit importances. No model here.

Given `S` sub-models described by binary keep vectors over `F` regression features (a feature is one
unit, or a bundle of units that are always kept or dropped together) and their losses, fit

    -loss(mask) ~ intercept + sum_f keep_f * beta_f

so `beta_f` is the loss increase when feature f is dropped (higher = keep). Targets are `-loss`,
capped at `cap` robust standard deviations and mean-centred (one broken sub-model must not steer the fit).

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
   the observed targets. Antithetic pairs stay in one fold.

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
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls
from scipy.stats import kendalltau

PENALTIES = ("l2", "l1")
ANCHORS = ("shared", "per-group")
DEFAULT_ALPHAS = {
    "l2": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),  # x mean diagonal of X^T X
    "l1": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),  # x alpha_max (the penalty that zeroes every correction)
}


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


def prepare_targets(losses: np.ndarray, cap: float = 3.0) -> np.ndarray:
    """`-loss`, capped at `cap` robust standard deviations around the median (0 = no cap), mean-centred.

    The scale is 1.4826 x the median absolute deviation (the standard deviation itself would be inflated
    by the very outliers it should cap); the plain standard deviation when the MAD is 0.
    """
    y = -(np.asarray(losses, dtype=np.float64))
    if cap > 0 and len(y) > 2:
        med = float(np.median(y))
        sd = 1.4826 * float(np.median(np.abs(y - med))) or float(y.std())
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


JOINT_ITERS = 30  # block coordinate descent sweeps (anchor scales <-> penalised corrections)


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
    usable = np.abs(z).sum(axis=0) > 0

    def anchor(target: np.ndarray) -> np.ndarray:
        c = np.zeros(n_groups)
        if usable.any():
            c[usable] = nnls(z[:, usable], target)[0]
        return c

    scales = anchor(yc)
    delta = np.zeros(x.shape[1])
    if math.isfinite(alpha):
        r0 = yc - z @ scales
        if penalty == "l2":
            lam = alpha * max(float((xc**2).sum()) / xc.shape[1], 1e-12)
            solve = np.linalg.inv(xc @ xc.T + lam * np.eye(len(y)))  # dual form: S x S

            def correct(r):
                return xc.T @ (solve @ r)

        else:
            from sklearn.linear_model import Lasso

            alpha_max = float(np.abs(xc.T @ r0).max()) / len(y)
            lasso = None
            if alpha_max > 0 and alpha < 1:
                lasso = Lasso(
                    alpha=alpha * alpha_max,
                    fit_intercept=False,
                    max_iter=20000,
                    random_state=seed,
                    warm_start=True,  # each sweep starts from the last corrections
                )

            def correct(r):
                if lasso is None:
                    return np.zeros(x.shape[1])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # convergence warnings on tiny folds
                    return lasso.fit(xc, r).coef_.astype(np.float64).copy()

        for _ in range(JOINT_ITERS):
            delta = correct(yc - z @ scales)
            new = anchor(yc - xc @ delta)
            if np.allclose(new, scales, rtol=1e-6, atol=1e-15):
                break
            scales = new
    base = scales[gidx] * prior
    return _Model(base + delta, x_mean, y_mean, scales)


def _folds(pairs: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Boolean test masks over samples; all samples sharing a pair id land in the same fold."""
    ids = np.unique(pairs)
    rng = np.random.default_rng(seed)
    ids = ids[rng.permutation(len(ids))]
    return [np.isin(pairs, chunk) for chunk in np.array_split(ids, k)]


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
    shared = anchor == "shared"
    x = np.asarray(keep, dtype=np.float64)
    s, f = x.shape
    y = prepare_targets(losses, cap)
    prior = np.zeros(f) if prior is None else np.clip(np.asarray(prior, dtype=np.float64), 0, None)
    names, gidx = _group_index(groups, f)
    ng = len(names)
    pairs = np.arange(s) if pairs is None else np.asarray(pairs)
    grid = [math.inf] + sorted(alphas or DEFAULT_ALPHAS[penalty], reverse=True)  # strongest first
    k = max(2, min(folds, len(np.unique(pairs))))
    tests = _folds(pairs, k, seed)
    # Out-of-fold per-group parts of the prediction. Per-fold intercepts are left out: they would add
    # fold-level offsets that carry no information about the masks (y is centred once, globally).
    oof = {a: np.zeros((s, ng)) for a in grid}
    for test in tests:
        train = ~test
        for a in grid:
            m = _fit_one(x[train], y[train], prior, gidx, ng, penalty, a, seed, shared)
            oof[a][test] = m.parts(x[test], gidx, ng)
    taus = {a: kendall(oof[a].sum(axis=1), y) for a in grid}
    best = grid[0]
    for a in grid[1:]:  # ties keep the stronger penalty (closer to the prior)
        if np.nan_to_num(taus[a], nan=-2.0) > np.nan_to_num(taus[best], nan=-2.0):
            best = a
    parts = oof[best]
    total = parts.sum(axis=1)
    tau_groups = {}
    for g, name in enumerate(names):
        tau_groups[name] = kendall(parts[:, g], y - (total - parts[:, g]))
    final = _fit_one(x, y, prior, gidx, ng, penalty, best, seed, shared)
    fallback = False
    if not shared and (prior > 0).any():
        has_prior = np.array([(prior[gidx == g] > 0).any() for g in range(ng)])
        if (final.scales[has_prior] <= 0).any():  # that kind's unresolved units would look free to drop
            final, shared, fallback = _fit_one(x, y, prior, gidx, ng, penalty, best, seed, True), True, True
    intercept = final.y_mean - float(final.x_mean @ final.coef)
    return RegressionFit(
        coef=final.coef,
        intercept=intercept,
        alpha=best,
        tau=taus[best],
        tau_prior=taus[math.inf],
        tau_groups=tau_groups if ng > 1 else {},
        taus=taus,
        scales={"shared": float(final.scales[0])}
        if shared
        else {name: float(final.scales[g]) for g, name in enumerate(names)},
        folds=k,
        samples=s,
        extra={"anchor_fallback": fallback},
    )
