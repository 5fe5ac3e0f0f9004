"""Models larger than one device: a forced split over CPU memory and disk (`--device-map auto` with a
small `--max-memory`) gives the plans, the losses, the repair and the saved model of the model held in
memory; saving streams shards."""

import json

import pytest
import torch

from helpers_cli import small
from helpers_tokenizer import tiny_tokenizer
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.eval.loss import SubmodelEvaluator
from secateurs.methods.base import get_method
from secateurs.models.loading import Placement, load_model, weight_files
from secateurs.pipeline import make_plan
from secateurs.surgery.reconstruct import ReconstructConfig, reconstruct_
from secateurs.surgery.restore import LayerSnapshot
from secateurs.surgery.saving import load_pruned, save_pruned
from secateurs.testing import tiny_model

SPLIT = "cpu=150KB"  # the tiny Llama: embeddings and 3 layers in memory, the last layer and the head on disk
SEARCHES = {
    "wanda-sp": {},
    "block-influence": {},  # drops the offloaded last layer
    "bonsai": dict(masks_per_round=8, eval_windows=4, batch_rows=4, cv_folds=2),
    "policy-gradient": dict(steps=5, batch_rows=2, split_len=0),
}


def _calib():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    tiny_model("llama", layers=4, vocab_size=128).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _pair(dense_dir, tmp_path):
    plain, _ = load_model(str(dense_dir), device="cpu")
    split, _ = load_model(
        str(dense_dir), device="cpu", placement=Placement("auto", SPLIT, str(tmp_path / "off"))
    )
    return plain, split


def _offloaded(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def test_a_forced_split_really_offloads(dense_dir, tmp_path):
    _, split = _pair(dense_dir, tmp_path)
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    assert split.hf_device_map["model.layers.3"] == "disk"
    assert _offloaded(split)
    assert not any(p.is_meta for p in split.model.layers[0].parameters())


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_offloaded_search_and_repair_equal_the_model_in_memory(dense_dir, tmp_path, name):
    plain, split = _pair(dense_dir, tmp_path)
    calib = _calib()
    assert torch.equal(SubmodelEvaluator(plain, calib).losses(), SubmodelEvaluator(split, calib).losses())
    cfg = get_method(name).config_class(sparsity=0.3, **SEARCHES[name])
    a, b = make_plan(plain, name, cfg, calib), make_plan(split, name, cfg, calib)
    assert a.to_dict()["layers"] == b.to_dict()["layers"]
    assert _offloaded(split)  # Bonsai gave its rounds' layers back to disk
    ra, rb = (reconstruct_(m, p, calib, ReconstructConfig()) for m, p in ((plain, a), (split, b)))
    assert ra["layers"] == rb["layers"]  # the same lambdas and errors, layer by layer
    assert torch.equal(SubmodelEvaluator(plain, calib).losses(), SubmodelEvaluator(split, calib).losses())
    if name != "block-influence":  # which removes the offloaded layer
        assert _offloaded(split) and "disk" in split.hf_device_map.values()
    save_pruned(plain, tmp_path / "a")
    save_pruned(split, tmp_path / "b")
    ma, _ = load_pruned(tmp_path / "a")
    mb, _ = load_pruned(tmp_path / "b")
    with torch.inference_mode():
        assert torch.equal(ma(calib[:2]).logits, mb(calib[:2]).logits)


def test_prune_with_a_device_map_equals_prune_in_memory(tiny_dir, tmp_path, capsys):
    path, text = tiny_dir
    common = ["prune", str(path), "--method", "wanda-sp", "--sparsity", "0.3", "--calib", str(text)]
    common += ["--eval", str(text), *small()]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    split = ["--device-map", "auto", "--max-memory", SPLIT, "--offload-folder", str(tmp_path / "off")]
    assert main([*common, "--out", str(tmp_path / "b"), *split]) == 0
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("a", "b"))
    assert a["layers"] == b["layers"]
    assert a["report"]["pruned_eval"] == b["report"]["pruned_eval"]
    assert a["reconstruct"]["layers"] == b["reconstruct"]["layers"]
    phases = b["report"]["phases"]  # time and peak memory of every phase, in every report
    assert list(phases) == ["load", "search", "dense_eval", "repair", "pruned_eval"]
    assert all(p["peak_rss_mb"] > 0 and p["seconds"] >= 0 for p in phases.values())


def test_placement_settings_are_checked(tiny_dir, capsys):
    with pytest.raises(ConfigError, match="need --device-map auto"):
        Placement(max_memory="cpu=1GB")
    with pytest.raises(ConfigError, match="DEVICE=SIZE"):
        Placement("auto", "cpu:1GB")
    path, _ = tiny_dir
    assert main(["info", str(path), "--device", "cpu", "--max-memory", "cpu=1GB"]) == 2
    assert "need --device-map auto" in capsys.readouterr().err


def test_saving_streams_shards_and_restores_from_them(dense_dir, tmp_path):
    model, _ = load_model(str(dense_dir), device="cpu")
    save_pruned(model, tmp_path / "sharded", max_shard_size="20KB")
    files = weight_files(tmp_path / "sharded")
    assert len(set(files.values())) > 2  # one shard at a time, each under the limit
    again, _ = load_pruned(tmp_path / "sharded")
    with torch.inference_mode():
        assert torch.equal(again(_calib()[:2]).logits, model(_calib()[:2]).logits)
    assert not LayerSnapshot(again).holds_a_copy  # in-place methods restore from the shards
