"""In-place methods give the model back without a second copy: layers restored from the model's own
safetensors, or from a copy of the layers when no checkpoint on disk matches."""

import pytest
import torch

import secateurs
from secateurs.methods.bonsai import Bonsai, BonsaiConfig
from secateurs.surgery.restore import LayerSnapshot
from secateurs.testing import random_plan, tiny_model
from secateurs.units.space import UnitSpace


def _ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.fixture
def saved(tmp_path):
    tiny_model("qwen3", layers=4).save_pretrained(tmp_path / "dense")
    model, _ = secateurs.load_model(str(tmp_path / "dense"), device="cpu")
    return model


def test_restore_reads_the_layers_back_from_disk(saved):
    before, config = _state(saved), saved.config.to_dict()
    with torch.inference_mode():
        logits = saved(_ids()).logits
    snapshot = LayerSnapshot(saved)
    assert not snapshot.holds_a_copy
    assert all(p.is_meta for p in snapshot._layers.parameters())  # structure only, no memory
    secateurs.apply_plan_(saved, random_plan(UnitSpace.from_model(saved), seed=0, drop_layer=True))
    assert saved.config.num_hidden_layers == 3 and saved.config.secateurs
    snapshot.restore_(saved)
    assert _same(saved, before) and saved.config.to_dict() == config
    with torch.inference_mode():
        torch.testing.assert_close(saved(_ids()).logits, logits, atol=0, rtol=0)


def test_a_model_changed_after_loading_is_restored_from_a_copy(saved):
    with torch.no_grad():
        saved.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0  # the file no longer holds these weights
    before = _state(saved)
    snapshot = LayerSnapshot(saved)
    assert snapshot.holds_a_copy
    secateurs.apply_plan_(saved, random_plan(UnitSpace.from_model(saved), seed=1))
    snapshot.restore_(saved)
    assert _same(saved, before)


def test_bonsai_slices_the_model_itself_and_gives_it_back(saved, monkeypatch):
    before = _state(saved)
    taken = []
    monkeypatch.setattr(LayerSnapshot, "restore_", _spy(LayerSnapshot.restore_, taken))
    cfg = BonsaiConfig(sparsity=0.25, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=4)
    Bonsai(cfg).plan(saved, UnitSpace.from_model(saved), _ids().repeat(4, 1))
    assert len(taken) == 1 and not taken[0].holds_a_copy
    assert _same(saved, before)


def test_bonsai_gives_the_model_back_on_an_error(saved):
    before = _state(saved)

    class Broken(Bonsai):
        def on_round_end(self, round_index, plan):
            raise RuntimeError("stop")

    cfg = BonsaiConfig(sparsity=0.25, prior="wanda-sp", masks_per_round=8, eval_windows=4, channel_bundle=4)
    with pytest.raises(RuntimeError, match="stop"):
        Broken(cfg).plan(saved, UnitSpace.from_model(saved), _ids().repeat(4, 1))
    assert _same(saved, before)


def _spy(fn, taken):
    def wrapped(self, model):
        taken.append(self)
        return fn(self, model)

    return wrapped
