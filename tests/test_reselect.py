"""Reselection by the repair's error: OBS finds the units the refit can stand in for, keeps the plan's
counts, and the model it builds is the one its plan describes."""

import copy

import pytest
import torch

import secateurs
from secateurs.errors import ConfigError, PlanError
from secateurs.surgery.reconstruct import (
    Gram,
    ReconstructConfig,
    augmented,
    embed,
    reconstruct_,
    solve,
    sq_error,
)
from secateurs.surgery.reselect import keep_by_obs
from secateurs.testing import random_plan, tiny_model
from secateurs.units.space import UnitSpace


def _gram(x):
    g = Gram(x.shape[1])
    g.update(x)
    return g.g


def _refit_error(gram, w, cols):
    keep = torch.tensor(cols)
    full = augmented(w, None)
    return sq_error(gram, full, embed(solve(gram, full, keep, 0.0, False), keep, w.shape[1]))


def test_a_duplicated_channel_goes_first_though_its_weights_are_the_largest():
    """Channel 1 nearly repeats channel 0: removing it costs little once channel 0's weights absorb it,
    which a per-channel score (weight x activation norm) cannot see: it would remove channel 2 or 3."""
    torch.manual_seed(0)
    x = torch.randn(400, 4, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.05 * torch.randn(400, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    w[:, :2] *= 3
    gram = _gram(x)
    keep = keep_by_obs(gram, w, 3)
    assert len(keep) == 3 and len({0, 1} & set(keep)) == 1 and {2, 3} <= set(keep)
    assert _refit_error(gram, w, keep) < 0.1 * min(_refit_error(gram, w, [0, 1, c]) for c in (2, 3))


def test_blocks_are_kept_or_removed_whole():
    torch.manual_seed(1)
    x = torch.randn(300, 6, dtype=torch.float64)
    x[:, 4:] = x[:, :2] @ torch.randn(2, 2, dtype=torch.float64)  # block 2 is a mix of block 0
    w = torch.randn(3, 6, dtype=torch.float64)
    assert keep_by_obs(_gram(x), w, 2, block=2) == [0, 1]
    with pytest.raises(PlanError, match="blocks of 4"):
        keep_by_obs(_gram(x), w, 1, block=4)
    with pytest.raises(PlanError, match="cannot keep 4 of 3"):
        keep_by_obs(_gram(x), w, 4, block=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_beats_the_average_subset_of_the_same_size(seed):
    """On correlated inputs the greedy's refit error is below the median of every subset of its size."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 9, generator=g, dtype=torch.float64
    )
    x += 0.3 * torch.randn(300, 9, generator=g, dtype=torch.float64)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    gram = _gram(x)
    errors = sorted(_refit_error(gram, w, list(c)) for c in itertools.combinations(range(9), 4))
    assert _refit_error(gram, w, keep_by_obs(gram, w, 4)) < errors[len(errors) // 2]


def _calib(n=32, t=24, seed=1):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reselected_model_is_the_plan_it_reports(family, tmp_path):
    """The applied plan keeps the method's counts per layer, changes some identities, and rebuilding it
    with the method's own identities (select plan) gives the same model; it saves and loads."""
    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    plan = random_plan(space, seed=0, corrections=False)
    obs = copy.deepcopy(model)
    record = reconstruct_(obs, plan, _calib(), ReconstructConfig(reconstruct_select="obs"))
    applied = record["plan"]
    assert plan.shapes(space) == applied.shapes(space)
    changed = [
        (a.keep_groups, a.keep_channels) != (b.keep_groups, b.keep_channels)
        for a, b in zip(plan.layers, applied.layers, strict=True)
        if not (a.drop_attn and a.drop_mlp)
    ]
    assert any(changed)
    again = copy.deepcopy(model)
    reconstruct_(again, applied, _calib(), ReconstructConfig())
    ids = _calib(2, 12, seed=5)
    with torch.inference_mode():
        expected = obs(ids).logits
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=0)
    secateurs.save(obs, tmp_path / "r", applied)
    loaded, _ = secateurs.load(tmp_path / "r")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=0)


def test_obs_is_the_lstsq_refit_s_choice_only():
    """OBS's error is the least-squares refit's: FLAP's mean compensation and plain surgery keep the
    plan's units (so a method's own `bias` repair is what it published)."""
    model = tiny_model("llama")
    space = UnitSpace.from_model(model)
    plan = random_plan(space, seed=0, corrections=False).canonical(space)
    for mode in ("none", "bias"):
        cfg = ReconstructConfig(reconstruct=mode, reconstruct_select="obs")
        assert cfg.select == "plan"
        assert reconstruct_(copy.deepcopy(model), plan, _calib(), cfg)["plan"].layers == plan.layers
    with pytest.raises(ConfigError, match="select must be one of"):
        ReconstructConfig(reconstruct_select="best")
