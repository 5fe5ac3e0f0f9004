"""The CLI end to end on a tiny model, and every bad input: one line, exit 2, nothing written."""

import dataclasses
import json

import pytest
import torch

from secateurs import compare
from secateurs.cli import main
from secateurs.methods.base import REGISTRY

SMALL = [
    "--nsamples",
    "4",
    "--seq-len",
    "32",
    "--eval-seq-len",
    "32",
    "--eval-tokens",
    "256",
    "--device",
    "cpu",
]


def _prune(model, text, out, *extra):
    return main(
        ["prune", str(model), "--calib", str(text), "--eval", str(text), "--out", str(out), *SMALL, *extra]
    )


def test_prune_end_to_end_then_reload_and_apply(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    out = tmp_path / "out"
    assert _prune(model, text, out, "--method", "magnitude", "--sparsity", "0.3", "--json") == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "per-layer shape" in printed
    record = json.loads((out / "plan.json").read_text())
    assert 0.3 <= record["parameters"]["sparsity"] < 0.3 + 0.01
    assert record["method"] == "magnitude" and record["versions"]["torch"] == torch.__version__
    assert record["report"]["pruned_eval"]["tokens"] == 256

    assert main(["eval", str(out), "--data", str(text), "--seq-len", "32", "--eval-tokens", "256"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # the saved plan applied to the dense model gives the same model
    again = tmp_path / "again"
    assert main(["apply", str(model), "--plan", str(out / "plan.json"), "--out", str(again)]) == 0
    a = json.loads((again / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    assert a.get("secateurs") == b.get("secateurs") and a["intermediate_size"] == b["intermediate_size"]


def test_info_and_methods(tiny_dir, capsys):
    model, _ = tiny_dir
    assert main(["info", str(model)]) == 0
    assert "prunable parameters" in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "magnitude" in capsys.readouterr().out


def _assert_one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("secateurs:")]
    assert len(ours) == 1 and ours[0].startswith("secateurs: error:") and "Traceback" not in err
    assert pattern in ours[0], err


def test_missing_model_path(tmp_path, capsys):
    assert _prune(tmp_path / "nope", tmp_path / "t.txt", tmp_path / "out") == 2
    _assert_one_line_error(capsys, "does not exist")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, tiny_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, text = tiny_dir
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    assert _prune(tmp_path / "gpt2", text, tmp_path / "out") == 2
    _assert_one_line_error(capsys, "unsupported architecture")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_open_interval(tiny_dir, tmp_path, capsys, value):
    model, text = tiny_dir
    assert _prune(model, text, tmp_path / "out", "--sparsity", value) == 2
    _assert_one_line_error(capsys, "sparsity must be in (0, 1)")
    assert not (tmp_path / "out").exists()


def test_target_that_removes_every_unit(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    assert _prune(model, text, tmp_path / "out", "--units", "attn_group", "--sparsity", "0.9") == 2
    _assert_one_line_error(capsys, "remove every unit")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "too short."])
def test_empty_or_too_short_text(tiny_dir, tmp_path, capsys, content):
    model, _ = tiny_dir
    short = tmp_path / "short.txt"
    short.write_text(content)
    assert _prune(model, short, tmp_path / "out") == 2
    _assert_one_line_error(capsys, "")
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_needs_overwrite(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert _prune(model, text, out, "--sparsity", "0.2") == 2
    _assert_one_line_error(capsys, "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert _prune(model, text, out, "--sparsity", "0.2", "--overwrite") == 0
    assert not (out / "precious.txt").exists() and (out / "plan.json").exists()


def test_plan_that_does_not_match_the_model(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"method": "manual", "layers": [{"keep_groups": [0]}] * 7}))
    assert main(["apply", str(model), "--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    _assert_one_line_error(capsys, "plan has 7 layers but the model has 4")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "prune", str(tmp_path / "nope")])


def test_setting_of_another_method_is_refused(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    if len({c.config_class for c in REGISTRY.values()}) < 3:
        pytest.skip("needs a method with its own settings")
    own = {f for c in REGISTRY.values() for f in c.config_class.__dataclass_fields__} - set(
        REGISTRY["random"].config_class.__dataclass_fields__
    )
    opt = "--" + sorted(own)[0].replace("_", "-")
    assert _prune(model, text, tmp_path / "out", "--method", "random", opt, "1") in (2,)
    _assert_one_line_error(capsys, f"method 'random' has no setting(s) {opt}")
    # also when the option belongs to a method whose settings the parser does not show
    assert _prune(model, text, tmp_path / "out", "--method", "bonsai", "--estimator", "exact") == 2
    _assert_one_line_error(capsys, "method 'bonsai' has no setting(s) --estimator")


def test_compare_runs_each_method_in_its_own_process_and_caches(tiny_dir, tmp_path, capsys, monkeypatch):
    model, text = tiny_dir
    res = tmp_path / "res"
    argv = [
        "compare",
        str(model),
        "--methods",
        "magnitude,random",
        "--sparsity",
        "0.3",
        "--results",
        str(res),
        "--device",
        "cpu",
        "--calib",
        str(text),
        "--eval",
        str(text),
        *SMALL[:-2],
    ]
    assert main(argv) == 0
    rows = json.loads((res / "compare.json").read_text())
    assert [(r["method"], r["target"]) for r in rows] == [
        ("magnitude", 0.3),
        ("random", 0.3),
    ]
    for r in rows:
        assert r["target"] - 1e-9 <= r["sparsity_attn_mlp"] < r["target"] + 0.01
        assert r["ppl"] > 0 and r["peak_rss_mb"] > 0 and r["eval_tokens"] == 256
        assert r["shapes"] and set(r["shapes"][0]) == {"layer", "groups", "channels"}
    assert "| magnitude | 30% |" in (res / "compare.md").read_text()
    first = (res / "compare.json").read_text()
    calls, real = [], compare.run_one
    monkeypatch.setattr(compare, "run_one", lambda *a: calls.append(a[1:3]) or real(*a))
    assert main(argv) == 0  # cached: same figures, no new processes
    assert (res / "compare.json").read_text() == first and calls == []
    # a changed default is part of the key: only the affected method runs again
    method = REGISTRY["random"]

    @dataclasses.dataclass
    class NewDefaults(method.config_class):
        seed: int = 1234

    monkeypatch.setattr(method, "config_class", NewDefaults)
    assert main(argv) == 0
    assert calls == [("random", 0.3)]


def test_a_method_registered_in_a_test_is_usable_from_the_cli(tiny_dir, tmp_path, capsys):
    from secateurs.methods.base import REGISTRY, register
    from secateurs.methods.magnitude import Magnitude

    @register
    class Reverse(Magnitude):
        name = "reverse-magnitude"
        description = "test-only: drops the largest weights first"

        def scores(self, model, space, calib):
            s = super().scores(model, space, calib)
            return type(s)({k: [-t for t in v] for k, v in s.scores.items()})

    try:
        model, text = tiny_dir
        assert main(["methods"]) == 0
        assert "reverse-magnitude" in capsys.readouterr().out
        assert (
            _prune(model, text, tmp_path / "out", "--method", "reverse-magnitude", "--sparsity", "0.25") == 0
        )
        assert json.loads((tmp_path / "out" / "plan.json").read_text())["method"] == "reverse-magnitude"
    finally:
        REGISTRY.pop("reverse-magnitude", None)


def test_bench_prints_ratios_next_to_the_bound(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir
    out = tmp_path / "out"
    assert _prune(model, text, out, "--sparsity", "0.5", "--no-eval") == 0
    capsys.readouterr()
    argv = [
        "bench",
        str(model),
        str(out),
        "--prompt-len",
        "16",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prefill tok/s" in printed and "decode tok/s" in printed and "MAC bound" in printed
    r = json.loads(printed.strip().splitlines()[-1])
    assert r["pruned"]["macs_per_token"] < r["dense"]["macs_per_token"]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_registered_method_prunes_through_the_cli(tiny_dir, tmp_path, method):
    model, text = tiny_dir
    assert _prune(model, text, tmp_path / "out", "--method", method, "--sparsity", "0.3", "--no-eval") == 0
    record = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert record["method"] == method and record["parameters"]["sparsity"] >= 0.3 - 1e-9


# -- help: one group per method, each with its own defaults ---------------------------------------------


def _prune_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["prune", *argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _option_help(text: str, option: str) -> str:
    """The help entry of `option`, whitespace collapsed (argparse wraps it to the terminal's width)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().split(" ")[0].rstrip(",") == option:
            entry = [line]
            for more in lines[i + 1 :]:  # continuation lines are indented past the option column
                if not more.startswith("   ") or more.strip().startswith("-"):
                    break
                entry.append(more)
            return " ".join(" ".join(entry).split())
    raise AssertionError(f"{option} is not in the help:\n{text}")


def test_help_shows_the_chosen_methods_own_defaults(capsys):
    assert "(default: uniform)" in _option_help(_prune_help(capsys, "--method", "wanda-sp"), "--allocation")
    assert "(default: layer)" in _option_help(_prune_help(capsys, "--method=block-influence"), "--units")
    # the model may come first, as in `secateurs prune default --method ... --help`
    assert "(default: uniform)" in _option_help(
        _prune_help(capsys, "default", "--method", "magnitude"), "--allocation"
    )


def test_help_of_one_method_shows_only_its_own_settings(capsys):
    text = _prune_help(capsys, "--method", "bonsai")
    assert "--estimator" not in text and "--steps" not in text  # policy-gradient's
    assert "--bias-correction" not in text  # flap's
    for option in ("--prune-frac", "--masks-per-round", "--sparsity", "--allocation", "--nsamples"):
        _option_help(text, option)


def test_plain_help_has_a_group_per_method_with_its_defaults(capsys):
    text = _prune_help(capsys)
    for name in REGISTRY:
        assert f"\n{name} settings:\n" in text
    magnitude = text.split("\nmagnitude settings:\n")[1].split("\n\n")[0]
    assert "--allocation uniform" in " ".join(magnitude.split())  # differs from the shared default shown


# -- --device: any string, checked by the loader ---------------------------------------------------------


def _run(argv: list[str]) -> int:
    """`main`, with argparse's own exit (usage errors) turned into a status like ours."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["prune", "eval", "info", "bench", "apply", "compare"])
def test_device_cuda_n_reaches_the_loader(tiny_dir, tmp_path, capsys, command):
    model, text = tiny_dir
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"method": "manual", "layers": [{"keep_groups": [0]}] * 4}))
    tail = {
        "prune": ["--calib", str(text), "--eval", str(text)],
        "eval": ["--data", str(text)],
        "info": [],
        "bench": [str(model)],
        "apply": ["--plan", str(plan), "--out", str(tmp_path / "out")],
        "compare": ["--methods", "magnitude", "--sparsity", "0.3", "--results", str(tmp_path / "res")],
    }[command]
    assert _run([command, str(model), *tail, "--device", "cuda:1"]) == 2
    _assert_one_line_error(capsys, "CUDA is not available")
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()


# -- the dense-evaluation cache is keyed by the weights' content ------------------------------------------


def _rewrite_weights(model_dir, scale: float = 1.5) -> None:
    """New weights in the same files at the same path (as a fine-tune saved over its input would)."""
    from safetensors.torch import load_file, save_file

    for f in model_dir.glob("*.safetensors"):
        save_file({k: v * scale for k, v in load_file(f).items()}, f, metadata={"format": "pt"})


def test_dense_eval_cache_misses_when_the_weights_change_in_place(tiny_dir, tmp_path, monkeypatch, capsys):
    from secateurs import pipeline

    model, text = tiny_dir
    calls = []
    real = pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))

    def prune() -> None:
        assert _prune(model, text, tmp_path / "out", "--method", "magnitude", "--overwrite") == 0

    prune()
    assert len(calls) == 2  # dense (then cached) and pruned
    prune()
    assert len(calls) == 3  # dense from the cache
    dense = json.loads((tmp_path / "out" / "plan.json").read_text())["report"]["dense_eval"]["ppl"]
    _rewrite_weights(model)
    prune()
    assert len(calls) == 5  # same path, new weights: the dense figure is computed again
    again = json.loads((tmp_path / "out" / "plan.json").read_text())["report"]["dense_eval"]["ppl"]
    assert again != dense
