"""Policy-gradient masks: estimator unbiasedness by enumeration, the budget projection, learning a
synthetic problem, exact resume, NaN handling, and a tiny model end to end."""

import copy
import itertools
import math

import pytest
import torch

from secateurs.checkpoint import load_state
from secateurs.errors import ConfigError, LossError
from secateurs.methods.base import get_method
from secateurs.methods.policy_gradient import PolicyGradient, PolicyGradientConfig, UnitVector
from secateurs.methods.policy_gradient.estimator import (
    CostLayout,
    leave_one_out,
    moving_baseline,
    project,
    score_gradient,
    zscore_sigmoid,
)
from secateurs.scoring.select import target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.testing import tiny_model
from secateurs.units.masks import Masks, masked
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import COARSE_KINDS, FINE_KINDS, Kind, UnitSpace


# -- estimator -----------------------------------------------------------------------------------------
def _toy(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(2**n, generator=g, dtype=torch.float64) * 3  # an arbitrary L(m)
    s = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)  # [2^n, n]
    return table, s, masks


def _probs(masks, s):
    return (masks * s + (1 - masks) * (1 - s)).prod(dim=1)


def _exact_grad(table, s, masks):
    s = s.clone().requires_grad_(True)
    (table * _probs(masks, s)).sum().backward()  # E[L](s), differentiated by autograd
    return s.grad


def _expected_estimate(table, s, masks, k, estimator, baseline):
    """E over K independent samples of the estimator, by enumerating all 2^(n K) sample tuples."""
    p = _probs(masks, s)
    total = torch.zeros_like(s)
    for idx in itertools.product(range(len(masks)), repeat=k):
        idx = list(idx)
        losses = table[idx]
        b = leave_one_out(losses) if baseline == "loo" else baseline
        total += p[idx].prod() * score_gradient(losses, masks[idx], s, b, estimator)
    return total


@pytest.mark.parametrize("k,baseline", [(1, 0.7), (2, 1.3), (2, "loo"), (3, "loo")])
def test_exact_estimator_is_unbiased(k, baseline):
    table, s, masks = _toy(n=3 if k == 3 else 4)
    grad = _exact_grad(table, s, masks)
    est = _expected_estimate(table, s, masks, k, "exact", baseline)
    torch.testing.assert_close(est, grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3])
def test_reference_estimator_is_exact_times_sqrt_variance_times_k_over_k_minus_1(k):
    table, s, masks = _toy(n=3)
    grad = _exact_grad(table, s, masks)
    est = _expected_estimate(table, s, masks, k, "reference", 0.5)
    torch.testing.assert_close(est, grad * (s * (1 - s)).sqrt() * k / (k - 1), rtol=1e-10, atol=1e-10)


def test_estimator_values_by_hand():
    s = torch.tensor([0.5, 0.2], dtype=torch.float64)
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = torch.tensor([2.0, 4.0])
    # exact: mean_k (L_k - 3)(m_k - s) / (s (1 - s))
    g = score_gradient(losses, masks, s, 3.0, "exact")
    expect = torch.tensor(
        [(-1 * 0.5 + 1 * -0.5) / 2 / 0.25, (-1 * -0.2 + 1 * 0.8) / 2 / 0.16], dtype=torch.float64
    )
    torch.testing.assert_close(g, expect)
    r = score_gradient(losses, masks, s, 3.0, "reference")  # sum / sqrt(s(1-s)) / (K - 1)
    torch.testing.assert_close(r, expect * 2 * (s * (1 - s)).sqrt())


def test_moving_baseline_starts_at_first_loss():
    b = moving_baseline(None, 3.0, 5)
    assert b == 3.0
    assert moving_baseline(b, 8.0, 5) == pytest.approx(0.8 * 3 + 8 / 5)


# -- projection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_projection_hits_budget_in_box_and_is_kkt(seed):
    g = torch.Generator().manual_seed(seed)
    n = 50
    v = torch.randn(n, generator=g, dtype=torch.float64) * 0.8 + 0.5  # many outside [0, 1]: clipping needed
    cost = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 0.1
    budget = float(torch.rand((), generator=g)) * float(cost.sum())
    layout = CostLayout.ungated(cost)
    s = project(v, layout, budget)
    assert float(layout.expected(s)) == pytest.approx(budget, rel=1e-9, abs=1e-9)
    assert s.min() >= 0 and s.max() <= 1
    inner = (s > 1e-12) & (s < 1 - 1e-12)
    lam = (v - s)[inner] / cost[inner]  # s = v - lambda cost on the interior
    assert inner.sum() > 0 and (lam.max() - lam.min()) < 1e-9
    assert ((v - lam[0] * cost)[s >= 1 - 1e-12] >= 1 - 1e-9).all()
    assert ((v - lam[0] * cost)[s <= 1e-12] <= 1e-9).all()


def test_projection_is_the_euclidean_projection():
    """No other feasible point is closer to v (checked against random feasible points)."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(8, generator=g, dtype=torch.float64) + 0.5
    cost = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    layout = CostLayout.ungated(cost)
    budget = 0.4 * float(cost.sum())
    s = project(v, layout, budget)
    best = float((s - v).norm())
    for _ in range(300):
        w = project(torch.rand(8, generator=g, dtype=torch.float64) * 2 - 0.5, layout, budget)
        assert float((w - v).norm()) >= best - 1e-9


def test_equal_costs_reduce_to_a_shift():
    v = torch.tensor([0.3, 0.5, 0.6, 0.7], dtype=torch.float64)
    s = project(v, CostLayout.ungated(torch.full((4,), 2.0)), budget=2 * 2.0)
    torch.testing.assert_close(s, v - (v.mean() - 0.5))


def test_projection_rejects_unreachable_budget():
    with pytest.raises(ValueError, match="outside"):
        project(torch.zeros(3), CostLayout.ungated(torch.ones(3)), budget=4.0)


def _gated_layout(seed=0):
    """3 layers; fine units in attention (2) and MLP (5) blocks; gates: 3 layers + 1 attention block."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.tensor([b for layer in range(3) for b in [2 * layer] * 2 + [2 * layer + 1] * 5])
    cost = torch.where(blocks % 2 == 0, 7.0, 1.0).to(torch.float64)
    gate_blocks = torch.zeros(4, 6, dtype=torch.bool)
    for layer in range(3):
        gate_blocks[layer, 2 * layer : 2 * layer + 2] = True
    gate_blocks[3, 2] = True
    fixed = torch.rand(6, generator=g, dtype=torch.float64)
    return CostLayout(cost, blocks, fixed, gate_blocks), g


def test_gated_expected_cost_counts_each_parameter_once():
    layout, _ = _gated_layout()
    assert layout.full() == pytest.approx(float(layout.fine_cost.sum() + layout.block_fixed.sum()))
    s = torch.ones(layout.n, dtype=torch.float64)
    s[layout.n_fine + 1] = 0.0  # layer 1 gate off: its attention and MLP both go
    expect = layout.full() - (2 * 7 + 5 + layout.block_fixed[2] + layout.block_fixed[3])
    assert float(layout.expected(s)) == pytest.approx(float(expect))


def test_gated_marginal_is_the_gradient():
    layout, g = _gated_layout()
    s = torch.rand(layout.n, generator=g, dtype=torch.float64).requires_grad_(True)
    layout.expected(s).backward()
    torch.testing.assert_close(layout.marginal(s.detach()), s.grad)


@pytest.mark.parametrize("seed", range(4))
def test_gated_projection_hits_the_budget(seed):
    layout, g = _gated_layout(seed)
    v = torch.rand(layout.n, generator=g, dtype=torch.float64) * 1.4 - 0.2
    budget = (0.3 + 0.4 * float(torch.rand((), generator=g))) * layout.full()
    s = project(v, layout, budget, lo=0.01, hi=0.99)
    assert float(layout.expected(s)) == pytest.approx(budget, rel=1e-9)
    assert s.min() >= 0.01 and s.max() <= 0.99


def test_projection_at_the_ends_of_the_reachable_range():
    """A budget at the most (least) the box can keep is met by the clip itself, without a root search."""
    layout = CostLayout.ungated(torch.tensor([3.0, 1.0, 2.0]))
    v = torch.tensor([0.5, 1.7, -0.3], dtype=torch.float64)
    torch.testing.assert_close(project(v, layout, budget=6.0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(project(v, layout, budget=0.0), torch.zeros(3, dtype=torch.float64))


def test_projection_hits_the_budget_to_rounding():
    g = torch.Generator().manual_seed(7)
    cost = torch.randint(1, 300_000, (5_000,), generator=g).to(torch.float64)  # SmolLM2-like unit costs
    v = torch.rand(5_000, generator=g, dtype=torch.float64) * 1.2 - 0.1
    layout = CostLayout.ungated(cost)
    budget = 0.5 * float(cost.sum())
    assert float(layout.expected(project(v, layout, budget, lo=1e-3, hi=1 - 1e-3))) == pytest.approx(
        budget, rel=1e-12
    )


def test_zscore_sigmoid_orders_and_centres():
    p = zscore_sigmoid(torch.tensor([1.0, 2.0, 3.0]))
    assert p[0] < p[1] < p[2] and float(p[1]) == pytest.approx(0.5)
    assert torch.equal(zscore_sigmoid(torch.ones(3)), torch.full((3,), 0.5, dtype=torch.float64))


# -- the method on synthetic losses -----------------------------------------------------------------------
class FakeEvaluator:
    """loss = sum over important units of w_u * (1 - m_u); records every call."""

    def __init__(self, space, important, fail_at=None, nan_at=None):
        self.space, self.important = space, important  # {kind: [bool tensor per layer]}
        self.calls, self.fail_at, self.nan_at = [], fail_at, nan_at
        self.channel_weight = 0.3

    def __call__(self, model, windows, space):  # the evaluator factory: one evaluator per step's windows
        assert space is self.space
        self.windows = windows
        return self

    def losses(self, masks: Masks) -> torch.Tensor:
        self.calls.append(masks.batch)
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            raise LossError("non-finite loss from 1 of 2 sub-models")
        out = torch.zeros(masks.batch)
        for i in range(self.space.n_layers):
            g = masks.groups[i] * masks.attn_block[:, i : i + 1]
            c = masks.channels[i] * masks.mlp_block[:, i : i + 1]
            out += ((1 - g) * self.important["attn_group"][i]).sum(1) * 1.0
            out += ((1 - c) * self.important["mlp_channel"][i]).sum(1) * self.channel_weight
        if self.nan_at is not None and len(self.calls) > self.nan_at:
            out[0] = float("nan")
        return out


def _synthetic(layers=2):
    space = UnitSpace.from_model(tiny_model("llama", layers=layers))
    important = {
        "attn_group": [torch.tensor([1.0, 0.0]) for _ in range(layers)],  # group 1 is useless
        "mlp_channel": [(torch.arange(48) % 2 == 0).float() for _ in range(layers)],  # odd channels useless
    }
    return space, important


CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _cfg(**kw):
    """Settings for the synthetic evaluator, which reads the sampled masks themselves (no model to repair)."""
    base = dict(
        sparsity=0.4, steps=60, samples=4, lr=0.05, init="uniform", split_len=0, log_every=5, channel_bundle=1,
        sample_repair="none",
    )  # fmt: skip
    return PolicyGradientConfig(**{**base, **kw})


@pytest.mark.parametrize("budget,baseline", [("global", "leave-one-out"), ("per-kind", "moving")])
def test_learns_to_drop_useless_units(budget, baseline):
    space, important = _synthetic()
    fake = FakeEvaluator(space, important)
    cfg = _cfg(budget=budget, baseline=baseline, steps=300, samples=8, lr=0.1)
    method = PolicyGradient(cfg, evaluator_factory=fake)
    plan = method.plan(None, space, CALIB)
    assert fake.calls == [8] * 300  # one batched call of K masks per step
    for i, lp in enumerate(plan.canonical(space).layers):
        assert 0 in lp.groups(2), f"layer {i} lost its important group"
        assert set(range(0, 48, 2)) <= set(lp.channels(48)), f"layer {i} lost important channels"
    probs = plan.info["probabilities"]
    for i in range(space.n_layers):
        ch = torch.tensor(probs["mlp_channel"][i])
        assert ch[1::2].max() < ch[0::2].min()
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.4) <= removed < target_params(space, 0.4) + space.layers[0].channel_cost
    curve = plan.info["training"]["curve"]
    assert curve["loss"][-1] < curve["loss"][0]


def test_layer_gates_keep_expected_cost_on_budget():
    space, important = _synthetic(layers=4)
    important["attn_group"][2].zero_()  # layer 2 is useless as a whole
    important["mlp_channel"][2].zero_()
    cfg = _cfg(units=("attn_group", "mlp_channel", "layer"), sparsity=0.3, steps=80, lr=0.1, gate_init=0.9)
    method = PolicyGradient(cfg, evaluator_factory=FakeEvaluator(space, important))
    vec = UnitVector(space, cfg.units)
    state = method.learn(None, space, CALIB)
    assert float(vec.layout.expected(state.s)) == pytest.approx(0.7 * space.total_cost, rel=1e-9)
    layer_p = [float(t) for t in vec.per_layer(state.s, "layer")]
    assert layer_p[2] == min(layer_p)
    plan = method.finish(state, space)
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.3) <= removed < target_params(space, 0.3) + space.layers[0].channel_cost
    masks = vec.masks(torch.ones(1, vec.n))  # all kept: everything at 1
    assert all(bool((t == 1).all()) for t in masks.groups + masks.channels)


def test_layer_gate_samples_multiply_blocks():
    space, _ = _synthetic(layers=3)
    vec = UnitVector(space, ("attn_group", "mlp_channel", "layer", "attn_block"))
    samples = torch.ones(2, vec.n)
    samples[0, vec.slices["layer"][1]] = 0
    samples[1, vec.slices["attn_block"][2]] = 0
    m = vec.masks(samples)
    assert m.attn_block.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert m.mlp_block.tolist() == [[1, 0, 1], [1, 1, 1]]


def _plan_of(vec, space, hard):
    """The plan that keeps what the 0/1 vector `hard` keeps (the sub-model its sample evaluates)."""
    m = vec.masks(hard.reshape(1, -1))
    layers = []
    for i in range(space.n_layers):
        layers.append(
            LayerPlan(
                keep_groups=torch.nonzero(m.groups[i][0]).flatten().tolist(),
                keep_channels=torch.nonzero(m.channels[i][0]).flatten().tolist(),
                drop_attn=not bool(m.attn_block[0, i]),
                drop_mlp=not bool(m.mlp_block[0, i]),
            )
        )
    return Plan(layers)


@pytest.mark.parametrize("family", ["llama", "llama-mha-bias", "olmo2", "granite", "phi3"])
@pytest.mark.parametrize(
    "units,bundle",
    [
        ((*FINE_KINDS, *COARSE_KINDS), 1),
        ((*FINE_KINDS, Kind.LAYER, Kind.MLP_BLOCK), 8),
        ((Kind.MLP_CHANNEL, Kind.MLP_BLOCK, Kind.LAYER), 8),  # attention not learned: a fixed part
        (FINE_KINDS, 1),
    ],
)
def test_expected_cost_of_a_hard_vector_is_the_plans_kept_cost(family, units, bundle):
    """One cost model: the layout's E[kept] at a 0/1 vector is `Plan.kept_cost` of the same choice."""
    space = UnitSpace.from_model(tiny_model(family, layers=4))
    cfg = PolicyGradientConfig(units=units, init="uniform", channel_bundle=bundle)
    state = PolicyGradient(cfg).learn(None, space, CALIB, max_steps=0)
    vec = UnitVector(space, cfg.units, state.ties)
    assert vec.layout.full() == space.total_cost
    has_bias = any(lu.attn_fixed or lu.mlp_fixed for lu in space.layers)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        hard = (torch.rand(vec.n, generator=g) < 0.6).to(torch.float64)
        for kind in vec.gates:  # a plan must keep some attention: layer 0's gates and first group stay
            hard[vec.slices[kind][0]] = 1.0
        if Kind.ATTN_GROUP in vec.fine:
            hard[vec.slices[Kind.ATTN_GROUP][0].start] = 1.0
        if has_bias:  # keep a unit in every block: see the empty-block case below
            for kind in vec.fine:
                for sl in vec.slices[kind]:
                    hard[sl.start + int(torch.randint(sl.stop - sl.start, (), generator=g))] = 1.0
        assert float(vec.layout.expected(hard)) == _plan_of(vec, space, hard).kept_cost(space)
    # Documented in CostLayout: a block whose gates are on and whose units are all off still counts its
    # output bias in the layout, while the plan (and the masked sub-model) drop the block with its bias.
    hard = torch.ones(vec.n, dtype=torch.float64)
    hard[vec.indices(Kind.MLP_CHANNEL, [1])] = 0.0
    overcount = float(vec.layout.expected(hard)) - _plan_of(vec, space, hard).kept_cost(space)
    assert overcount == space.layers[1].mlp_fixed


def test_gate_coordinates_keep_their_order():
    """Checkpoints and the seeded samples depend on the flat vector's layout."""
    space, _ = _synthetic(layers=2)
    vec = UnitVector(space, tuple(reversed((*FINE_KINDS, *COARSE_KINDS))))
    assert vec.fine == [Kind.ATTN_GROUP, Kind.MLP_CHANNEL]
    assert vec.gates == [Kind.LAYER, Kind.ATTN_BLOCK, Kind.MLP_BLOCK]
    assert vec.slices[Kind.LAYER][0].start == vec.n_fine


def _first_half_important(space, important):
    """Bundles of consecutive channels can only learn a pattern that is constant within bundles."""
    important["mlp_channel"] = [(torch.arange(48) < 24).float() for _ in range(space.n_layers)]
    return important


def test_bundles_learn_which_bundles_are_useless():
    space, important = _synthetic()
    important = _first_half_important(space, important)
    fake = FakeEvaluator(space, important)
    # uniform init: bundles are consecutive channels, 0-7 | 8-15 | ... ; the first three matter
    cfg = _cfg(steps=200, samples=8, lr=0.1, channel_bundle=8)
    plan = PolicyGradient(cfg, evaluator_factory=fake).plan(None, space, CALIB)
    for i, lp in enumerate(plan.canonical(space).layers):
        assert set(range(24)) <= set(lp.channels(48)), f"layer {i} lost important channels"
        ch = torch.tensor(plan.info["probabilities"]["mlp_channel"][i])
        assert ch[24:].max() < ch[:24].min()
        assert len(set(ch[:8].round(decimals=4).tolist())) == 1  # one probability per bundle
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.4) <= removed < target_params(space, 0.4) + space.layers[0].channel_cost


def test_bundles_follow_the_init_order_and_expand_to_channels():
    model = tiny_model("llama", layers=3, seed=2)
    space = UnitSpace.from_model(model)
    cfg = PolicyGradientConfig(sparsity=0.4, init="magnitude", channel_bundle=8)
    state = PolicyGradient(cfg).learn(model, space, CALIB, max_steps=0)
    vec = UnitVector(space, cfg.units, state.ties)
    n_ch = space.n_units("mlp_channel")
    assert vec.n == sum(space.n_units("attn_group")) + sum(math.ceil(n / 8) for n in n_ch)
    assert float(vec.layout.expected(state.s)) == pytest.approx(0.6 * space.total_cost, rel=1e-9)
    metric = get_method("magnitude")().scores(model, space, CALIB)["mlp_channel"]
    for i, tie in enumerate(vec.ties["mlp_channel"]):
        by_score = tie[torch.argsort(metric[i].double(), stable=True)]
        assert torch.equal(by_score, torch.sort(by_score).values)  # consecutive in score order
        assert torch.equal(torch.bincount(tie), torch.full((n_ch[i] // 8,), 8))
    samples = torch.ones(1, vec.n)
    samples[0, vec.slices["mlp_channel"][1].start] = 0  # layer 1's lowest-score bundle
    m = vec.masks(samples)
    assert torch.equal(m.channels[1][0] == 0, vec.ties["mlp_channel"][1] == 0)
    assert int((m.channels[0] == 0).sum()) == 0 and int((m.channels[2] == 0).sum()) == 0


@pytest.mark.parametrize("bundle", [1, 8])
def test_resume_reproduces_the_uninterrupted_plan(tmp_path, bundle):
    space, important = _synthetic()
    if bundle > 1:
        important = _first_half_important(space, important)
    full = PolicyGradient(
        _cfg(channel_bundle=bundle), evaluator_factory=FakeEvaluator(space, important)
    ).plan(None, space, CALIB)
    cfg = _cfg(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4, channel_bundle=bundle)
    first = PolicyGradient(cfg, evaluator_factory=FakeEvaluator(space, important))
    state = first.learn(None, space, CALIB, max_steps=23)  # interrupted after 23 of 60 steps
    assert state.step == 23 and load_state(cfg.checkpoint_dir)["state"]["step"] == 23
    with pytest.raises(ConfigError, match="already holds"):
        PolicyGradient(cfg, evaluator_factory=FakeEvaluator(space, important)).learn(None, space, CALIB)
    resumed_cfg = _cfg(
        checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4, resume=True, channel_bundle=bundle
    )
    resumed = PolicyGradient(resumed_cfg, evaluator_factory=FakeEvaluator(space, important)).plan(
        None, space, CALIB
    )
    assert resumed.to_dict()["layers"] == full.to_dict()["layers"]
    assert resumed.info["probabilities"] == full.info["probabilities"]
    assert resumed.info["training"] == full.info["training"]
    with pytest.raises(ConfigError, match="lr"):
        PolicyGradient(
            _cfg(checkpoint_dir=str(tmp_path / "ck"), resume=True, lr=0.2, channel_bundle=bundle)
        ).learn(None, space, CALIB)


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, how):
    space, important = _synthetic()
    ref = PolicyGradient(_cfg(), evaluator_factory=FakeEvaluator(space, important)).learn(
        None, space, CALIB, max_steps=5
    )
    cfg = _cfg(checkpoint_dir=str(tmp_path), checkpoint_every=5)
    fake = FakeEvaluator(space, important, **({"fail_at": 7} if how == "raise" else {"nan_at": 7}))
    with pytest.raises(LossError, match=r"step 7.*checkpoint \(step 5\)"):
        PolicyGradient(cfg, evaluator_factory=fake).plan(None, space, CALIB)
    saved = load_state(tmp_path)["state"]
    assert saved["step"] == 5 and torch.equal(saved["s"], ref.s)


def test_config_validation():
    with pytest.raises(ConfigError):
        PolicyGradientConfig(estimator="bogus")
    with pytest.raises(ConfigError):
        PolicyGradientConfig(units=("attn_group", "mlp_channel", "layer"), budget="per-kind")
    with pytest.raises(ConfigError):
        PolicyGradientConfig(baseline="leave-one-out", samples=1)
    with pytest.raises(ConfigError):
        PolicyGradientConfig(resume=True)
    assert get_method("policy-gradient") is PolicyGradient


# -- a real (tiny) model -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(budget="per-kind", estimator="exact", baseline="moving"),
        dict(allocation="uniform"),
        dict(channel_bundle=1, init="wanda-sp"),
        dict(units=("attn_group", "mlp_channel", "layer", "mlp_block"), init="uniform"),
    ],
)
def test_tiny_model_meets_target_and_plan_applies(kw):
    model = tiny_model("qwen2", layers=4, seed=1)
    space = UnitSpace.from_model(model)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = PolicyGradientConfig(
        sparsity=0.5,
        steps=8,
        samples=2,
        split_len=16,
        windows_per_step=2,
        init=kw.pop("init", "magnitude"),
        **kw,
    )
    plan = get_method("policy-gradient")(cfg).plan(model, space, calib)
    removed = space.total_cost - plan.kept_cost(space)
    target = target_params(space, 0.5)
    assert target <= removed < target + max(lu.group_cost for lu in space.layers)
    assert plan.info["training"]["tokens"] == 8 * 2 * 2 * 16
    if cfg.allocation == "global" and cfg.budget == "global" and "layer" not in cfg.units:
        kept = plan.info["kept_fraction_per_layer"]["mlp"]
        assert len(set(kept)) > 1  # heterogeneous across layers
    if cfg.allocation == "uniform":
        shapes = plan.shapes(space)
        assert len({s["groups"] for s in shapes}) == 1
    ids = calib[:2, :12]
    with torch.inference_mode(), masked(model, Masks.from_plan(plan, space), space):
        want = model(ids).logits
    pruned = apply_plan_(copy.deepcopy(model), plan)
    with torch.inference_mode():
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert math.isfinite(plan.info["expected_kept_fraction"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_metric_init_follows_the_metric_and_hits_the_budget(scope):
    model = tiny_model("llama", layers=3, seed=2)
    space = UnitSpace.from_model(model)
    cfg = PolicyGradientConfig(sparsity=0.4, init="magnitude", init_scope=scope, channel_bundle=1)
    state = PolicyGradient(cfg).learn(model, space, CALIB, max_steps=0)
    vec = UnitVector(space, cfg.units)
    assert float(vec.layout.expected(state.s)) == pytest.approx(0.6 * space.total_cost, rel=1e-9)
    metric = get_method("magnitude")().scores(model, space, CALIB)["mlp_channel"]
    probs = vec.per_layer(state.s, "mlp_channel")
    if scope == "global":
        metric, probs = [torch.cat(metric)], [torch.cat(probs)]
    for m, p in zip(metric, probs, strict=True):
        inner = (p > cfg.eps) & (p < 1 - cfg.eps)
        assert torch.equal(torch.argsort(m[inner]), torch.argsort(p[inner]))


# -- mean compensation in the masked forward ----------------------------------------------------------
def test_mean_compensation_equals_the_bias_repair_where_the_stream_is_unchanged():
    """In layer 0 the attention's input is the embedding whatever is pruned, so the dense means are the
    pruned stream's: masking a GQA group with compensation must give the logits of the model sliced and
    repaired by `--reconstruct bias`. Without compensation it must not."""
    from secateurs.scoring.compensation import MeanCompensation
    from secateurs.surgery.reconstruct import ReconstructConfig, reconstruct_

    model = tiny_model("llama", layers=1)
    space = UnitSpace.from_model(model)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    comp = MeanCompensation.from_model(model, space, calib)
    plan = Plan([LayerPlan(keep_groups=[1])])
    masks = Masks.from_plan(plan, space)
    with torch.inference_mode(), masked(model, masks, space):
        plain = model(calib).logits
    with torch.inference_mode(), masked(model, comp.add_to_(Masks.from_plan(plan, space)), space):
        compensated = model(calib).logits
    repaired = copy.deepcopy(model)
    reconstruct_(repaired, plan, calib, ReconstructConfig(reconstruct="bias"))
    with torch.inference_mode():
        want = repaired(calib).logits
    torch.testing.assert_close(compensated, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, rtol=1e-4, atol=1e-4)


def test_compensated_search_runs_and_meets_the_budget():
    model = tiny_model("llama", layers=3)
    space = UnitSpace.from_model(model)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(sparsity=0.4, steps=6, samples=4, channel_bundle=4, seed=2)
    plain = PolicyGradient(PolicyGradientConfig(**kw, sample_repair="none")).plan(model, space, calib)
    comp = PolicyGradient(PolicyGradientConfig(**kw, sample_repair="bias")).plan(model, space, calib)
    target = target_params(space, 0.4)
    for p in (plain, comp):
        assert space.total_cost - p.kept_cost(space) >= target
    assert comp.info["training"]["curve"]["loss"] != plain.info["training"]["curve"]["loss"]


def test_the_refit_bank_is_fitted_on_the_repair_windows_where_given(monkeypatch):
    """`repair_windows` (what `pipeline.search` passes: the run's repair calibration) are the windows the
    bank's refits are fitted on; without them, the search's own. Why: refits fitted on the search's
    few tokens overfit them (see `Method.fit_windows`)."""
    import secateurs.methods.policy_gradient.method as pg

    seen = []
    real = pg.RepairBank.from_model
    monkeypatch.setattr(
        pg.RepairBank, "from_model", lambda m, sp, w, *a: seen.append(w.shape) or real(m, sp, w, *a)
    )
    model = tiny_model("llama", layers=3)
    space = UnitSpace.from_model(model)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    repair = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(2))
    cfg = PolicyGradientConfig(sparsity=0.4, steps=2, samples=2, channel_bundle=4, seed=2)
    PolicyGradient(cfg, repair_windows=repair).plan(model, space, calib)
    PolicyGradient(cfg).plan(model, space, calib)
    assert seen == [repair.shape, calib.shape]


def test_refit_search_scores_repaired_samples_and_meets_the_budget():
    """`sample_repair="lstsq"`: each sample is scored as the OBS repair of its counts, so the losses
    differ from the plain search's on the same draws; the plan still meets the target; an unknown
    repair is refused."""
    model = tiny_model("llama", layers=3)
    space = UnitSpace.from_model(model)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(sparsity=0.4, steps=6, samples=4, channel_bundle=4, seed=2)
    plain = PolicyGradient(PolicyGradientConfig(**kw, sample_repair="none")).plan(model, space, calib)
    refit = PolicyGradient(PolicyGradientConfig(**kw, sample_repair="lstsq")).plan(model, space, calib)
    target = target_params(space, 0.4)
    for p in (plain, refit):
        assert space.total_cost - p.kept_cost(space) >= target
    curves = [p.info["training"]["curve"]["loss"] for p in (plain, refit)]
    assert curves[1][0] < curves[0][0]  # the same first draws, repaired
    with pytest.raises(ConfigError, match="sample_repair must be one of"):
        PolicyGradientConfig(**kw, sample_repair="obs")


@pytest.mark.parametrize(
    ("sample_repair", "repair", "warned"),
    [
        ("lstsq", {}, False),  # the defaults match
        ("lstsq", {"reconstruct": "none"}, True),
        ("lstsq", {"reconstruct_select": "plan"}, True),
        ("bias", {"reconstruct": "bias"}, False),
        ("bias", {}, True),
        ("none", {"reconstruct": "none"}, False),
    ],
)
def test_a_search_scored_for_another_repair_than_the_runs_is_warned_about(
    sample_repair, repair, warned, caplog
):
    from secateurs.pipeline import warn_if_scored_for_another_repair
    from secateurs.surgery.reconstruct import ReconstructConfig

    with caplog.at_level("WARNING", logger="secateurs.pipeline"):
        warn_if_scored_for_another_repair(
            PolicyGradientConfig(sample_repair=sample_repair), ReconstructConfig(**repair)
        )
    assert ("does not ship" in caplog.text) == warned
    if warned:
        assert "--reconstruct" in caplog.text and len(caplog.records) == 1
