"""vLLM export: the written directory holds exactly the pruned model.

Without vLLM: the directory's config and weights load in transformers through its own modelling file,
from `block_configs` alone (no `config.secateurs`), and give the secateurs model's logits and greedy
continuation; a perturbed tensor must break that. With vLLM (`pip install -r requirements-vllm.txt`,
see README): vLLM's greedy continuation of the real default model, pruned uniformly and
heterogeneously, equals transformers'. Those tests skip with a reason where vLLM is absent.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import secateurs
from secateurs.export import ExportError
from secateurs.testing import tiny_model
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import UnitSpace

PROMPT_LEN, NEW_TOKENS, MIN_DISTINCT = 6, 16, 8


def _plan(space: UnitSpace, corrections: bool = False, seed: int = 0) -> Plan:
    """Heterogeneous MLP, the same GQA groups kept in every layer, layer 1 without MLP, layer 2 without
    attention; output-bias corrections when asked."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, lu in enumerate(space.layers):
        keep = sorted(torch.randperm(lu.n_channels, generator=g)[: lu.n_channels // 2 + 3 * i].tolist())
        bias = (
            (lambda: torch.randn(space.hidden_size, generator=g).mul(0.1).tolist()) if corrections else None
        )
        layers.append(
            LayerPlan(
                keep_groups=None if i == 2 else [lu.n_groups - 1],
                keep_channels=None if i == 1 else keep,
                drop_attn=i == 2,
                drop_mlp=i == 1,
                attn_bias=bias() if bias and i != 2 else None,
                mlp_bias=bias() if bias and i != 1 else None,
            )
        )
    return Plan(layers)


# Random weights whose greedy continuation is not stuck on a few tokens (>= 9 distinct in every case
# here; seeds 1-4 gave 2-7 for some families), so that equal continuations prove something.
MODEL_SEED = 5


def _pruned(family: str, tmp_path: Path, plan_fn=_plan, **kw):
    model = tiny_model(family, layers=4, seed=MODEL_SEED)
    plan = plan_fn(UnitSpace.from_model(model), **kw)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "src", plan)
    return model


def _ids():
    return torch.randint(4, 96, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(11))


def _greedy(model, ids):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _load_export(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    assert "secateurs" not in cfg  # only block_configs can set the shapes
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize(
    "family,corrections", [("llama", False), ("llama", True), ("qwen2", False), ("llama-mha-bias", True)]
)
def test_heterogeneous_export_loads_from_block_configs_alone(family, corrections, tmp_path):
    model = _pruned(family, tmp_path, corrections=corrections)
    secateurs.export(tmp_path / "src", "vllm", tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, True, False, False]
    assert all("ffn_mult" not in b["ffn"] for b in blocks)  # vLLM would prefer it over intermediate_size
    assert len({b["ffn"]["intermediate_size"] for b in blocks if not b["ffn"]["no_op"]}) > 1
    exported = _load_export(tmp_path / "vllm")
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    want = _greedy(model, ids)
    assert _greedy(exported, ids) == want and len(set(want)) >= MIN_DISTINCT


def test_a_perturbed_tensor_fails_the_comparison(tmp_path):
    """The negative control: the comparison above can fail."""
    model = _pruned("llama", tmp_path)
    secateurs.export(tmp_path / "src", "vllm", tmp_path / "vllm")
    path = tmp_path / "vllm" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.3.mlp.down_proj.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn_like(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    exported = _load_export(tmp_path / "vllm")
    ids = _ids()
    with torch.inference_mode():
        assert (exported(ids).logits - model(ids).logits).abs().max() > 1e-2
    assert _greedy(exported, ids) != _greedy(model, ids)


def test_uniform_plan_keeps_the_stock_config(tmp_path):
    from secateurs.testing import uniform_plan

    model = _pruned("qwen3", tmp_path, plan_fn=lambda s: uniform_plan(s, groups=1, channels=20))
    secateurs.export(tmp_path / "src", "vllm", tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert (
        cfg["architectures"] == ["Qwen3ForCausalLM"] and "block_configs" not in cfg and "auto_map" not in cfg
    )
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "vllm").eval()
    ids = _ids()
    with torch.inference_mode():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def _groups_differ(space):
    layers = [LayerPlan(keep_groups=[0] if i % 2 else None) for i in range(space.n_layers)]
    return Plan(layers)


def _no_attention_in_layer_0(space):
    return Plan([LayerPlan(drop_attn=i == 0) for i in range(space.n_layers)])


@pytest.mark.parametrize(
    "family,plan_fn,needle",
    [
        ("llama", _groups_differ, "--attention-allocation uniform"),
        ("llama", _no_attention_in_layer_0, "layer 0"),
        ("qwen3", _plan, "qwen3"),
    ],
)
def test_inexpressible_shapes_are_refused_and_nothing_is_written(family, plan_fn, needle, tmp_path):
    _pruned(family, tmp_path, plan_fn=plan_fn)
    with pytest.raises(ExportError, match=needle.replace("-", r"\-")):
        secateurs.export(tmp_path / "src", "vllm", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_export_vllm_and_existing_output(tmp_path, capsys):
    from secateurs.cli import main

    _pruned("llama", tmp_path)
    args = ["export", str(tmp_path / "src"), "--format", "vllm", "--out", str(tmp_path / "v")]
    assert main(args) == 0
    assert (tmp_path / "v" / "modeling_secateurs_nas.py").is_file()
    assert main(args) == 2
    assert "is not empty (use --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


# -- with vLLM ------------------------------------------------------------------------------------

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main():
        from vllm import LLM, SamplingParams
        prompt, new_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=sys.argv[1], dtype="float32", trust_remote_code=True, enforce_eager=True,
                  max_model_len=256, gpu_memory_utilization=0.15)
        got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=new_tokens))
        print("TOKENS", json.dumps(list(got[0].outputs[0].token_ids)))

    if __name__ == "__main__":
        main()
    """
)


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not import here
        return False
    return True


needs_vllm = pytest.mark.skipif(
    not _vllm_available(), reason="vLLM is not installed (pip install -r requirements-vllm.txt)"
)


def _default_pruned(tmp_path: Path, uniform: bool):
    """The default model with 2 of 3 GQA groups in every layer and its MLP channels of largest
    down-projection norm: 1,200 in every layer (uniform: the stock config), or 1,000-1,500 per layer with
    layer 20's attention and layer 25's MLP removed (heterogeneous: Nemotron-NAS). Such plans (no
    repair) babble, but their greedy continuations are diverse (12 and 13 distinct of 16 tokens), which
    is what an engine comparison needs; the methods' own plans are exported the same way."""
    model, tok = secateurs.load_model("default", device="cpu")
    a = UnitSpace.from_model(model).adapter
    g = torch.Generator().manual_seed(0)
    layers = []
    for i, layer in enumerate(a.decoder_layers(model)):
        n = 1200 if uniform else int(torch.randint(1000, 1501, (1,), generator=g))
        norms = a.down_proj(layer).weight.norm(dim=0)
        drop_attn, drop_mlp = not uniform and i == 20, not uniform and i == 25
        layers.append(
            LayerPlan(
                keep_groups=None if drop_attn else [0, 1],
                keep_channels=None
                if drop_mlp
                else sorted(torch.argsort(norms, descending=True)[:n].tolist()),
                drop_attn=drop_attn,
                drop_mlp=drop_mlp,
            )
        )
    plan = Plan(layers)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "src", plan, tok)
    return model, tok


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("uniform", [True, False])
def test_vllm_greedy_equals_transformers_on_the_default_model(uniform, tmp_path):
    model, tok = _default_pruned(tmp_path, uniform)
    secateurs.export(tmp_path / "src", "vllm", tmp_path / "vllm")
    arch = json.loads((tmp_path / "vllm" / "config.json").read_text())["architectures"]
    assert arch == (["LlamaForCausalLM"] if uniform else ["DeciLMForCausalLM"])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    want = _greedy(model, ids)
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "vllm"), json.dumps(ids[0].tolist()), str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ | {"VLLM_LOGGING_LEVEL": "WARNING"},
    )  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("TOKENS ")]
    assert lines, r.stderr[-3000:]
    got = json.loads(lines[0][len("TOKENS ") :])
    assert got == want and len(set(want)) >= MIN_DISTINCT


def test_prune_export_vllm_needs_uniform_attention_and_then_writes_it(tmp_path, capsys, monkeypatch):
    """`prune --export vllm` refuses before the search when groups may differ per layer; with
    `--attention-allocation uniform` it writes OUT/vllm, which loads and matches the saved model."""
    from helpers_cli import small
    from helpers_tokenizer import tiny_tokenizer
    from secateurs.cli import main

    model = tiny_model("llama", layers=4, seed=MODEL_SEED, vocab_size=128)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the fox and the gardener prune hedge {i}." * 4 for i in range(40))
    )
    argv = [
        *("prune", str(tmp_path / "dense"), "--method", "flap", "--sparsity", "0.4"),
        *("--calib", str(text), "--eval", str(text), *small(), "--no-eval", "--export", "vllm"),
    ]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "--attention-allocation uniform" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*argv, "--attention-allocation", "uniform", "--out", str(tmp_path / "out")]) == 0
    saved, _ = secateurs.load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "vllm" / "config.json").read_text())["block_configs"]
    exported = _load_export(tmp_path / "out" / "vllm")
    ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(exported(ids).logits, saved(ids).logits, atol=1e-5, rtol=0)
