"""Selection from scores: exact budget, lowest scores first, uniform shapes, impossible targets."""

import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.methods.base import MethodConfig, UnitScores, get_method
from secateurs.scoring.select import check_reachable, select, target_params
from secateurs.testing import tiny_model
from secateurs.units.space import UnitSpace


def _space(layers=4, family="llama"):
    return UnitSpace.from_model(tiny_model(family, layers=layers))


def _random_scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UnitScores(
        {
            "attn_group": [torch.rand(n, generator=g) for n in space.n_units("attn_group")],
            "mlp_channel": [torch.rand(n, generator=g) for n in space.n_units("mlp_channel")],
            "layer": [torch.rand(1, generator=g) for _ in range(space.n_layers)],
            "attn_block": [torch.rand(1, generator=g) for _ in range(space.n_layers)],
            "mlp_block": [torch.rand(1, generator=g) for _ in range(space.n_layers)],
        }
    )


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.8])
def test_hits_target_within_one_channel(allocation, sparsity):
    space = _space()
    plan = select(_random_scores(space), space, sparsity, allocation, ("attn_group", "mlp_channel"))
    removed = space.total_cost - plan.kept_cost(space)
    target = target_params(space, sparsity)
    assert target <= removed < target + space.layers[0].channel_cost


def test_global_drops_lowest_scores_first():
    space = _space()
    scores = _random_scores(space)
    scores["attn_group"][2][1] = -1.0  # clearly the least important unit
    plan = select(scores, space, 0.05, "global", ("attn_group", "mlp_channel"))
    assert 1 not in plan.layers[2].groups(2)
    kept = plan.layers[0].channels(48)
    dropped = sorted(set(range(48)) - set(kept))
    if dropped:
        assert scores["mlp_channel"][0][dropped].max() <= scores["mlp_channel"][0][kept].min()


@pytest.mark.parametrize("sparsity", [0.3, 0.31, 0.37, 0.5, 0.61])
def test_uniform_keeps_same_counts_per_layer(sparsity):
    space = _space(layers=6)
    scores = _random_scores(space)
    scores["mlp_channel"][0] -= 10  # layer 0's channels score lowest: a global top-up would take them all
    plan = select(scores, space, sparsity, "uniform", ("attn_group", "mlp_channel"))
    shapes = plan.shapes(space)
    assert len({s["groups"] for s in shapes}) == 1
    ch = [s["channels"] for s in shapes]
    assert max(ch) - min(ch) <= 1


def test_groups_only_overshoot_less_than_a_group():
    space = _space()
    plan = select(_random_scores(space), space, 0.2, "global", ("attn_group",))
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.2) <= removed < target_params(space, 0.2) + space.layers[0].group_cost


def test_layers_then_channels():
    space = _space(layers=6)
    plan = select(_random_scores(space), space, 0.3, "global", ("layer", "mlp_channel"))
    assert sum(lp.drops_layer for lp in plan.layers) == 1  # one layer is ~16.7%, two would overshoot
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.3) <= removed < target_params(space, 0.3) + space.layers[0].channel_cost


def test_impossible_target_is_a_clear_error():
    space = _space()
    with pytest.raises(ConfigError, match="removable"):
        select(_random_scores(space), space, 0.9, "global", ("attn_group",))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval_rejected(value):
    with pytest.raises(ConfigError, match="sparsity"):
        MethodConfig(sparsity=value)


def test_magnitude_scores_by_hand():
    """A unit whose weights are all zero has magnitude 0 and goes first."""
    model = tiny_model("llama")
    space = UnitSpace.from_model(model)
    a = space.adapter
    with torch.no_grad():
        layer = a.decoder_layers(model)[1]
        (gate, up), down = a.mlp_in(layer), a.down_proj(layer)
        gate.weight[7] = 0
        up.weight[7] = 0
        down.weight[:, 7] = 0
        gate.weight[8] = 2.0
        up.weight[8] = 2.0
        down.weight[:, 8] = 2.0
    method = get_method("magnitude")(MethodConfig(sparsity=0.01, units=("mlp_channel",)))
    s = method.scores(model, space, None)
    assert s["mlp_channel"][1][7] == 0 and s["mlp_channel"][1][8] == pytest.approx(2.0)
    plan = method.plan(model, space, None)
    assert 7 not in plan.layers[1].channels(48)
    assert plan.method == "magnitude" and plan.settings["sparsity"] == 0.01


def test_global_keeps_the_best_attention_group_when_attention_scores_lowest():
    space = _space()
    scores = _random_scores(space)
    for t in scores["attn_group"]:
        t -= 10.0  # every group ranks below every channel: a plain global ranking takes them all
    scores["attn_group"][2][1] += 5.0  # the best of them
    plan = select(scores, space, 0.5, "global", ("attn_group", "mlp_channel")).canonical(space)
    kept = [(i, g) for i, lp in enumerate(plan.layers) for g in lp.groups(space.layers[i].n_groups)]
    assert kept == [(2, 1)]
    removed = space.total_cost - plan.kept_cost(space)
    assert target_params(space, 0.5) <= removed < target_params(space, 0.5) + space.layers[0].channel_cost


@pytest.mark.parametrize(
    "units", [("layer",), ("attn_block", "mlp_block"), ("attn_group", "mlp_channel", "layer")]
)
def test_reachability_check_accepts_every_unit_kind(units):
    space = _space()
    check_reachable(space, 0.2, "global", units)  # the check the CLI runs before every method


def test_reachability_check_refuses_what_no_plan_can_do():
    with pytest.raises(ConfigError, match="remove every unit"):
        check_reachable(_space(), 0.9, "global", ("attn_group",))


def test_library_plan_checks_reachability_like_the_pipeline():
    """`secateurs.plan` and `secateurs prune` refuse an unreachable target the same way, before a method
    that learns first (policy gradient) can fail with a message about itself."""
    import secateurs
    from secateurs.errors import ConfigError
    from secateurs.testing import tiny_model

    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="cannot remove 95.0% of prunable parameters with units attn_group"):
        secateurs.plan(model, "policy-gradient", calib=calib, sparsity=0.95, units=("attn_group",), steps=2)
