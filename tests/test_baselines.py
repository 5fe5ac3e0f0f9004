"""Metric baselines: statistics and scores by hand, block influence, exact budgets."""

import math

import pytest
import torch
from torch import nn

from secateurs.methods.base import REGISTRY, MethodConfig, MetricMethod, UnitScores, get_method, register
from secateurs.methods.flap import flap_scores_from_stats, fluctuation
from secateurs.methods.taylor import Taylor
from secateurs.methods.wanda_sp import WandaSp, wanda_column_scores
from secateurs.scoring.select import target_params
from secateurs.scoring.stats import Moments, collect_stats, input_moments, one_minus_cos
from secateurs.testing import tiny_model
from secateurs.units.space import UnitSpace

BASELINES = ("magnitude", "wanda-sp", "flap", "block-influence", "random", "taylor")


def _calib(n=6, t=16, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


# -- statistics ---------------------------------------------------------------------------------------
def test_input_moments_by_hand_on_a_toy_linear():
    lin = nn.Linear(2, 3)
    with torch.no_grad(), input_moments({"lin": lin}) as stats:
        lin(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # two batches, one of them [B, T, d]
        lin(torch.tensor([[[5.0, 6.0]]]))
    m = stats["lin"]
    assert m.count == 3
    torch.testing.assert_close(m.mean, torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(m.var, torch.tensor([4.0, 4.0], dtype=torch.float64))  # (4+0+4)/2
    torch.testing.assert_close(m.l2, torch.tensor([35.0, 56.0], dtype=torch.float64).sqrt())
    torch.testing.assert_close(m.sum, torch.tensor([9.0, 12.0], dtype=torch.float64))
    assert not lin._forward_pre_hooks  # hooks are gone after the block


def test_moments_merge_equals_one_pass():
    x = torch.randn(1000, 5) * 3 + 100  # large mean: naive float32 sums would lose the variance
    m = Moments()
    for chunk in x.split(37):
        m.update(chunk)
    x64 = x.double()
    torch.testing.assert_close(m.mean, x64.mean(0))
    torch.testing.assert_close(m.var, x64.var(0))
    torch.testing.assert_close(m.l2, x64.norm(dim=0))


def test_one_minus_cos():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    torch.testing.assert_close(one_minus_cos(a, b), torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))


def test_collect_stats_matches_captured_inputs():
    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    calib = _calib()
    stats = collect_stats(model, calib, space, batch_rows=4, influence=True)
    down = space.adapter.down_proj(space.adapter.decoder_layers(model)[1])
    seen = []
    h = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, 48)))
    with torch.inference_mode():
        model(calib)
    h.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(stats.mlp[1].mean, x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mlp[1].var, x.var(0), rtol=1e-5, atol=1e-6)
    assert stats.mlp[1].count == calib.numel()
    infl = stats.influence
    assert infl.layer.shape == (2,) and (infl.layer > 0).all() and (infl.mlp_block > 0).all()


# -- scores by hand ------------------------------------------------------------------------------------
def test_wanda_column_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    l2 = torch.tensor([2.0, 10.0], dtype=torch.float64)
    # column 0: mean(|1|, |3|) * 2 = 4; column 1: mean(2, 0) * 10 = 10
    torch.testing.assert_close(wanda_column_scores(w, l2), torch.tensor([4.0, 10.0], dtype=torch.float64))


def test_wanda_sp_group_score_is_mean_over_its_query_dims():
    model = tiny_model("llama", layers=1)
    space = UnitSpace.from_model(model)
    calib = _calib()
    scores = WandaSp().scores(model, space, calib)
    stats = collect_stats(model, calib, space)
    o = space.adapter.o_proj(space.adapter.decoder_layers(model)[0])
    col = o.weight.detach().double().abs().mean(0) * stats.attn[0].l2
    # 4 query heads of dim 8, 2 per KV group: group 0 = columns 0..15
    expected = torch.stack([col[:16].mean(), col[16:].mean()]).float()
    torch.testing.assert_close(scores["attn_group"][0], expected)


def test_flap_fluctuation_and_standardisation_by_hand():
    w = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    var = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    # ||W[:, j]||^2 = 2, 4, 9 -> fluctuation 2, 2, 18
    torch.testing.assert_close(fluctuation(w, var), torch.tensor([2.0, 2.0, 18.0], dtype=torch.float64))


def test_flap_standardises_per_module_not_per_group_triplet():
    model = tiny_model("qwen3", layers=2)
    space = UnitSpace.from_model(model)
    stats = collect_stats(model, _calib(), space)
    scores = flap_scores_from_stats(model, space, stats)
    for ch in scores["mlp_channel"]:  # z-scored across the module's 48 columns
        assert abs(float(ch.mean())) < 1e-5 and abs(float(ch.std()) - 1) < 1e-4
    # group scores are means of column z-scores: they average to 0 but are not themselves z-scored
    for g in scores["attn_group"]:
        assert abs(float(g.mean())) < 1e-5 and float(g.std()) < 0.99


# -- block influence -----------------------------------------------------------------------------------
def test_block_influence_drops_the_identity_layer():
    model = tiny_model("llama", layers=4)
    space = UnitSpace.from_model(model)
    layer = space.adapter.decoder_layers(model)[2]
    with torch.no_grad():  # no biases in this family: the layer is now the identity
        space.adapter.o_proj(layer).weight.zero_()
        space.adapter.down_proj(layer).weight.zero_()
    method = get_method("block-influence")(get_method("block-influence").config_class(sparsity=0.2))
    calib = _calib()
    scores = method.scores(model, space, calib)
    layer_scores = torch.cat(scores["layer"])
    assert int(layer_scores.argmin()) == 2 and float(layer_scores[2]) < 1e-6
    plan = method.plan(model, space, calib)
    assert [lp.drops_layer for lp in plan.layers] == [False, False, True, False]


def test_block_influence_fine_units_fall_back_to_magnitude():
    model = tiny_model("llama", layers=4)
    space = UnitSpace.from_model(model)
    cls = get_method("block-influence")
    method = cls(cls.config_class(sparsity=0.3, units=("layer", "mlp_channel")))
    plan = method.plan(model, space, _calib())
    assert sum(lp.drops_layer for lp in plan.layers) == 1
    removed = space.total_cost - plan.kept_cost(space)
    target = target_params(space, 0.3)
    assert target <= removed < target + space.layers[0].channel_cost


# -- every method: exact budgets -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "family", ["llama", "qwen3", "llama-mha-bias", "gemma2", "gemma3", "olmo2", "granite", "phi3"]
)
@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_every_method_reaches_the_target(name, family, allocation):
    model = tiny_model(family, layers=4)
    space = UnitSpace.from_model(model)
    cls = get_method(name)
    cfg = cls.config_class(sparsity=0.3, allocation=allocation, batch_rows=4)
    plan = cls(cfg).plan(model, space, _calib())
    removed = space.total_cost - plan.kept_cost(space)
    target = target_params(space, 0.3)
    fine = [k for k in cfg.units if k in ("attn_group", "mlp_channel")]
    cheapest = min(
        min(space.unit_costs(k)) for k in (fine or cfg.units)
    )  # the finest unit used absorbs the rounding
    assert target <= removed < target + cheapest, (removed, target)
    assert plan.method == name


@pytest.mark.parametrize("name", ["wanda-sp", "flap", "random", "taylor"])
def test_fine_scores_have_the_unit_shapes(name):
    model = tiny_model("qwen3", layers=2)
    space = UnitSpace.from_model(model)
    scores = get_method(name)().scores(model, space, _calib())
    for kind in ("attn_group", "mlp_channel", "attn_block", "mlp_block", "layer"):
        assert [t.numel() for t in scores[kind]] == space.n_units(kind)
        assert all(torch.isfinite(t).all() for t in scores[kind])


def test_methods_leave_the_model_unchanged():
    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = UnitSpace.from_model(model)
    for name in BASELINES:
        get_method(name)(get_method(name).config_class(sparsity=0.2)).plan(model, space, _calib())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_random_is_seeded():
    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    cls = get_method("random")
    a = cls(cls.config_class(sparsity=0.3, seed=1)).plan(model, space, _calib())
    b = cls(cls.config_class(sparsity=0.3, seed=1)).plan(model, space, _calib())
    c = cls(cls.config_class(sparsity=0.3, seed=2)).plan(model, space, _calib())
    assert a.to_dict()["layers"] == b.to_dict()["layers"] != c.to_dict()["layers"]


# -- taylor: the backprop reference ------------------------------------------------------------------
def test_taylor_restores_requires_grad_and_grads():
    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    params = list(model.parameters())
    for i, p in enumerate(params):  # an unusual starting state that must survive
        p.requires_grad_(i % 2 == 0)
    marker = torch.full_like(params[0], 7.0)
    params[0].grad = marker
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    scores = Taylor().scores(model, space, _calib())
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    assert Taylor.uses_backprop and "BACKPROP" in Taylor.description
    assert all((t > 0).all() for t in scores["mlp_channel"])


def test_taylor_channel_score_by_hand():
    """One channel's score equals mean |w * g| over its gate row, up row and down column."""
    model = tiny_model("llama", layers=1)
    space = UnitSpace.from_model(model)
    calib = _calib(n=3)
    scores = Taylor(MethodConfig(batch_rows=2)).scores(model, space, calib)  # 2 batches, accumulated
    layer = space.adapter.decoder_layers(model)[0]
    (gate, up), down = space.adapter.mlp_in(layer), space.adapter.down_proj(layer)
    from secateurs.eval.loss import token_nll

    loss = token_nll(model, calib).sum() / (calib.numel() - calib.shape[0])
    gg, gu, gd = torch.autograd.grad(loss, [gate.weight, up.weight, down.weight])
    j = 5
    expected = torch.cat(
        [(gate.weight[j] * gg[j]).abs(), (up.weight[j] * gu[j]).abs(), (down.weight[:, j] * gd[:, j]).abs()]
    )
    assert math.isclose(float(scores["mlp_channel"][0][j]), float(expected.detach().mean()), rel_tol=1e-4)


# -- registry ------------------------------------------------------------------------------------------
def test_registering_a_new_method_makes_it_findable():
    @register
    class Dummy(MetricMethod):
        name = "dummy-test-method"
        description = "every unit scores 1"

        def scores(self, model, space, calib):
            return UnitScores(
                {
                    "attn_group": [torch.ones(n) for n in space.n_units("attn_group")],
                    "mlp_channel": [torch.ones(n) for n in space.n_units("mlp_channel")],
                }
            )

    try:
        assert get_method("dummy-test-method") is Dummy
        model = tiny_model("llama", layers=2)
        space = UnitSpace.from_model(model)
        plan = Dummy(MethodConfig(sparsity=0.25)).plan(model, space, _calib())
        assert plan.removed_fraction(space) >= 0.25
    finally:
        REGISTRY.pop("dummy-test-method")


def test_all_baselines_registered():
    assert all(get_method(n).name == n for n in BASELINES)
    assert get_method("wanda-sp").config_class().allocation == "uniform"
    assert get_method("flap").config_class().allocation == "global"
    assert get_method("block-influence").config_class().units == ("layer",)


def test_flap_meets_the_target():
    from secateurs.methods.flap import Flap

    model = tiny_model("llama", layers=3)
    space = UnitSpace.from_model(model)
    for sparsity in (0.2, 0.5):
        plan = Flap(MethodConfig(sparsity=sparsity)).plan(model, space, _calib())
        assert all(lp.attn_bias is None and lp.mlp_bias is None for lp in plan.layers)  # the repair's job
        assert 0 <= plan.removed_params(space) - target_params(space, sparsity) < space.layers[0].group_cost
