"""`attention_allocation=uniform`: every layer keeps the same number of GQA groups (what vLLM's per-layer
architecture can serve) while MLP channels are still chosen anywhere; for every method family."""

import copy

import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.methods.base import MethodConfig, UnitScores, get_method
from secateurs.scoring.select import select, target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.testing import tiny_model
from secateurs.units.masks import Masks, masked
from secateurs.units.space import UnitSpace

FINE = ("attn_group", "mlp_channel")


def _model(family="qwen3", layers=4, seed=0):
    return tiny_model(family, layers=layers, seed=seed)


def _scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitScores(
        {
            "attn_group": [torch.rand(n, generator=g) for n in space.n_units("attn_group")],
            "mlp_channel": [torch.rand(n, generator=g) for n in space.n_units("mlp_channel")],
        }
    )


def _groups(plan, space):
    return [s["groups"] for s in plan.shapes(space)]


def _channels(plan, space):
    return [s["channels"] for s in plan.shapes(space)]


@pytest.mark.parametrize("sparsity", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_keeps_equal_group_counts_and_hits_the_target(sparsity, seed):
    space = UnitSpace.from_model(_model())
    scores = _scores(space, seed)
    plan = select(scores, space, sparsity, "global", FINE, uniform_attention=True)
    removed = space.total_cost - plan.kept_cost(space)
    target = target_params(space, sparsity)
    assert target <= removed < target + space.layers[0].channel_cost
    assert len(set(_groups(plan, space))) == 1
    free = select(scores, space, sparsity, "global", FINE)
    assert len(set(_channels(plan, space))) > 1 or len(set(_channels(free, space))) == 1


def test_bundles_take_each_layers_weakest_group():
    space = UnitSpace.from_model(_model())
    scores = _scores(space)
    for i, t in enumerate(scores["attn_group"]):  # make group i % n the weakest of layer i
        t[i % t.numel()] = -1.0
    # a target of about one group per layer, which channels cannot beat (they all score 0.5 or more)
    for t in scores["mlp_channel"]:
        t.add_(0.5)
    bundle = sum(lu.group_cost for lu in space.layers)
    plan = select(scores, space, bundle / space.total_cost, "global", FINE, uniform_attention=True)
    for i, lp in enumerate(plan.layers):
        n = space.layers[i].n_groups
        assert i % n not in lp.groups(n) and len(lp.groups(n)) == n - 1


def test_heterogeneous_without_it():
    """The control: the same scores with free attention allocation give different counts per layer."""
    space = UnitSpace.from_model(_model())
    scores = _scores(space, 3)
    for t in scores["attn_group"][:2]:
        t.fill_(-1.0)  # the first two layers' attention looks useless
    assert len(set(_groups(select(scores, space, 0.4, "global", FINE), space))) > 1
    assert len(set(_groups(select(scores, space, 0.4, "global", FINE, uniform_attention=True), space))) == 1


def _check_plan(model, plan, space, sparsity):
    removed = space.total_cost - plan.kept_cost(space)
    assert removed >= target_params(space, sparsity)
    assert len(set(_groups(plan, space))) == 1
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), masked(model, Masks.from_plan(plan, space), space):
        want = model(ids).logits
    pruned = apply_plan_(copy.deepcopy(model), plan)
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids).logits, want, atol=1e-4, rtol=1e-4)


def _calib():
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "method,extra",
    [
        ("wanda-sp", {}),
        ("flap", {}),
        ("bonsai", dict(prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=4)),
        ("policy-gradient", dict(steps=6, samples=2, split_len=16, windows_per_step=2, init="wanda-sp")),
    ],
)
def test_every_method_honours_it(method, extra):
    model = _model("qwen2", seed=1)
    space = UnitSpace.from_model(model)
    cls = get_method(method)
    cfg = cls.config_class(sparsity=0.4, attention_allocation="uniform", **extra)
    plan = cls(cfg).plan(model, space, _calib())
    _check_plan(model, plan, space, 0.4)


def test_config_rules():
    assert MethodConfig(allocation="uniform").uniform_attention
    assert not MethodConfig().uniform_attention
    assert MethodConfig(attention_allocation="uniform").uniform_attention
    with pytest.raises(ConfigError, match="attention_allocation"):
        MethodConfig(attention_allocation="sideways")
    with pytest.raises(ConfigError, match="not supported"):
        MethodConfig(allocation="uniform", attention_allocation="global")
    pg = get_method("policy-gradient").config_class
    with pytest.raises(ConfigError, match="attention allocation global"):
        pg(units=("attn_group", "mlp_channel", "layer"), attention_allocation="uniform")
