"""Bonsai: the regression recovers known importances, antithetic masks, rounds hit the target exactly,
resume gives the identical plan, and attention groups are candidates even with 2 groups per layer."""

import copy

import numpy as np
import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.eval.loss import EvalStats
from secateurs.methods.base import REGISTRY, MethodConfig, MetricMethod, UnitScores, get_method
from secateurs.methods.bonsai import Bonsai, BonsaiConfig
from secateurs.methods.bonsai.candidates import (
    antithetic_keep,
    drop_probabilities,
    feature_masks,
    layer_lineage,
    protected_in_current,
    round_candidates,
    to_protect,
)
from secateurs.methods.bonsai.regression import _test_folds, fit_importance, kendall, prepare_targets
from secateurs.scoring.select import target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.testing import tiny_model
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import FINE_KINDS, Kind, UnitSpace


def _calib(n=8, t=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _antithetic(s, f, seed=0):
    rng = np.random.default_rng(seed)
    half = rng.integers(0, 2, (s // 2, f))
    keep = np.empty((s, f))
    keep[0::2], keep[1::2] = half, 1 - half
    return keep, np.repeat(np.arange(s // 2), 2)


# -- regression (plain arrays) -------------------------------------------------------------------


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_regression_recovers_known_linear_importances(penalty):
    rng = np.random.default_rng(1)
    w = rng.uniform(0.0, 1.0, 20)
    # 40 pairs: an antithetic pair gives one equation on the coefficients (its sum is constant)
    keep, pairs = _antithetic(80, 20)
    losses = 4.0 - 0.01 * keep @ w + rng.normal(0, 1e-4, 80)  # keeping unit f lowers the loss by w_f
    fit = fit_importance(keep, losses, pairs=pairs, penalty=penalty, seed=0)
    assert kendall(fit.coef, w) > 0.8
    assert set(np.argsort(fit.coef)[:5]) == set(np.argsort(w)[:5])  # the least important are found
    assert fit.tau > 0.8  # and cross-validation says so
    # coefficients are on the loss scale: a unit's coefficient ~ its loss increase when dropped
    np.testing.assert_allclose(fit.coef, 0.01 * w, atol=2e-3)


def test_regression_prior_anchor_helps_when_samples_are_few():
    rng = np.random.default_rng(2)
    f = 120
    w = rng.gamma(2.0, 1.0, f)
    keep, pairs = _antithetic(32, f)
    losses = 4.0 - 0.01 * keep @ w + rng.normal(0, 1e-3, 32)
    prior = w * rng.lognormal(0, 0.4, f)  # a noisy prior
    plain = fit_importance(keep, losses, pairs=pairs)
    anchored = fit_importance(keep, losses, prior=prior, pairs=pairs)
    assert kendall(anchored.coef, w) > kendall(plain.coef, w) + 0.2
    assert kendall(anchored.coef, w) >= kendall(prior, w) - 0.02  # never much worse than the prior


@pytest.mark.parametrize("anchor", ["shared", "per-group"])
def test_regression_anchor_survives_one_huge_low_prior_unit(anchor):
    """SmolLM2's round 1: one attention group worth ~2.8 nats has a low prior. Fitting the anchor's scale
    first gave 0, and L1 then shrank every unresolved unit to 0 (= free to drop). Jointly, the huge unit
    gets its own correction and the anchor keeps the prior's ranking for the rest."""
    rng = np.random.default_rng(4)
    f = 40
    w = rng.uniform(0.5, 1.5, f)
    w[0] = 100.0  # the catastrophic unit
    prior = w.copy()
    prior[0] = 0.1  # ... which the prior misses
    groups = np.array(["attn"] * 10 + ["mlp"] * 30)
    keep, pairs = _antithetic(32, f, seed=5)  # 16 pairs for 40 features: the prior has to carry the rest
    losses = 4.0 - 0.01 * keep @ w
    fit = fit_importance(keep, losses, prior=prior, groups=groups, pairs=pairs, penalty="l1", anchor=anchor)
    assert all(v > 0 for v in fit.scales.values())
    assert np.argmax(fit.coef) == 0
    assert (fit.coef[1:] > 0).all()  # nothing unresolved looks free to drop
    for g in ("attn", "mlp"):  # per-group scales may differ a little, so rank within each group
        sel = (groups == g) & (np.arange(f) > 0)
        assert kendall(fit.coef[sel], w[sel]) > 0.8
    if anchor == "shared":
        assert kendall(fit.coef[1:], w[1:]) > 0.8


def test_regression_split_taus_and_scales_per_group():
    rng = np.random.default_rng(3)
    groups = np.array(["attn"] * 10 + ["mlp"] * 40)
    w = np.where(groups == "attn", 0.0, rng.uniform(0, 1, 50))  # attention carries no signal at all
    keep, pairs = _antithetic(64, 50)
    losses = 4.0 - 0.01 * keep @ w + rng.normal(0, 1e-4, 64)
    no_attn_prior = np.where(groups == "attn", 0.0, 1.0)
    fit = fit_importance(keep, losses, prior=no_attn_prior, groups=groups, pairs=pairs, anchor="per-group")
    assert fit.tau_groups["mlp"] > 0.7
    assert abs(fit.tau_groups["attn"]) < 0.4
    assert set(fit.scales) == {"attn", "mlp"} and fit.scales["mlp"] > 0
    assert not fit.extra["anchor_fallback"]
    # a prior for attention that the losses do not support fits a zero attention scale: with it every
    # attention unit would look free to drop, so the shared scale is used instead
    fit = fit_importance(keep, losses, prior=np.ones(50), groups=groups, pairs=pairs, anchor="per-group")
    assert fit.extra["anchor_fallback"] and set(fit.scales) == {"shared"} and fit.scales["shared"] > 0


def test_targets_are_centred_and_capped():
    losses = np.array([1.0, 1.1, 0.9, 1.0, 50.0, 1.05, 0.95, 1.0])
    y = prepare_targets(losses, cap=2.0)
    assert abs(y.mean()) < 1e-12
    assert np.argmin(y) == 4  # the broken sub-model is still the worst, just not by 49
    assert np.ptp(y) < 1.0
    np.testing.assert_allclose(prepare_targets(losses, cap=0), -(losses - losses.mean()))


def test_cv_folds_keep_antithetic_pairs_together():
    pairs = np.repeat(np.arange(10), 2)
    folds = _test_folds(pairs, 5, seed=3)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(20))
    for train, test in folds:
        assert len(test) == 4 and not set(pairs[train].tolist()) & set(pairs[test].tolist())
    assert [t.tolist() for _, t in folds] == [t.tolist() for _, t in _test_folds(pairs, 5, seed=3)]


# -- candidates and antithetic masks -------------------------------------------------------------


def _magnitude_prior(model, space):
    cls = get_method("magnitude")
    return cls(MethodConfig()).scores(model, space, _calib())


def test_antithetic_pairs_are_complements_within_candidates():
    model = tiny_model("llama")
    space = UnitSpace.from_model(model)
    cands = round_candidates(
        space, _magnitude_prior(model, space), 0.1 * space.total_cost, FINE_KINDS, 2.0, 2
    )
    p = drop_probabilities(cands, {Kind.ATTN_GROUP: 0.5, Kind.MLP_CHANNEL: 0.5})
    keep = antithetic_keep(p, 40, torch.Generator().manual_seed(0))
    masks = feature_masks(space, cands, keep)
    for li, lu in enumerate(space.layers):
        cand_g = torch.zeros(lu.n_groups, dtype=torch.bool)
        cand_c = torch.zeros(lu.n_channels, dtype=torch.bool)
        for k, layer, idx in zip(cands.kind, cands.layer, cands.units, strict=True):
            if layer == li:
                (cand_g if k == Kind.ATTN_GROUP else cand_c)[idx] = True
        for m, cand in ((masks.groups[li], cand_g), (masks.channels[li], cand_c)):
            a, b = m[0::2], m[1::2]
            assert torch.equal(a[:, cand] + b[:, cand], torch.ones_like(a[:, cand]))  # complements
            assert torch.equal(a[:, ~cand], torch.ones_like(a[:, ~cand]))  # identical (kept) elsewhere
            assert torch.equal(b[:, ~cand], torch.ones_like(b[:, ~cand]))
    # the number dropped varies from sample to sample, so kind-level effects are identifiable
    kinds = np.array(cands.kind)
    n_attn = (1 - keep[:, kinds == Kind.ATTN_GROUP]).sum(1)
    n_mlp = (1 - keep[:, kinds == Kind.MLP_CHANNEL]).sum(1)
    assert n_attn.unique().numel() > 1 and n_mlp.unique().numel() > 1


def test_few_units_attention_groups_are_candidates():
    """2 GQA groups per layer: the per-module 1 - 2*prune_frac rule would make none a candidate."""
    model = _plant(tiny_model("llama"))  # known positive importances for the fake evaluator below
    space = UnitSpace.from_model(model)
    a = space.adapter
    width = space.layers[0].geometry.q_per_kv * space.layers[0].geometry.head_dim
    hd = space.layers[0].geometry.head_dim
    with torch.no_grad():  # group 0 of layers 1 and 2 becomes tiny: lowest prior, least importance
        for li in (1, 2):
            layer = a.decoder_layers(model)[li]
            (q, k, v), o = a.attn_in(layer), a.o_proj(layer)
            q.weight[:width] *= 1e-3
            k.weight[:hd] *= 1e-3
            v.weight[:hd] *= 1e-3
            o.weight[:, :width] *= 1e-3
    cands = round_candidates(
        space, _magnitude_prior(model, space), 0.1 * space.total_cost, FINE_KINDS, 2.0, 0
    )
    attn = {
        (li, int(idx[0]))
        for k, li, idx in zip(cands.kind, cands.layer, cands.units, strict=True)
        if k == Kind.ATTN_GROUP
    }
    assert {(1, 0), (2, 0)} <= attn
    # and they are dropped when the losses say they matter least
    plan = _fake_bonsai(
        BonsaiConfig(sparsity=0.1, prior="magnitude", masks_per_round=32, channel_bundle=4)
    ).plan(model, space, _calib())
    canon = plan.canonical(space)
    assert 0 not in canon.layers[1].groups(2) and 0 not in canon.layers[2].groups(2)
    assert {(1, 0), (2, 0)} <= {tuple(x) for x in plan.info["rounds"][0]["attn_candidates"]}


# -- whole rounds with a fake evaluator whose loss is a known linear function of the mask ---------


def _plant(model, seed=0):
    """Write a known importance into each unit: o_proj[0, first column of group g], down_proj[0, j]."""
    g = torch.Generator().manual_seed(seed)
    space = UnitSpace.from_model(model)
    a = space.adapter
    with torch.no_grad():
        for layer, lu in zip(a.decoder_layers(model), space.layers, strict=True):
            width = lu.geometry.q_per_kv * lu.geometry.head_dim
            o, down = a.o_proj(layer), a.down_proj(layer)
            ratio = lu.group_cost / lu.channel_cost  # comparable per-parameter importance across kinds
            o.weight[0, ::width] = ratio * (0.1 + 0.9 * torch.rand(lu.n_groups, generator=g))
            down.weight[0, :] = 0.1 + 0.9 * torch.rand(lu.n_channels, generator=g)
    return model


def _importances(model, space):
    a = space.adapter
    groups, channels = [], []
    for layer, lu in zip(a.decoder_layers(model), space.layers, strict=True):
        width = lu.geometry.q_per_kv * lu.geometry.head_dim
        groups.append(a.o_proj(layer).weight[0, ::width].detach().double() if lu.n_groups else torch.zeros(0))
        channels.append(a.down_proj(layer).weight[0].detach().double() if lu.n_channels else torch.zeros(0))
    return groups, channels


class LinearLossEvaluator:
    """loss(mask) = 3 + 0.01 * sum of the planted importances of dropped units + small noise."""

    def __init__(self, model, windows, space, noise=1e-5):
        self.model, self.space, self.noise = model, space, noise
        self.stats = EvalStats()
        self.g = torch.Generator().manual_seed(int(windows.sum()))

    def refresh(self):
        self.space = UnitSpace.from_model(self.model)

    def losses(self, masks):
        groups, channels = _importances(self.model, self.space)
        out = torch.full((masks.batch,), 3.0, dtype=torch.float64)
        for li in range(self.space.n_layers):
            out += 0.01 * (1 - masks.groups[li].double()) @ groups[li]
            out += 0.01 * (1 - masks.channels[li].double()) @ channels[li]
        self.stats.forwards += 1
        return (out + self.noise * torch.randn(masks.batch, generator=self.g, dtype=torch.float64)).float()


def _fake_bonsai(cfg):
    """Bonsai on `LinearLossEvaluator`'s synthetic losses (the method's evaluator injection)."""
    return Bonsai(cfg, evaluator_factory=LinearLossEvaluator)


class NullEvaluator(LinearLossEvaluator):
    """Losses that do not depend on the mask: selection among candidates is then blind."""

    def losses(self, masks):
        self.stats.forwards += 1
        return 3.0 + 0.01 * torch.randn(masks.batch, generator=self.g)


def _null_bonsai(cfg):
    return Bonsai(cfg, evaluator_factory=NullEvaluator)


def _dropped_over_kept(make, penalty):
    model = _plant(tiny_model("llama", layers=2))
    space = UnitSpace.from_model(model)
    _, channels = _importances(model, space)
    # 48 pairs for ~40 single-channel features (an antithetic pair is one equation on the coefficients);
    # candidate_ratio 4 leaves the selection some freedom (with 2, most candidates must go)
    cfg = BonsaiConfig(
        sparsity=0.2,
        prior="random",
        masks_per_round=96,
        candidate_ratio=4,
        channel_bundle=1,
        seed=3,
        penalty=penalty,
    )
    plan = make(cfg).plan(model, space, _calib())
    canon = plan.canonical(space)
    kept_w, dropped_w = [], []
    for li, (lp, lu) in enumerate(zip(canon.layers, space.layers, strict=True)):
        keep = torch.zeros(lu.n_channels, dtype=torch.bool)
        keep[lp.channels(lu.n_channels)] = True
        kept_w.append(channels[li][keep])
        dropped_w.append(channels[li][~keep])
    return float(torch.cat(dropped_w).mean()) / float(torch.cat(kept_w).mean()), plan


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_rounds_keep_the_units_the_losses_say_matter(penalty):
    # the prior is random, so only the regression can find the unimportant channels
    ratio, plan = _dropped_over_kept(_fake_bonsai, penalty)
    blind, blind_plan = _dropped_over_kept(_null_bonsai, penalty)
    assert ratio < 0.7 < 0.8 < blind
    assert all(r["tau"] > 0.6 for r in plan.info["rounds"])
    assert all(abs(r["tau"] or 0.0) < 0.3 for r in blind_plan.info["rounds"])


def test_protected_units_follow_their_original_indices():
    model = tiny_model("llama", layers=2)
    orig = UnitSpace.from_model(model)
    n = orig.layers[0].n_channels
    plan = Plan([LayerPlan(keep_groups=[1], keep_channels=list(range(1, n))), LayerPlan()])
    lineage = layer_lineage(plan, orig)
    assert lineage[0].groups == [1] and lineage[0].channels[0] == 1 and lineage[1].groups == [0, 1]
    cur = UnitSpace.from_model(apply_plan_(copy.deepcopy(model), plan))
    protected = {Kind.ATTN_GROUP: {(0, 1)}, Kind.MLP_CHANNEL: {(0, 1), (1, 0)}}  # original indices
    now = protected_in_current(protected, lineage, cur)
    assert now[Kind.ATTN_GROUP][0].tolist() == [True] and not now[Kind.ATTN_GROUP][1].any()
    assert now[Kind.MLP_CHANNEL][0].nonzero().flatten().tolist() == [0]  # original channel 1 is now 0
    assert now[Kind.MLP_CHANNEL][1].nonzero().flatten().tolist() == [0]


def test_protect_rule():
    coef = np.array([0.01, 0.02, 3.0, 0.05, 0.03, 0.5])
    dropped = np.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    # the round's predicted loss increase is 0.01 + 0.02 + 0.015 = 0.045
    assert to_protect(coef, dropped, loss_spread=0.3).tolist() == [2, 5]
    assert to_protect(coef, dropped, loss_spread=1.0).tolist() == [2]  # must also beat the spread
    assert to_protect(-coef, dropped, loss_spread=0.0).tolist() == []


class _MarkedLowPrior(MetricMethod):
    """Test prior: every unit 1, except attention groups whose planted importance is huge: 0."""

    name = "test-marked-low"
    description = "test only"

    def scores(self, model, space, calib):
        groups, channels = _importances(model, space)
        return UnitScores(
            {
                Kind.ATTN_GROUP: [(g < 100).float() for g in groups],
                Kind.MLP_CHANNEL: [torch.ones_like(c).float() for c in channels],
            }
        )


def test_catastrophic_unit_is_protected_and_kept(monkeypatch):
    monkeypatch.setitem(REGISTRY, _MarkedLowPrior.name, _MarkedLowPrior)
    model = _plant(tiny_model("llama", layers=2))
    space = UnitSpace.from_model(model)
    o = space.adapter.o_proj(space.adapter.decoder_layers(model)[1])
    with torch.no_grad():  # layer 1, group 0: the lowest prior, but worth 30x any other group
        o.weight[0, 0] = 30.0 * float(o.weight[0, 0])
    cfg = BonsaiConfig(sparsity=0.3, prior=_MarkedLowPrior.name, masks_per_round=48, channel_bundle=4)
    plan = _fake_bonsai(cfg).plan(model, space, _calib())
    assert plan.info["rounds"][0]["protected"][0][:2] == [Kind.ATTN_GROUP, 1]
    assert [1, 0] in [list(x) for x in plan.info["protected"][Kind.ATTN_GROUP]]
    assert 0 in plan.canonical(space).layers[1].groups(2)
    # once protected it is no candidate: later rounds' attention candidates (original indices) are others
    assert [1, 0] in plan.info["rounds"][0]["attn_candidates"]
    assert all([1, 0] not in r["attn_candidates"] for r in plan.info["rounds"][1:])
    no_protect = _fake_bonsai(BonsaiConfig(**{**cfg.to_dict(), "protect": False})).plan(
        model, space, _calib()
    )
    assert no_protect.info["protected"][Kind.ATTN_GROUP] == []
    assert 0 in no_protect.canonical(space).layers[1].groups(2)  # the regression alone keeps it too


# -- the real evaluator on tiny models -----------------------------------------------------------


@pytest.mark.parametrize(
    "family", ["llama", "qwen3", "mistral", "gemma2", "gemma3", "olmo2", "granite", "phi3"]
)
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_target_met_exactly_and_plan_applies(family, sparsity):
    model = tiny_model(family, layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = UnitSpace.from_model(model)
    cfg = BonsaiConfig(
        sparsity=sparsity, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=4
    )
    plan = Bonsai(cfg).plan(model, space, _calib())
    # the caller's model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    target = target_params(space, sparsity)
    removed = space.total_cost - plan.kept_cost(space)
    assert target <= removed < target + min(space.unit_costs(Kind.MLP_CHANNEL))
    assert plan.info["removed_params"] == removed
    assert plan.info["n_rounds"] == len(plan.info["rounds"]) == int(np.ceil(sparsity / 0.1 - 1e-9))
    assert plan.info["forwards"] > 0 and plan.info["tokens"] > 0
    assert all("tau" in r and "wall_s" in r and "alpha" in r for r in plan.info["rounds"])
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert UnitSpace.from_model(pruned).total_cost == plan.kept_cost(space)
    with torch.inference_mode():
        assert torch.isfinite(pruned(_calib()).logits).all()


class _Interrupted(RuntimeError):
    pass


class KilledAfterFirstRound(Bonsai):
    def on_round_end(self, round_index, plan):
        if round_index == 0:
            raise _Interrupted


def test_resume_after_interruption_gives_identical_plan(tmp_path):
    model = tiny_model("llama", layers=4)
    space = UnitSpace.from_model(model)
    calib = _calib()
    kw = dict(sparsity=0.35, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=2, seed=5)
    straight = Bonsai(BonsaiConfig(**kw)).plan(model, space, calib)

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(_Interrupted):
        KilledAfterFirstRound(BonsaiConfig(**kw, checkpoint_dir=ckpt)).plan(model, space, calib)
    resumed = Bonsai(BonsaiConfig(**kw, checkpoint_dir=ckpt, resume=True)).plan(model, space, calib)
    assert resumed.layers == straight.layers
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in straight.info["rounds"]]
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in resumed.info["rounds"]] == strip
    assert resumed.info["tokens"] == straight.info["tokens"]
    # a checkpoint from other settings is refused, not silently mixed in
    with pytest.raises(ConfigError, match="settings differ"):
        Bonsai(BonsaiConfig(**{**kw, "seed": 6}, checkpoint_dir=ckpt, resume=True)).plan(model, space, calib)


def test_same_seed_same_plan_and_config_checks():
    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    kw = dict(sparsity=0.2, prior="magnitude", masks_per_round=8, eval_windows=4, seed=1)
    p1 = Bonsai(BonsaiConfig(**kw)).plan(model, space, _calib())
    p2 = Bonsai(BonsaiConfig(**kw)).plan(model, space, _calib())
    assert p1.layers == p2.layers
    for bad in (
        dict(masks_per_round=7),
        dict(allocation="uniform"),
        dict(units=(Kind.ATTN_GROUP, Kind.LAYER)),
        dict(resume=True),
        dict(penalty="l3"),
        dict(alphas="0.1,x"),
    ):
        with pytest.raises(ConfigError):
            BonsaiConfig(**bad)
    assert BonsaiConfig(alphas="0.1,1").alphas == (0.1, 1.0)  # as the CLI passes them


def test_round_repair_leaves_the_model_untouched_and_resumes_identically(tmp_path):
    """With `round_repair`, later rounds run on a repaired model (so the plan differs from slicing
    only); the caller's model still comes back bit for bit, and a resume replays the repaired rounds."""
    model = tiny_model("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space, calib = UnitSpace.from_model(model), _calib()
    kw = dict(sparsity=0.35, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=2, seed=5)
    sliced = Bonsai(BonsaiConfig(**kw)).plan(model, space, calib)
    repaired = Bonsai(BonsaiConfig(**kw, round_repair="lstsq")).plan(model, space, calib)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert repaired.layers != sliced.layers
    assert all(r["repair_s"] > 0 for r in repaired.info["rounds"])
    assert all(r["repair_s"] == 0 for r in sliced.info["rounds"])

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(_Interrupted):
        KilledAfterFirstRound(BonsaiConfig(**kw, round_repair="lstsq", checkpoint_dir=ckpt)).plan(
            model, space, calib
        )
    resumed = Bonsai(BonsaiConfig(**kw, round_repair="lstsq", checkpoint_dir=ckpt, resume=True)).plan(
        model, space, calib
    )
    assert resumed.layers == repaired.layers
    with pytest.raises(ConfigError, match="round_repair"):
        BonsaiConfig(round_repair="full")
    with pytest.raises(ConfigError, match="round_select"):
        BonsaiConfig(round_select="best")


def test_round_repair_with_obs_records_the_units_the_repair_kept():
    """One round, lstsq round repair: with `round_select=obs` the plan is the units the repair chose
    for the round's counts (what the working model now holds), not the regression's own units."""
    from secateurs.surgery.reconstruct import ReconstructConfig, reconstruct_

    model = tiny_model("llama", layers=3)
    space, calib = UnitSpace.from_model(model), _calib()
    kw = dict(
        sparsity=0.2, prune_frac=0.2, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=2,
        seed=3, round_repair="lstsq",
    )  # fmt: skip
    own = Bonsai(BonsaiConfig(**kw, round_select="plan")).plan(model, space, calib)
    chosen = Bonsai(BonsaiConfig(**kw, round_select="obs")).plan(model, space, calib)
    assert own.info["n_rounds"] == chosen.info["n_rounds"] == 1
    expected = reconstruct_(copy.deepcopy(model), own, calib, ReconstructConfig(reconstruct_select="obs"))[
        "plan"
    ]
    assert [lp.keep_channels for lp in chosen.layers] == [lp.keep_channels for lp in expected.layers]
    assert [lp.keep_groups for lp in chosen.layers] == [lp.keep_groups for lp in expected.layers]
    assert chosen.layers != own.layers  # obs chose other units, so the check above can tell them apart
    assert chosen.removed_params(space) == own.removed_params(space)
