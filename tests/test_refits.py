"""Sub-models scored as the repair leaves them: OBS-ordered units, refit deltas in the masked forward."""

import copy

import pytest
import torch

from secateurs.scoring.refits import RepairBank, even_counts
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.reconstruct import augmented, embed, sq_error
from secateurs.testing import tiny_model
from secateurs.units.masks import Masks, masked
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import UnitSpace

CALIB = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))


def _bank(model, space):
    counts = [even_counts(lu.n_channels, 4) for lu in space.layers]
    return RepairBank.from_model(model, space, CALIB, mlp_counts=counts)


def _rows_of(masks: Masks, space: UnitSpace, row: int) -> Plan:
    """Row `row` of `masks` as a plan."""
    layers = []
    for i in range(space.n_layers):
        g = torch.nonzero(masks.groups[i][row]).flatten().tolist()
        c = torch.nonzero(masks.channels[i][row]).flatten().tolist()
        layers.append(LayerPlan(keep_groups=g, keep_channels=c, drop_attn=not g, drop_mlp=not c))
    return Plan(layers)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_refit_row_is_the_model_with_refit_weights_sliced(family):
    """Each row of a batch keeps its own counts; masked with the bank's refits it must give the logits
    of the model whose o_proj/down_proj carry `W + delta` for that row's counts, physically sliced."""
    model = tiny_model(family, layers=3)
    space = UnitSpace.from_model(model)
    bank = _bank(model, space)
    masks = Masks.ones(space, 3)
    gen = torch.Generator().manual_seed(3)
    for i, lu in enumerate(space.layers):
        for r in range(3):
            masks.groups[i][r, torch.randperm(lu.n_groups, generator=gen)[: r % lu.n_groups]] = 0
            masks.channels[i][r, torch.randperm(lu.n_channels, generator=gen)[: 5 * r + 3]] = 0
    bank.apply_(masks)
    ids = CALIB[:1].expand(3, -1)
    with torch.inference_mode(), masked(model, masks, space):
        scored = model(ids).logits
    a = space.adapter
    for r in range(3):
        want_model = copy.deepcopy(model)
        with torch.no_grad():
            for i, layer in enumerate(a.decoder_layers(want_model)):
                for unit_mask, b, module in (
                    (masks.groups[i], bank.attn[i], a.o_proj(layer)),
                    (masks.channels[i], bank.mlp[i], a.down_proj(layer)),
                ):
                    refit = b.deltas.get(int((unit_mask[r] != 0).sum()))
                    if refit is not None:
                        module.weight[:, refit.cols] += refit.delta
        apply_plan_(want_model, _rows_of(masks, space, r))
        with torch.inference_mode():
            want = want_model(ids[:1]).logits
        torch.testing.assert_close(scored[r : r + 1], want, rtol=1e-4, atol=1e-4)
    assert any(b.deltas for b in bank.mlp), "no refit was exercised"


def test_kept_sets_are_nested_snapped_and_refits_lower_the_module_error():
    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    bank = _bank(model, space)
    mb = bank.mlp[0]
    n = space.layers[0].n_channels
    sets = mb.masks_for(torch.arange(n + 1))
    assert torch.all(sets[1:] >= sets[:-1]) and torch.equal(sets.sum(1), torch.arange(n + 1).float())
    grid = mb.counts.tolist()
    assert grid == even_counts(n, 4) and mb.snap(torch.tensor([grid[1] + 1, 0, n])).tolist() == [
        grid[1],
        0,
        n,
    ]
    # the refit at each grid count leaves less error than the plain slice of the same columns
    layers = space.adapter.decoder_layers(model)
    down = space.adapter.down_proj(layers[0])
    gram = _gram_of(model, down, 0)
    full = augmented(down.weight, down.bias)
    for count, r in mb.deltas.items():
        cols = torch.nonzero(mb.masks_for(torch.tensor([count]))[0]).flatten()
        assert torch.equal(r.cols, cols) and r.delta.shape == (full.shape[0], count)
        plain = embed(torch.cat([full[:, cols], full[:, -1:]], 1), cols, n)
        refit = plain.clone()
        refit[:, cols] += r.delta.double()
        assert sq_error(gram, full, refit) < sq_error(gram, full, plain)


def _gram_of(model, module, layer: int) -> torch.Tensor:
    """`module`'s input Gram matrix over CALIB from a plain dense forward: the reference for the bank's
    layer-by-layer pass."""
    from secateurs.surgery.reconstruct import Gram

    gram = Gram(module.in_features)
    handle = module.register_forward_pre_hook(lambda _m, args: gram.update(args[0]))
    with torch.inference_mode():
        model(CALIB)
    handle.remove()
    return gram.g


def _available(monkeypatch, nbytes: int) -> None:
    import psutil

    import secateurs.scoring.refits as refits

    vm = psutil.virtual_memory()._replace(available=nbytes)
    monkeypatch.setattr(refits.psutil, "virtual_memory", lambda: vm)


def test_a_bank_that_would_not_fit_in_memory_is_refused_before_any_work(monkeypatch):
    import secateurs.scoring.refits as refits
    from secateurs.errors import ConfigError

    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    _available(monkeypatch, 1000)
    monkeypatch.setattr(refits, "capture_inputs", lambda *a: pytest.fail("the dense pass ran"))
    with pytest.raises(ConfigError, match="--sample-repair bias or none"):
        _bank(model, space)


def test_a_bank_too_large_for_memory_thins_its_grids_and_still_scores(monkeypatch, caplog):
    """A large model gets a coarser bank, not an error: fewer counts per module, within the budget, and
    a row's counts snap to the nearest one left."""
    import secateurs.scoring.refits as refits

    model = tiny_model("llama", layers=2)
    space = UnitSpace.from_model(model)
    full = _bank(model, space)
    size = sum(r.nbytes for b in full.attn + full.mlp if b for r in b.deltas.values())
    _available(monkeypatch, int((size * 0.6 + _largest_grams(model, space)) / refits.MAX_MEMORY_SHARE))
    with caplog.at_level("WARNING", logger="secateurs.scoring.refits"):
        thin = _bank(model, space)
    assert "thinned" in caplog.text
    thin_size = sum(r.nbytes for b in thin.attn + thin.mlp if b for r in b.deltas.values())
    assert 0 < thin_size <= size * 0.6
    for a, b in zip(full.mlp + full.attn, thin.mlp + thin.attn, strict=True):
        assert set(b.deltas) <= set(a.deltas) and len(b.deltas) > 0
        assert torch.equal(a.rank, b.rank)  # the same OBS order, fewer refits
    masks = thin.apply_(Masks.ones(space, 1))
    assert masks.refits is not None


def _largest_grams(model, space) -> int:
    a = space.adapter
    return max(
        8 * ((a.o_proj(layer).in_features + 1) ** 2 + (a.down_proj(layer).in_features + 1) ** 2)
        for layer in a.decoder_layers(model)
    )
