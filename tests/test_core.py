"""The central invariants: masked == pruned == saved-and-loaded, for every family."""

import copy
import json

import pytest
import torch
import transformers

from secateurs.errors import OutputExistsError, PlanError
from secateurs.models.adapters import LayerGeometry, UnsupportedModelError, adapter_for
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.saving import load_pruned, save_pruned
from secateurs.testing import FAMILIES, random_plan, tiny_config, tiny_model, uniform_plan
from secateurs.units.masks import Masks, masked
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import UnitSpace, count_parameters

ATOL = 1e-4


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=g)


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def _masked_logits(model, masks, ids):
    with torch.inference_mode(), masked(model, masks):
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_mask_changes_nothing(family):
    model, ids = tiny_model(family), _ids()
    space = UnitSpace.from_model(model)
    torch.testing.assert_close(
        _masked_logits(model, Masks.ones(space), ids), _logits(model, ids), rtol=0, atol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_a_unit_changes_logits(family):
    """Guards the guards: if hooks silently did nothing, every equality test below would pass."""
    model, ids = tiny_model(family), _ids()
    space = UnitSpace.from_model(model)
    m = Masks.ones(space)
    m.groups[0][0, 0] = 0
    assert (_masked_logits(model, m, ids) - _logits(model, ids)).abs().max() > 1e-3
    m = Masks.ones(space)
    m.channels[1][0, :5] = 0
    assert (_masked_logits(model, m, ids) - _logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_pruned_equals_loaded(family, seed, tmp_path):
    model, ids = tiny_model(family, seed=seed), _ids(seed=seed)
    space = UnitSpace.from_model(model)
    plan = random_plan(space, seed=seed)
    expected = _masked_logits(model, Masks.from_plan(plan, space), ids)

    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert len(adapter_for(pruned).decoder_layers(pruned)) == 3  # layer 3 removed
    torch.testing.assert_close(_logits(pruned, ids), expected, atol=ATOL, rtol=0)
    assert UnitSpace.from_model(pruned).total_cost == plan.kept_cost(space)

    save_pruned(pruned, tmp_path / "out", plan)
    loaded, _ = load_pruned(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=ATOL, rtol=0)

    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(stock).__module__ != type(loaded).__module__  # really the saved file, not our class
    torch.testing.assert_close(_logits(stock, ids), expected, atol=ATOL, rtol=0)
    _assert_config_matches_tensors(tmp_path / "out", loaded)


def _assert_config_matches_tensors(path, model):
    cfg = json.loads((path / "config.json").read_text())
    layers = adapter_for(model).decoder_layers(model)
    assert cfg["num_hidden_layers"] == len(layers)
    spec = cfg.get("secateurs")
    a = adapter_for(model)
    for i, layer in enumerate(layers):
        s = spec["layers"][i] if spec else None
        kv = s["kv_heads"] if s else cfg["num_key_value_heads"]
        inter = s["intermediate"] if s else cfg["intermediate_size"]
        if s is None or s["attn"]:
            # the config's shapes, not the modules': a fused q/k/v of another width fails to split
            qpk, hd = cfg["num_attention_heads"] // cfg["num_key_value_heads"], cfg["head_dim"]
            g = LayerGeometry(kv, qpk, hd, inter, has_attn=True, has_mlp=True)
            q, k, v = a.attn_in_parts(layer, g)
            assert k.shape[0] == v.shape[0] == kv * hd
            assert q.shape[0] == a.o_proj(layer).in_features == kv * hd * qpk
        if s is None or s["mlp"]:
            assert a.down_proj(layer).in_features == inter


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_masks_equal_one_at_a_time(family):
    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    plans = [random_plan(space, seed=s, corrections=False) for s in range(3)]
    single = [Masks.from_plan(p, space) for p in plans]
    ids = _ids(batch=1).expand(3, -1)
    batched = _masked_logits(model, Masks.stack(single), ids)
    for r, m in enumerate(single):
        torch.testing.assert_close(batched[r : r + 1], _masked_logits(model, m, ids[:1]), atol=ATOL, rtol=0)
    # several windows per mask: rows r*n .. r*n+n-1 share mask r
    ids2 = _ids(batch=2)
    rep = _masked_logits(model, Masks.stack(single).repeat_interleave(2), ids2.repeat(3, 1))
    torch.testing.assert_close(rep[2:4], _masked_logits(model, single[1], ids2), atol=ATOL, rtol=0)


NEW_FAMILIES = ("gemma2", "gemma3", "olmo2", "granite", "phi3")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", *(f for f in NEW_FAMILIES if f != "phi3")])
def test_uniform_plan_loads_with_plain_from_pretrained(family, tmp_path):  # phi3: the next test
    model, ids = tiny_model(family), _ids()
    space = UnitSpace.from_model(model)
    plan = uniform_plan(space, groups=1, channels=20, drop_layers=(2,))
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert not hasattr(pruned.config, "secateurs")
    save_pruned(pruned, tmp_path / "u", plan)
    assert not (tmp_path / "u" / "modeling_secateurs.py").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    torch.testing.assert_close(
        _logits(plain, ids), _masked_logits(model, Masks.from_plan(plan, space), ids), atol=ATOL, rtol=0
    )
    assert count_parameters(plain) == count_parameters(pruned)


def _phi3_without_longrope():
    """As Phi-3-mini-4k and Phi-3-medium: no rope scaling (the tiny phi3 has Phi-3.5's longrope)."""
    torch.manual_seed(0)
    cfg = tiny_config("phi3")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("rope", ["longrope", "default"])
def test_phi3_uniform_plans_are_stock_where_the_config_accepts_them(rope, tmp_path):
    """Phi3Config checks longrope factors against `hidden_size // num_attention_heads`, so a uniform plan
    that removes GQA groups cannot be a stock config there: it is written per layer and asks for remote
    code. One that keeps every head, or a model without longrope, loads with plain from_pretrained."""
    model = tiny_model("phi3") if rope == "longrope" else _phi3_without_longrope()
    ids, space = _ids(), UnitSpace.from_model(model)
    for groups, stock in ((2, True), (1, rope == "default")):
        plan = uniform_plan(space, groups=groups, channels=20, drop_layers=(2,))
        pruned = apply_plan_(copy.deepcopy(model), plan)
        assert hasattr(pruned.config, "secateurs") is not stock
        out = tmp_path / f"{groups}"
        save_pruned(pruned, out, plan)
        if stock:
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
        else:
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                transformers.AutoModelForCausalLM.from_pretrained(out)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        expected = _masked_logits(model, Masks.from_plan(plan, space), ids)
        torch.testing.assert_close(_logits(loaded.eval(), ids), expected, atol=ATOL, rtol=0)
        assert count_parameters(loaded) == count_parameters(pruned)


@pytest.mark.parametrize("family", ["llama", "qwen3", *NEW_FAMILIES])
def test_generate_matches_masked_greedy(family, tmp_path):
    """Generation exercises the KV cache, including removed attention blocks (layer 2) and layer 3."""
    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    plan = random_plan(space, seed=3)
    plan.layers[0].drop_attn = True  # cache index 0 must still exist after renumbering
    pruned = apply_plan_(copy.deepcopy(model), plan)
    ids = _ids(batch=1, length=5)  # + 6 new tokens: past the tiny Gemmas' sliding window of 4
    with torch.inference_mode():
        out = pruned.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # the same continuation, token by token, from full re-forwards of the masked dense model
    seq = ids
    for _ in range(6):
        nxt = _masked_logits(model, Masks.from_plan(plan, space), seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_plan_composition_equals_sequential_surgery():
    model, ids = tiny_model("llama", layers=5), _ids()
    space = UnitSpace.from_model(model)
    first = random_plan(space, seed=1, corrections=False)
    once = apply_plan_(copy.deepcopy(model), first)
    space2 = UnitSpace.from_model(once)
    second = random_plan(space2, seed=2, drop_layer=False, corrections=False)
    twice = apply_plan_(once, second)
    combined = first.then(second, space)
    direct = apply_plan_(copy.deepcopy(model), combined)
    torch.testing.assert_close(_logits(direct, ids), _logits(twice, ids), atol=ATOL, rtol=0)


def test_plan_json_round_trip_and_record(tmp_path):
    model = tiny_model("qwen2")
    space = UnitSpace.from_model(model)
    plan = random_plan(space, seed=5)
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict()
    assert 0 < plan.removed_fraction(space) < 1


def test_plan_validation_errors():
    model = tiny_model("llama")
    space = UnitSpace.from_model(model)
    with pytest.raises(PlanError, match="layers"):
        Plan([LayerPlan()]).canonical(space)
    with pytest.raises(PlanError, match="out of range"):
        Plan([LayerPlan(keep_groups=[0, 7])] + [LayerPlan()] * 3).canonical(space)
    with pytest.raises(PlanError, match="every attention block"):
        Plan([LayerPlan(drop_attn=True)] * 4).canonical(space)
    with pytest.raises(PlanError, match="values"):
        Plan([LayerPlan(attn_bias=[0.0])] + [LayerPlan()] * 3).canonical(space)


def test_unit_costs_match_parameter_counts():
    """One cost model: removing units removes exactly their cost from the real parameter count."""
    for family in FAMILIES:
        model = tiny_model(family)
        space = UnitSpace.from_model(model)
        before = count_parameters(model)
        plan = uniform_plan(space, groups=1, channels=10)
        pruned = apply_plan_(copy.deepcopy(model), plan)
        assert before - count_parameters(pruned) == space.total_cost - plan.kept_cost(space)


def test_unsupported_architecture_names_the_table():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError, match="ADAPTERS"):
        adapter_for(cfg)


def test_atomic_save_refuses_non_empty_and_keeps_it(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        save_pruned(model, out, Plan.keep_all(UnitSpace.from_model(model)))
    assert (out / "keep.txt").read_text() == "precious"
    save_pruned(model, out, Plan.keep_all(UnitSpace.from_model(model)), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


@pytest.mark.parametrize("family", ["llama", "qwen2", *NEW_FAMILIES])
def test_evaluator_losses_match_full_logits(family):
    """Chunked, packed, masked losses equal plain cross-entropy on full logits, mask by mask."""
    from secateurs.eval.loss import SubmodelEvaluator, token_nll

    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    windows = _ids(batch=3, length=10, seed=4)
    masks = Masks.stack(
        [Masks.from_plan(random_plan(space, seed=s, corrections=False), space) for s in range(4)]
    )
    ev = SubmodelEvaluator(model, windows, max_rows=5)  # 12 rows in forwards of 5: masks straddle forwards
    got = ev.losses(masks)
    for r in range(4):
        logits = _masked_logits(model, masks.rows(r, r + 1), windows)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
        torch.testing.assert_close(got[r], ref, atol=1e-5, rtol=1e-5)
    assert ev.stats.forwards == 3 and ev.stats.tokens == 120
    with torch.inference_mode():
        torch.testing.assert_close(token_nll(model, windows, chunk=7), token_nll(model, windows, chunk=4096))


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluator_loss_equals_the_models_own_loss(family):
    """The evaluator computes losses from hidden states and lm_head, so what the family's CausalLM does
    after lm_head (Granite's logits_scaling, Gemma's soft-capping) must be applied there too."""
    from secateurs.eval.loss import SubmodelEvaluator

    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    windows = _ids(batch=3, length=10, seed=6)
    masks = Masks.from_plan(random_plan(space, seed=1, corrections=False), space)
    got = SubmodelEvaluator(model, windows).losses(Masks.stack([Masks.ones(space), masks]))
    with torch.inference_mode():
        dense = model(windows, labels=windows).loss
        with masked(model, masks, space):
            sub = model(windows, labels=windows).loss
    torch.testing.assert_close(got, torch.stack([dense, sub]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_mixed_layer_types_follow_removed_layers_and_keep_cache_index_0(family, tmp_path):
    model = tiny_model(family, layers=5)  # sliding, sliding, full, sliding, sliding
    types = list(model.config.layer_types)
    space = UnitSpace.from_model(model)
    plan = Plan(
        [LayerPlan(drop_attn=True, drop_mlp=True), LayerPlan(drop_attn=True), LayerPlan()]
        + [LayerPlan(), LayerPlan(drop_attn=True)]
    )
    pruned = apply_plan_(copy.deepcopy(model), plan)
    assert pruned.config.layer_types == types[1:]
    attn = [adapter_for(pruned).attention(layer) for layer in adapter_for(pruned).decoder_layers(pruned)]
    # sliding blocks take the first sliding cache indices, the full one the full index
    assert [getattr(a, "layer_idx", None) for a in attn] == [None, 1, 0, None]
    save_pruned(pruned, tmp_path / "m", plan)
    loaded, _ = load_pruned(tmp_path / "m")
    ids = _ids(length=12)
    torch.testing.assert_close(
        _logits(loaded, ids), _masked_logits(model, Masks.from_plan(plan, space), ids), atol=ATOL, rtol=0
    )
    every_sliding = Plan([LayerPlan(drop_attn=t != "full_attention") for t in types])
    with pytest.raises(PlanError, match="sliding_attention attention block"):
        apply_plan_(copy.deepcopy(model), every_sliding)


@pytest.mark.parametrize(
    ("arch", "missing"),
    [("Qwen3MoeForCausalLM", "mixture-of-experts"), ("Gemma3ForConditionalGeneration", "vision tower")],
)
def test_structures_not_prunable_yet_are_named(arch, missing):
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2)
    cfg.architectures = [arch]
    with pytest.raises(UnsupportedModelError, match=missing):
        adapter_for(cfg)
