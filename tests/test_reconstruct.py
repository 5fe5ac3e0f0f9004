"""Least-squares repair: the solver is exact where it must be, and the repaired model round-trips."""

import copy

import pytest
import torch
import transformers

import secateurs
from helpers_cli import small
from secateurs.surgery.reconstruct import (
    Gram,
    ReconstructConfig,
    augmented,
    embed,
    mean_compensation,
    reconstruct_,
    solve,
    sq_error,
)
from secateurs.testing import FAMILIES, random_plan, tiny_model
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import UnitSpace

ATOL = 1e-4


def _calib(n=32, t=24, seed=1):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _gram(x):
    g = Gram(x.shape[1])
    g.update(x)
    return g.g


def test_every_column_kept_at_lambda_zero_returns_the_original_weights():
    torch.manual_seed(0)
    x, w, b = torch.randn(500, 12), torch.randn(5, 12), torch.randn(5)
    full = augmented(w, b)
    keep = torch.arange(12)
    for intercept in (False, True):
        new = solve(_gram(x), full, keep, 0.0, intercept)
        torch.testing.assert_close(new, full, atol=1e-6, rtol=0)


def test_removed_columns_that_are_combinations_of_kept_ones_are_restored_exactly():
    """If x_removed = x_kept @ M, the kept columns can carry the removed ones' contribution exactly."""
    torch.manual_seed(0)
    kept = torch.randn(400, 8, dtype=torch.float64)
    mix = torch.randn(8, 4, dtype=torch.float64)
    x = torch.cat([kept, kept @ mix], dim=1)  # columns 8..11 are linear in 0..7
    w, b = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    full, keep = augmented(w, b), torch.arange(8)
    new = solve(_gram(x), full, keep, 0.0, intercept=False)
    y = x @ w.T + b
    torch.testing.assert_close(x[:, :8] @ new[:, :-1].T + new[:, -1], y, atol=1e-8, rtol=0)
    assert sq_error(_gram(x), full, embed(new, keep, 12)) < 1e-12 * sq_error(_gram(x), full, 0 * full)
    # plain slicing does not
    assert (x[:, :8] @ w[:, :8].T + b - y).abs().max() > 0.1


@pytest.mark.parametrize("intercept", [False, True])
def test_solve_matches_lstsq_on_the_stored_activations(intercept):
    torch.manual_seed(1)
    x = torch.randn(300, 10, dtype=torch.float64) + 0.5
    w, b = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 9])
    y = x @ w.T + b
    new = solve(_gram(x), augmented(w, b), keep, 0.0, intercept)
    if intercept:
        design = torch.cat([x[:, keep], torch.ones(300, 1, dtype=torch.float64)], dim=1)
        ref = torch.linalg.lstsq(design, y).solution.T
        torch.testing.assert_close(new, ref, atol=1e-8, rtol=0)
    else:
        ref = torch.linalg.lstsq(x[:, keep], y - b).solution.T
        torch.testing.assert_close(new[:, :-1], ref, atol=1e-8, rtol=0)
        torch.testing.assert_close(new[:, -1], b)


def test_ridge_toward_the_kept_weights_spans_refit_to_no_refit():
    torch.manual_seed(3)
    x = torch.randn(200, 10, dtype=torch.float64)
    full, keep = augmented(torch.randn(4, 10, dtype=torch.float64), None), torch.tensor([1, 3, 4, 8])
    refit = solve(_gram(x), full, keep, 0.0, False, toward_kept=True)
    torch.testing.assert_close(refit, solve(_gram(x), full, keep, 0.0, False), atol=1e-10, rtol=0)
    strong = solve(_gram(x), full, keep, 1e9, False, toward_kept=True)
    torch.testing.assert_close(strong[:, :-1], full[:, keep], atol=1e-5, rtol=0)
    assert (solve(_gram(x), full, keep, 1e9, False)[:, :-1].abs().max()) < 1e-4  # plain ridge: to zero


def test_held_out_windows_choose_no_refit_when_the_refit_does_not_carry_over():
    """Fit rows where a removed column copies a kept one, held-out rows where it is its negative: the
    refit moves the removed column's weight onto the kept one and is worse than plain slicing on the
    held-out rows, so the prior toward the kept weights keeps them; plain ridge cannot."""
    from secateurs.surgery.reconstruct import fit_module

    torch.manual_seed(4)
    a, b = torch.randn(300, 3, dtype=torch.float64), torch.randn(100, 3, dtype=torch.float64)
    fit_x = torch.cat([a, a[:, :1]], dim=1)  # column 3 == column 0 on the fit rows
    held_x = torch.cat([b, -b[:, :1]], dim=1)  # and its negative on the held-out ones
    fit, held = Gram(4), Gram(4)
    fit.update(fit_x)
    held.update(held_x)
    full, keep = augmented(torch.randn(2, 4, dtype=torch.float64), None), torch.tensor([0, 1, 2])
    kept = fit_module(fit, held, full, keep, ReconstructConfig(reconstruct_toward="kept"))
    assert not kept.record()["refit"] and kept.new.equal(torch.cat([full[:, keep], full[:, -1:]], dim=1))
    zero = fit_module(fit, held, full, keep, ReconstructConfig(reconstruct_toward="zero"))
    assert zero.record()["refit"] and zero.heldout_after > kept.heldout_after


def test_mean_compensation_keeps_the_output_mean():
    torch.manual_seed(2)
    x = torch.randn(200, 6, dtype=torch.float64) * 2 + 1
    w = torch.randn(3, 6, dtype=torch.float64)
    keep = torch.tensor([1, 4])
    new = mean_compensation(_gram(x), augmented(w, None), keep)
    torch.testing.assert_close((x[:, keep] @ new[:, :-1].T + new[:, -1]).mean(0), (x @ w.T).mean(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_repaired_model_saves_and_loads_with_both_loaders(family, tmp_path):
    model = tiny_model(family)
    plan = random_plan(UnitSpace.from_model(model), seed=0, corrections=False)
    record = reconstruct_(model, plan, _calib(), ReconstructConfig(reconstruct="lstsq"))
    fitted = [r for r in record["layers"] if "attn" in r or "mlp" in r]
    assert fitted
    for r in fitted:
        for part in ("attn", "mlp"):
            if part in r:
                assert r[part]["error_after"] <= r[part]["error_before"] + 1e-9
    ids = _calib(2, 12, seed=5)
    with torch.inference_mode():
        expected = model(ids).logits
    secateurs.save(model, tmp_path / "r", plan)
    loaded, _ = secateurs.load(tmp_path / "r")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r", trust_remote_code=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(stock(ids).logits, expected, atol=ATOL, rtol=0)


def test_none_is_plain_surgery_and_a_kept_layer_is_untouched():
    model = tiny_model("llama")
    space = UnitSpace.from_model(model)
    plan = Plan([LayerPlan()] * 3 + [LayerPlan(keep_groups=[1], keep_channels=list(range(0, 48, 2)))])
    plain = secateurs.apply_plan_(copy.deepcopy(model), plan)
    none = copy.deepcopy(model)
    reconstruct_(none, plan, _calib(), ReconstructConfig(reconstruct="none"))
    repaired = copy.deepcopy(model)
    record = reconstruct_(repaired, plan, _calib(), ReconstructConfig(reconstruct="lstsq"))
    a = space.adapter
    for name in ("none", "repaired"):
        m = none if name == "none" else repaired
        for i in range(3):  # layers the plan keeps whole: the same weights
            for mine, ref in zip(
                a.decoder_layers(m)[i].parameters(), a.decoder_layers(plain)[i].parameters(), strict=True
            ):
                assert torch.equal(mine, ref)
    assert set(record["layers"][3]) == {"layer", "attn", "mlp"}
    o_plain = a.o_proj(a.decoder_layers(plain)[3]).weight
    o_fit = a.o_proj(a.decoder_layers(repaired)[3]).weight
    assert o_plain.shape == o_fit.shape and not torch.equal(o_plain, o_fit)


@pytest.mark.parametrize("toward", ["zero", "kept"])
@pytest.mark.parametrize("seed", [0, 2])
def test_lstsq_repairs_a_pruned_model_better_than_slicing(toward, seed):
    """On unseen windows, the repaired model's logits are closer to the dense model's than the plainly
    sliced model's are. (Logits, not loss: a random model's loss is noise around ~100 nats, and its
    distance to the dense loss moved either way under the repair; the repair's aim is the dense function.)"""
    model = tiny_model("llama", layers=4, seed=seed)
    plan = random_plan(UnitSpace.from_model(model), seed=1 + seed, corrections=False, drop_layer=False)
    calib, test = _calib(64, 24, seed=1), _calib(16, 24, seed=9)
    with torch.inference_mode():
        dense = model(test).logits

    def distance(m):
        with torch.inference_mode():
            return float((m(test).logits - dense).pow(2).mean())

    plain = secateurs.apply_plan_(copy.deepcopy(model), plan)
    repaired = copy.deepcopy(model)
    reconstruct_(repaired, plan, calib, ReconstructConfig(reconstruct="lstsq", reconstruct_toward=toward))
    assert distance(repaired) < 0.99 * distance(plain)


SMALL = small(nsamples=8)


@pytest.mark.parametrize("mode", ["none", "bias", "lstsq", "lstsq-obs"])
def test_prune_repairs_and_apply_reproduces_it(tiny_dir, tmp_path, mode):
    """Every mode meets the target (the bias mode's biases are budgeted before selection), plan.json
    records the repair (with the units `--reconstruct-select obs` chose), and `apply` of that plan.json
    rebuilds the very same model."""
    import json

    from secateurs.cli import main

    model, text = tiny_dir
    out = tmp_path / "out"
    data = ["--calib", str(text), "--eval", str(text), *SMALL]
    mode, _, select = mode.partition("-")
    args = ["prune", str(model), "--method", "wanda-sp", "--sparsity", "0.4", "--reconstruct", mode]
    args += ["--reconstruct-select", select] if select else ["--reconstruct-select", "plan"]
    assert main([*args, "--out", str(out), *data]) == 0
    record = json.loads((out / "plan.json").read_text())
    p = record["parameters"]
    assert p["dense_prunable"] - p["pruned_prunable"] >= 0.4 * p["dense_prunable"]
    assert record["reconstruct"]["mode"] == mode and record["reconstruct"]["settings"]["reconstruct"] == mode
    assert record["reconstruct"]["settings"]["reconstruct_select"] == (select or "plan")
    if mode != "none":
        assert record["reconstruct"]["calib"]["windows"] and len(record["reconstruct"]["layers"]) == 4
    again = tmp_path / "again"
    # with obs, plan.json holds the units it chose: applying them as they are rebuilds the same model
    keep_as_planned = ["--reconstruct-select", "plan"] if select else []
    assert (
        main(["apply", str(model), "--plan", str(out / "plan.json"), "--out", str(again), *keep_as_planned])
        == 0
    )
    a, _ = secateurs.load(out)
    b, _ = secateurs.load(again)
    ids = _calib(2, 12, seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=0)


def test_bias_budget_only_for_blocks_the_units_can_prune_partly():
    """Whole layers leave no partly pruned block to compensate: block-influence (units: layer) must not
    be asked to remove more for biases that will never be added (it then dropped a whole extra layer)."""
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import paying_for_repair
    from secateurs.surgery.reconstruct import bias_budget

    space = UnitSpace.from_model(tiny_model("llama"))  # no output biases
    assert bias_budget(space, ("layer",)) == 0
    assert bias_budget(space, ("mlp_channel",)) == space.n_layers * space.hidden_size
    assert bias_budget(space, ("attn_group", "mlp_channel")) == 2 * space.n_layers * space.hidden_size
    bias = ReconstructConfig(reconstruct="bias")
    assert paying_for_repair(MethodConfig(sparsity=0.3, units=("layer",)), space, bias).sparsity == 0.3
    assert paying_for_repair(MethodConfig(sparsity=0.3), space, bias).sparsity > 0.3
    assert paying_for_repair(MethodConfig(sparsity=0.3), space, ReconstructConfig()).sparsity == 0.3


def test_repair_windows_default_to_their_own_larger_shape_within_the_context():
    """The repair's default windows (REPAIR_WINDOWS x REPAIR_SEQ_LEN) never shrink below the method's,
    stay within the model's context, and an explicit length beyond it is refused."""
    from secateurs.errors import ConfigError
    from secateurs.pipeline import DataConfig, repair_shape
    from secateurs.surgery.reconstruct import REPAIR_SEQ_LEN, REPAIR_WINDOWS

    default = ReconstructConfig()
    assert repair_shape(DataConfig(), default, 2048) == (REPAIR_WINDOWS, REPAIR_SEQ_LEN)
    assert repair_shape(DataConfig(nsamples=500, seq_len=512), default, 2048) == (500, 512)
    assert repair_shape(DataConfig(seq_len=16), default, 64) == (REPAIR_WINDOWS, 64)
    asked = ReconstructConfig(reconstruct_nsamples=8, reconstruct_seq_len=32)
    assert repair_shape(DataConfig(), asked, 64) == (8, 32)
    with pytest.raises(ConfigError, match="--reconstruct-seq-len 128 is longer"):
        repair_shape(DataConfig(), ReconstructConfig(reconstruct_seq_len=128), 64)


def test_default_repair_windows_shrink_to_a_short_text_but_asked_ones_do_not(tiny_dir, caplog, monkeypatch):
    """... with one warning, though the search (its sample repair) and the repair both cut them."""
    from helpers_tokenizer import tiny_tokenizer
    from secateurs import pipeline
    from secateurs.errors import DataError
    from secateurs.pipeline import DataConfig, repair_windows

    monkeypatch.setattr(pipeline, "_SHORT_TEXT_WARNED", set())
    tok = tiny_tokenizer()
    _, path = tiny_dir
    data = DataConfig(calib=str(path), eval=str(path), nsamples=4, seq_len=16)
    windows = repair_windows(tok, data, ReconstructConfig(), context=64)
    again = repair_windows(tok, data, ReconstructConfig(), context=64)
    assert windows.shape[1] == 64 and 2 <= windows.shape[0] < 128
    assert torch.equal(windows, again)
    assert caplog.text.count("not the repair's default 128") == 1
    with pytest.raises(DataError, match="need"):
        repair_windows(tok, data, ReconstructConfig(reconstruct_nsamples=128), context=64)


@pytest.mark.parametrize(
    ("method", "mode", "given"),
    [("policy-gradient", "lstsq", True), ("policy-gradient", "none", True), ("wanda-sp", "lstsq", False)],
)
def test_a_prune_run_gives_the_method_its_repair_windows(tiny_dir, monkeypatch, method, mode, given):
    """`run_prune` hands a method that scores sub-models as least-squares repaired the windows a repair
    with these settings fits on, whatever the run's mode (`compare --reconstruct none,lstsq` shares
    its search); a method that does not use them gets none."""
    from helpers_tokenizer import tiny_tokenizer
    from secateurs import pipeline
    from secateurs.methods.base import get_method

    seen = []
    real = pipeline.make_plan
    monkeypatch.setattr(
        pipeline,
        "make_plan",
        lambda m, name, cfg, calib, fit=None: seen.append(fit) or real(m, name, cfg, calib, fit),
    )
    path, text = tiny_dir
    model, tok = transformers.AutoModelForCausalLM.from_pretrained(path), tiny_tokenizer()
    data = pipeline.DataConfig(calib=str(text), eval=str(text), nsamples=4, seq_len=16, eval_seq_len=64)
    repair = ReconstructConfig(reconstruct=mode, reconstruct_nsamples=6, reconstruct_seq_len=32)
    settings = {"steps": 2, "samples": 2} if method == "policy-gradient" else {}
    config = get_method(method).config_class(sparsity=0.3, **settings)
    pipeline.run_prune(model, tok, method, config, data, "tiny", evaluate=False, repair=repair)
    if given:
        assert torch.equal(seen[0], pipeline.repair_windows(tok, data, repair, 128))
    else:
        assert seen[0] is None


def test_apply_of_an_old_plan_keeps_the_windows_it_was_repaired_with():
    """plan.json files written before the repair had its own default windows recorded 0 ("the
    method's"): `apply` must refit on those, not on today's default."""
    from secateurs.cli import _recorded_repair

    old = {
        "reconstruct": {"settings": {"reconstruct": "lstsq", "reconstruct_nsamples": 0}},
        "report": {"data": {"nsamples": 32, "seq_len": 128}},
    }
    got = _recorded_repair(old)
    assert got["reconstruct_nsamples"] == 32 and got["reconstruct_seq_len"] == 128
    new = {"reconstruct": {"settings": {"reconstruct": "lstsq"}, "calib": {"nsamples": 128, "seq_len": 256}}}
    got = _recorded_repair(new)
    assert got["reconstruct_nsamples"] == 128 and got["reconstruct_seq_len"] == 256
    # written before the repair could reselect: the plan's own units; a recorded choice stays
    assert got["reconstruct_select"] == "plan"
    new["reconstruct"]["settings"]["reconstruct_select"] = "obs"
    assert _recorded_repair(new)["reconstruct_select"] == "obs"
