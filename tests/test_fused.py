"""Fused projections (Phi-3's `qkv_proj` / `gate_up_proj`) are a layout, not other units.

A Phi-3 with full-width rotary, no rope scaling and no sliding window computes what a Llama with the same
weights computes (q/k/v stacked into one matrix, gate/up into another), so costs, per-unit scores,
masks and surgery must agree with the unfused twin, number for number.
"""

import copy

import pytest
import torch
import transformers

from secateurs.methods.base import get_method
from secateurs.models.adapters import adapter_for, layer_geometry
from secateurs.surgery.apply import apply_plan_, head_rows
from secateurs.testing import random_plan, tiny_config
from secateurs.units.masks import Masks, masked
from secateurs.units.space import UnitSpace

Q, KV = 32, 16  # tiny_config: 4 query heads and 2 KV heads of head_dim 8


def _ids(batch=2, length=12, seed=0):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _twins():
    torch.manual_seed(0)
    cfg = tiny_config("phi3")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    cfg.sliding_window = None
    phi = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    llama_cfg = tiny_config("llama")
    llama_cfg.rms_norm_eps = cfg.rms_norm_eps
    llama = transformers.AutoModelForCausalLM.from_config(llama_cfg, dtype=torch.float32).eval()
    state = {}
    for key, t in phi.state_dict().items():
        if "qkv_proj" in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([Q, KV, KV]), strict=True):
                state[key.replace("qkv_proj", name)] = part
        elif "gate_up_proj" in key:
            for name, part in zip(("gate_proj", "up_proj"), t.chunk(2), strict=True):
                state[key.replace("gate_up_proj", name)] = part
        else:
            state[key] = t
    llama.load_state_dict(state)
    return phi, llama


def _logits(model, ids, masks=None):
    with torch.inference_mode():
        if masks is None:
            return model(ids).logits
        with masked(model, masks):
            return model(ids).logits


def test_the_twins_compute_the_same_function():
    phi, llama = _twins()
    ids = _ids()
    torch.testing.assert_close(_logits(phi, ids), _logits(llama, ids), atol=1e-5, rtol=0)


def test_parts_are_views_of_the_fused_rows_and_kept_rows_index_them():
    phi, _ = _twins()
    a = adapter_for(phi)
    layer, g = a.decoder_layers(phi)[0], layer_geometry(phi)[0]
    fused = a.attn_in(layer)[0].weight
    q, k, v = a.attn_in_parts(layer, g)
    assert [t.shape[0] for t in (q, k, v)] == [Q, KV, KV]
    assert q.data_ptr() == fused.data_ptr() and torch.equal(v, fused[Q + KV :])
    assert a.attn_in_parts(layer, g, lambda lin: lin.bias) == (None, None, None)
    # keep group 1 of 2: q rows 16..31, k rows 8..15, v rows 8..15, stacked at offsets 0, 32, 48
    ((name, rows),) = a.attn_in_rows(g, head_rows([1], 16, "cpu"), head_rows([1], 8, "cpu"))
    assert name == "qkv_proj"
    assert rows.tolist() == [*range(16, 32), *range(40, 48), *range(56, 64)]
    ((name, rows),) = a.mlp_in_rows(g, torch.tensor([0, 47]))
    assert (name, rows.tolist()) == ("gate_up_proj", [0, 47, 48, 95])


def test_costs_are_the_unfused_twins():
    phi, llama = _twins()
    assert UnitSpace.from_model(phi).describe() == UnitSpace.from_model(llama).describe()


@pytest.mark.parametrize("name", ["magnitude", "taylor", "wanda-sp", "flap"])
def test_scores_are_the_unfused_twins(name):
    phi, llama = _twins()
    method = get_method(name)(get_method(name).config_class(sparsity=0.3, batch_rows=4))
    calib = _ids(batch=4, length=16, seed=1)
    got = method.scores(phi, UnitSpace.from_model(phi), calib)
    want = method.scores(llama, UnitSpace.from_model(llama), calib)
    for kind in ("attn_group", "mlp_channel"):
        for mine, ref in zip(got[kind], want[kind], strict=True):
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)


def test_masked_and_pruned_are_the_unfused_twins():
    phi, llama = _twins()
    ids = _ids()
    plan = random_plan(UnitSpace.from_model(phi), seed=1)
    masks = Masks.from_plan(plan, UnitSpace.from_model(phi))
    torch.testing.assert_close(_logits(phi, ids, masks), _logits(llama, ids, masks), atol=1e-5, rtol=0)
    pruned_phi, pruned_llama = apply_plan_(copy.deepcopy(phi), plan), apply_plan_(copy.deepcopy(llama), plan)
    torch.testing.assert_close(_logits(pruned_phi, ids), _logits(pruned_llama, ids), atol=1e-5, rtol=0)
