"""What a run leaves to look at: task accuracy in plan.json and the summary, pictures next to the model,
and a model card whose figures are the saved model's own."""

import json
import math

import pytest
from safetensors import safe_open

from helpers_cli import small
from secateurs.cli import main
from secateurs.eval.tasks import lm_eval_version
from secateurs.report import card, plots
from secateurs.report.card import base_model_info


def _prune(model, text, out, *extra: str) -> int:
    argv = [
        "prune",
        str(model),
        "--sparsity",
        "0.3",
        "--out",
        str(out),
        "--calib",
        str(text),
        "--eval",
        str(text),
    ]
    return main([*argv, *small(), *extra])


def _saved_parameters(out) -> int:
    """A recount from the saved weights themselves."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is not iterable


def _card_row(text: str, label: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_prune_with_tasks_records_accuracy_and_writes_pictures_and_card(
    tiny_dir, tmp_path, hf_datasets_cache, capsys
):
    from helpers_tasks import TASK, write_task

    model, text = tiny_dir
    tasks = ["--tasks", TASK, "--include-path", str(write_task(tmp_path / "tasks"))]
    out = tmp_path / "out"
    assert _prune(model, text, out, "--method", "wanda-sp", *tasks) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "plan.json").read_text())
    dense, pruned = record["report"]["dense_tasks"], record["report"]["pruned_tasks"]
    for figures in (dense["tasks"][TASK], pruned["tasks"][TASK]):
        assert 0 <= figures["acc"] <= 1 and figures["acc_stderr"] > 0 and figures["samples"] == 24
    assert pruned["lm_eval"] == lm_eval_version() == dense["lm_eval"]
    assert f"{TASK} acc (24 ex., 0-shot)" in printed
    for name in ("README.md", "shape.png", "reconstruction.png", "plan.json", "model.safetensors"):
        assert f"  {name}  (" in printed  # the summary names every output file
        assert (out / name).is_file()
    assert (out / "shape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the card: Hugging Face's header, and counts that are the saved weights' own
    text_ = (out / "README.md").read_text()
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(out / "README.md")
    assert (
        meta["library_name"] == "transformers" and "secateurs" in meta["tags"] and "wanda-sp" in meta["tags"]
    )
    assert "](shape.png)" in text_ and "](reconstruction.png)" in text_
    row = _card_row(text_, "parameters, all")
    assert int(row[2].replace(",", "")) == _saved_parameters(out)
    assert int(row[1].replace(",", "")) == record["parameters"]["dense_total"]
    acc = _card_row(text_, f"{TASK} acc (24 examples, 0-shot)")
    assert acc[1].startswith(f"{dense['tasks'][TASK]['acc']:.3f} ± ")
    assert acc[2].startswith(f"{pruned['tasks'][TASK]['acc']:.3f} ± ")
    # the dense figures are cached like the dense perplexity; the pruned ones are the same again
    assert _prune(model, text, tmp_path / "again", "--method", "wanda-sp", *tasks) == 0
    again = json.loads((tmp_path / "again" / "plan.json").read_text())["report"]
    assert again["dense_tasks"].get("cached") is True and again["dense_eval"].get("cached") is True
    assert (
        again["dense_tasks"]["tasks"] == dense["tasks"] and again["pruned_tasks"]["tasks"] == pruned["tasks"]
    )


def test_each_method_gets_its_history_drawn(tiny_dir, tmp_path, monkeypatch):
    """Policy gradient: loss and baseline; Bonsai: held-out tau per round; a removed block is marked."""
    pytest.importorskip("matplotlib")
    model, text = tiny_dir
    pg, bonsai = tmp_path / "pg", tmp_path / "bonsai"
    assert (
        _prune(model, text, pg, "--method", "policy-gradient", "--steps", "4", "--samples", "2", "--no-eval")
        == 0
    )
    assert (
        _prune(
            model,
            text,
            bonsai,
            "--method",
            "bonsai",
            "--masks-per-round",
            "8",
            "--reconstruct",
            "none",
            "--no-eval",
        )
        == 0
    )
    assert (pg / "policy_gradient.png").is_file() and not (pg / "bonsai.png").exists()
    assert (bonsai / "bonsai.png").is_file() and not (bonsai / "reconstruction.png").exists()
    record = json.loads((pg / "plan.json").read_text())
    assert record["info"]["training"]["curve"]["baseline"]  # what the picture draws
    record["removed_units"][1]["drop_mlp"] = True
    axes = plots.shape_figure(record).axes[0]
    assert "block dropped" in [t.get_text() for t in axes.get_legend().get_texts()]


def test_without_matplotlib_no_pictures_one_note_and_the_card_still(tiny_dir, tmp_path, monkeypatch, caplog):
    model, text = tiny_dir
    monkeypatch.setattr(plots, "available", lambda: False)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="secateurs.report.plots"):
        assert _prune(model, text, out, "--method", "magnitude", "--no-eval") == 0
    assert not list(out.glob("*.png"))
    notes = [r.getMessage() for r in caplog.records if r.name == "secateurs.report.plots"]
    assert notes == [plots.missing_note()] and ".[plots]" in notes[0]
    text_ = (out / "README.md").read_text()
    assert "## Pictures" not in text_ and "perplexity" not in text_  # --no-eval: no figure invented


def test_the_default_models_card_names_its_hub_id_and_license():
    pytest.importorskip("gguf")
    info = base_model_info("default")
    assert info == {"base_model": card.DEFAULT_BASE_MODEL, "license": "apache-2.0"}
    assert base_model_info("someone/not-cached-here") == {
        "base_model": "someone/not-cached-here",
        "license": None,
    }


def test_compare_plot_has_one_line_per_method():
    pytest.importorskip("matplotlib")
    rows = [
        {"method": m, "sparsity_attn_mlp": s, "ppl": p, "dense_ppl": 10.0, "swept": {}}
        for m, s, p in (("a", 0.2, 20.0), ("a", 0.5, 80.0), ("b", 0.2, 30.0), ("b", 0.5, 60.0))
    ]
    axes = plots.compare_figure(rows).axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels[:2] == ["a", "b"] and labels[2].startswith("dense")
    assert list(axes.get_lines()[0].get_xdata()) == [0.2, 0.5]
