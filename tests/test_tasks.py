"""Task accuracy through lm-eval on the model in memory: the harness's figure equals the one computed by
hand from the model's log-likelihoods, settings reach it, a missing task or dataset is one line, and the
dense model's figures are cached like its perplexity."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers_tasks import FACTS, TASK, by_hand, write_task  # noqa: E402
from helpers_tokenizer import tiny_tokenizer  # noqa: E402
from secateurs import progress as progress_module  # noqa: E402
from secateurs.errors import ConfigError, TaskError  # noqa: E402
from secateurs.eval.tasks import TaskConfig, load_tasks, run_tasks  # noqa: E402
from secateurs.testing import tiny_model  # noqa: E402


def test_local_task_accuracy_equals_the_models_own_loglikelihoods(
    tmp_path, hf_datasets_cache, monkeypatch, caplog
):
    """Also: the phase shows progress in a log file, and the global generators come back as they were."""
    model, tok = tiny_model("llama", vocab_size=128), tiny_tokenizer()
    suite = load_tasks(TaskConfig(tasks=(TASK,), include_path=str(write_task(tmp_path / "tasks"))))
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="secateurs.progress"):
        got = run_tasks(model, tok, suite, batch_size=4, label="dense")
    assert torch.equal(torch.rand(3), expected_draw)  # lm-eval's seeding did not leak out
    figures = got["tasks"][TASK]
    want = by_hand(model, tok, FACTS)
    assert 0 < want["acc"] < 1  # the check can fail both ways
    assert figures["acc"] == want["acc"] and figures["acc_norm"] == want["acc_norm"]
    assert figures["acc_stderr"] == pytest.approx(want["acc_stderr"], rel=1e-9)
    assert figures["acc_norm_stderr"] == pytest.approx(want["acc_norm_stderr"], rel=1e-9)
    assert figures["samples"] == len(FACTS) and figures["n_shot"] == 0
    assert got["settings"]["batch_size"] == 4 and got["lm_eval"]
    lines = [r.getMessage() for r in caplog.records if r.name == "secateurs.progress"]
    assert any(
        line.startswith("dense: loglikelihood") and f"{3 * len(FACTS)}/{3 * len(FACTS)}" in line
        for line in lines
    )


def test_limit_and_fewshot_reach_lm_eval_and_the_cache_key(tmp_path, hf_datasets_cache):
    folder = str(write_task(tmp_path / "tasks"))
    model, tok = tiny_model("llama", vocab_size=128), tiny_tokenizer()
    suite = load_tasks(TaskConfig(tasks=(TASK,), include_path=folder, limit=5, num_fewshot=1))
    figures = run_tasks(model, tok, suite)["tasks"][TASK]
    assert figures["samples"] == 5 and figures["n_shot"] == 1
    keys = [
        load_tasks(TaskConfig(tasks=(TASK,), include_path=folder, **kw)).cache_key()
        for kw in ({}, {"limit": 5}, {"num_fewshot": 1})
    ]
    assert keys[0] != keys[1] and keys[0] != keys[2] and keys[0]["lm_eval"]
    assert keys[0] == load_tasks(TaskConfig(tasks=(TASK,), include_path=folder)).cache_key()
    (Path(folder) / f"{TASK}.jsonl").write_text(
        (Path(folder) / f"{TASK}.jsonl").read_text().replace("Paris", "Lyon")
    )
    assert load_tasks(TaskConfig(tasks=(TASK,), include_path=folder)).cache_key() != keys[0]  # new data


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--limit"):
        TaskConfig(tasks=("x",), limit=0)
    with pytest.raises(ConfigError, match="not a directory"):
        TaskConfig(tasks=("x",), include_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="--tasks"):
        TaskConfig(include_path=str(tmp_path))


def test_an_unknown_task_is_one_line_naming_the_folder(tmp_path, hf_datasets_cache):
    folder = str(write_task(tmp_path / "tasks"))
    with pytest.raises(TaskError, match=f"no task 'no_such_task' .*--include-path {folder}"):
        load_tasks(TaskConfig(tasks=("no_such_task",), include_path=folder))


def test_a_missing_dataset_is_one_line_naming_include_path_and_the_hf_cache(tmp_path, tiny_dir):
    """A task whose data is on the hub, offline (HF_DATASETS_OFFLINE=1) with an empty cache: the CLI
    prints one line, before the model is even loaded."""
    model, _ = tiny_dir
    folder = write_task(tmp_path / "tasks", name="secateurs_hub", dataset_path="secateurs-tests/absent")
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    argv = ["eval", str(model), "--tasks", "secateurs_hub", "--include-path", str(folder), "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "secateurs.cli", *argv], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("secateurs:")]
    assert len(ours) == 1 and "Traceback" not in done.stderr, done.stderr
    line = ours[0]
    assert "secateurs_hub" in line and "secateurs-tests/absent" in line
    assert "--include-path" in line and "HF_DATASETS_CACHE" in line


def test_eval_command_prints_the_tasks_figures(tiny_dir, tmp_path, hf_datasets_cache, capfd, monkeypatch):
    """Outside a git checkout too, without lm-eval's `git describe` complaining on stderr."""
    import json

    from secateurs.cli import main

    model, text = tiny_dir
    folder = str(write_task(tmp_path / "tasks"))
    argv = [
        "eval",
        str(model),
        "--data",
        str(text),
        "--seq-len",
        "16",
        "--eval-tokens",
        "64",
        "--device",
        "cpu",
    ]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--tasks", TASK, "--include-path", folder, "--limit", "4", "--json"]) == 0
    out, err = capfd.readouterr()
    assert "not a git repository" not in err
    assert f"| {TASK} | acc      |" in out
    figures = json.loads(out.strip().splitlines()[-1])["tasks"]["tasks"][TASK]
    assert figures["samples"] == 4 and f"{figures['acc']:.3f} ± {figures['acc_stderr']:.3f}" in out
