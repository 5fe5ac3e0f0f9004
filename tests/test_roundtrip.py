"""A pruned model is a first-class source again: prune -> save -> load -> prune -> save -> load -> generate,
for every family, through the public API and through the CLI (`apply`, `eval` and `prune` on a pruned
directory). Written against APIs that existed before the fix, so it shows the bug on the old code."""

import copy
import json

import pytest
import torch
import transformers

import secateurs
from helpers_tokenizer import tiny_tokenizer
from secateurs.cli import main
from secateurs.testing import FAMILIES, random_plan, tiny_model
from secateurs.units.masks import Masks, masked
from secateurs.units.space import UnitSpace

ATOL = 1e-4


def _ids(length=10, seed=0, vocab=96):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_load_twice_then_generate(family, tmp_path):
    model = tiny_model(family, layers=5)
    first = random_plan(UnitSpace.from_model(model), seed=1, drop_layer=True)
    secateurs.apply_plan_(model, first)
    secateurs.save(model, tmp_path / "once", first)

    once, _ = secateurs.load_model(str(tmp_path / "once"), device="cpu")
    space = UnitSpace.from_model(once)
    second = random_plan(space, seed=2, drop_layer=False, corrections=False)
    ids = _ids()
    with torch.inference_mode(), masked(once, Masks.from_plan(second, space), space):
        expected = once(ids).logits
    secateurs.apply_plan_(once, second)
    secateurs.save(once, tmp_path / "twice", second)

    cfg = json.loads((tmp_path / "twice" / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]  # the stock class, never our subclass's name
    assert cfg["secateurs"]["family"] == secateurs.models.adapters.adapter_for(model).name
    assert cfg["secateurs"]["schema"] == json.loads((tmp_path / "twice" / "plan.json").read_text())["schema"]

    twice, _ = secateurs.load_model(str(tmp_path / "twice"), device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(twice(ids).logits, expected, atol=ATOL, rtol=0)
        out = twice.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)


def _as_older_version(family, tmp_path, rewrite):
    """A heterogeneous output whose config.json `rewrite` turns into what an older secateurs wrote; it
    must load with the same logits."""
    model = tiny_model(family)
    plan = random_plan(UnitSpace.from_model(model), seed=0)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "old", plan)
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    rewrite(cfg)
    path.write_text(json.dumps(cfg))
    loaded, _ = secateurs.load_model(str(tmp_path / "old"), device="cpu")
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


def test_directory_with_the_old_class_name_still_loads(tmp_path):
    """Outputs of secateurs 0.1.0 name `SecateursForCausalLM`; they must keep loading."""

    def schema_1(cfg):
        cfg["architectures"] = ["SecateursForCausalLM"]
        cfg["model_type"] = "llama"  # as 0.1.0 wrote it
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_secateurs.SecateursForCausalLM"}
        cfg["secateurs"].pop("family", None)
        cfg["secateurs"].pop("schema", None)

    _as_older_version("llama", tmp_path, schema_1)


def test_schema_2_directory_still_loads(tmp_path):
    """Outputs of schema 2 kept the stock `model_type` and mapped only the model class."""

    def schema_2(cfg):
        cfg["model_type"] = "qwen2"
        cfg["auto_map"].pop("AutoConfig")
        cfg["secateurs"]["schema"] = 2

    _as_older_version("qwen2", tmp_path, schema_2)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_from_pretrained_on_a_heterogeneous_output_asks_for_remote_code(family, tmp_path):
    """A plain `from_pretrained(dir)` used to load the stock class and fail on the first tensor whose size
    differs; the output's own model_type makes transformers say what to do instead."""
    model = tiny_model(family)
    plan = random_plan(UnitSpace.from_model(model), seed=0)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "h", plan)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "h", trust_remote_code=True)
    remote.save_pretrained(tmp_path / "again")  # a user's re-save of the remote-code model stays loadable
    again, _ = secateurs.load_model(str(tmp_path / "again"), device="cpu")
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(remote.eval()(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


def test_cli_apply_eval_and_prune_on_a_pruned_directory(tmp_path, capsys):
    model = tiny_model("llama", layers=4, vocab_size=128)
    plan = random_plan(UnitSpace.from_model(model), seed=0, corrections=False)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    pruned = copy.deepcopy(model)
    secateurs.apply_plan_(pruned, plan)
    secateurs.save(pruned, tmp_path / "pruned", plan, tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    )
    small = ["--eval-seq-len", "16", "--eval-tokens", "64", "--nsamples", "2", "--seq-len", "16"]
    data = ["--calib", str(text), "--eval", str(text), "--device", "cpu"]

    again = tmp_path / "again"
    args = ["prune", str(tmp_path / "pruned"), "--method", "magnitude", "--sparsity", "0.2"]
    assert main([*args, "--out", str(again), *data, *small]) == 0
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert main(["eval", str(again), "--data", str(text), "--seq-len", "16", "--eval-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # a plan made for the pruned model applies to the pruned directory
    assert (
        main(
            [
                "apply",
                str(tmp_path / "pruned"),
                "--plan",
                str(again / "plan.json"),
                "--out",
                str(tmp_path / "ap"),
            ]
        )
        == 0
    )
    applied, _ = secateurs.load_model(str(tmp_path / "ap"), device="cpu")
    reference, _ = secateurs.load_model(str(again), device="cpu")
    ids = _ids(vocab=128)
    with torch.inference_mode():
        torch.testing.assert_close(applied(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("damage", ["truncated-weights", "short-layer-list", "missing-key"])
def test_damaged_pruned_directory_is_one_line_error(tmp_path, capsys, damage):
    model = tiny_model("llama", vocab_size=128)
    plan = random_plan(UnitSpace.from_model(model), seed=0)
    secateurs.apply_plan_(model, plan)
    out = tmp_path / "p"
    secateurs.save(model, out, plan, tiny_tokenizer())
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "truncated-weights":
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "short-layer-list":
        cfg["secateurs"]["layers"] = cfg["secateurs"]["layers"][:-1]
    else:
        del cfg["secateurs"]["layers"][0]["kv_heads"]
    if damage != "truncated-weights":
        cfg_path.write_text(json.dumps(cfg))
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("secateurs:")]
    assert len(lines) == 1 and "Traceback" not in err and str(out) in lines[0], err


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2", "granite", "phi3"])
def test_cli_prune_with_repair_then_eval_on_new_families(family, tmp_path, capsys):
    model = tiny_model(family, layers=4, vocab_size=128)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the dog." for i in range(60)))
    small = ["--eval-seq-len", "16", "--eval-tokens", "64", "--nsamples", "4", "--seq-len", "16"]
    data = ["--calib", str(text), "--eval", str(text), "--device", "cpu"]
    out = tmp_path / "p"
    args = ["prune", str(dense), "--method", "wanda-sp", "--sparsity", "0.3", "--out", str(out)]
    assert main([*args, *data, *small]) == 0
    record = json.loads((out / "plan.json").read_text())
    assert record["parameters"]["sparsity"] >= 0.3
    assert main(["eval", str(out), "--data", str(text), "--seq-len", "16", "--eval-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
