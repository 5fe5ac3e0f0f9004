"""`secateurs compare`: every prune option forwarded (or refused), comma lists swept, every option and the
code and weights in the cache key, each run in a spawned process.

Most tests replace `compare.run_one` (the spawned run) by a canned record: they are about what compare
asks for and caches, and a spawned process costs seconds. Two tests spawn real runs.
"""

import json

import pytest

from secateurs import compare
from secateurs.cli import main

SMALL = ["--nsamples", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256"]


def _record(sparsity: float) -> dict:
    """What a run's process sends back (parameters + report), with made-up figures."""
    report = {
        "method_time_s": 0.1,
        "method_peak_rss_mb": 100.0,
        "pruned_eval": {"ppl": 20.0, "tokens": 256, "seq_len": 32},
        "dense_eval": {"ppl": 10.0, "tokens": 256, "seq_len": 32},
        "shapes": [],
    }
    return {"sparsity": sparsity, "total_removed_share": sparsity / 2, "report": report}


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace the spawned run; the list collects (method, sparsity, settings, batch size) per run."""
    calls = []

    def run_one(cfg, method, sparsity, settings):
        calls.append((method, sparsity, settings, getattr(cfg, "batch_size", None)))
        return _record(sparsity)

    monkeypatch.setattr(compare, "run_one", run_one)
    return calls


def _compare(model, text, res, *extra: str) -> int:
    argv = ["compare", str(model), "--sparsity", "0.3", "--results", str(res), "--device", "cpu"]
    return main([*argv, "--calib", str(text), "--eval", str(text), *SMALL, *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("secateurs:")]
    assert len(ours) == 1 and ours[0].startswith("secateurs: error:") and "Traceback" not in err, err
    return ours[0]


def test_comma_lists_are_swept_and_tuples_are_not(tiny_dir, tmp_path, fake_runs):
    model, text = tiny_dir
    res = tmp_path / "res"
    sweep = ["--methods", "magnitude,bonsai", "--seed", "0,1", "--prune-frac", "0.1,0.2"]
    assert _compare(model, text, res, *sweep, "--units", "attn_group,mlp_channel") == 0
    runs = [(m, s["seed"], s.get("prune_frac")) for m, _, s, _ in fake_runs]
    # magnitude sweeps the seed only (it has no --prune-frac); bonsai the product (settings in name order)
    assert runs == [
        ("magnitude", 0, None),
        ("magnitude", 1, None),
        ("bonsai", 0, 0.1),
        ("bonsai", 1, 0.1),
        ("bonsai", 0, 0.2),
        ("bonsai", 1, 0.2),
    ]
    for _, _, settings, _ in fake_runs:
        assert tuple(settings["units"]) == ("attn_group", "mlp_channel")  # one value, not a sweep
        assert settings["nsamples"] == 4 and settings["eval_tokens"] == 256 and settings["calib"] == str(text)
    rows = json.loads((res / "compare.json").read_text())
    assert [r["swept"] for r in rows][:3] == [{"seed": 0}, {"seed": 1}, {"seed": 0, "prune_frac": 0.1}]
    assert all(r["settings"]["units"] == ["attn_group", "mlp_channel"] for r in rows)
    md = (res / "compare.md").read_text()
    assert "| settings |" in md and "| bonsai | 30% | prune_frac=0.2 seed=1 |" in md
    assert "units=attn_group,mlp_channel" in md  # the settings every run shares, below the table
    # each swept value has its own cache entry: a re-run computes nothing
    fake_runs.clear()
    assert _compare(model, text, res, *sweep, "--units", "attn_group,mlp_channel") == 0
    assert fake_runs == []


def test_seeds_are_summarised_as_mean_and_spread(tiny_dir, tmp_path, monkeypatch):
    model, text = tiny_dir
    ppl = {("magnitude", 0): 20.0, ("magnitude", 1): 24.0, ("magnitude", 2): 22.0, ("random", 0): 40.0}
    ppl |= {("random", 1): 50.0, ("random", 2): 42.0}

    def run_one(cfg, method, sparsity, settings):
        record = _record(sparsity)
        record["report"]["pruned_eval"]["ppl"] = ppl[method, settings["seed"]]
        return record

    monkeypatch.setattr(compare, "run_one", run_one)
    res = tmp_path / "res"
    assert _compare(model, text, res, "--methods", "magnitude,random", "--seed", "0,1,2") == 0
    md = (res / "compare.md").read_text()
    assert "| magnitude | 30% | - | 3 | 22.00 | 20.00-24.00 | 2.00 | 1.000 |" in md
    assert "| random | 30% | - | 3 | 44.00 | 40.00-50.00 | 5.29 | 2.000 |" in md
    # one seed per setting: nothing to summarise
    assert compare.seed_summary(json.loads((res / "compare.json").read_text())[:1]) == ""


def test_every_option_is_forwarded_and_in_the_cache_key(tiny_dir, tmp_path, fake_runs):
    model, text = tiny_dir
    res = tmp_path / "res"
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert len(fake_runs) == 1  # cached
    # options that compare used to drop (not in the key either): each re-runs
    assert _compare(model, text, res, "--methods", "magnitude", "--batch-size", "4") == 0
    assert len(fake_runs) == 2 and fake_runs[-1][3] == 4
    assert _compare(model, text, res, "--methods", "magnitude", "--batch-rows", "2") == 0
    assert len(fake_runs) == 3 and fake_runs[-1][2]["batch_rows"] == 2


def test_a_changed_source_digest_reruns(tiny_dir, tmp_path, fake_runs, monkeypatch):
    model, text = tiny_dir
    res = tmp_path / "res"
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert len(fake_runs) == 1
    monkeypatch.setattr(compare, "source_digest", lambda modules: "changed-code", raising=False)
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert len(fake_runs) == 2


def test_changed_weights_at_the_same_path_rerun(tiny_dir, tmp_path, fake_runs):
    from safetensors.torch import load_file, save_file

    model, text = tiny_dir
    res = tmp_path / "res"
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    for f in model.glob("*.safetensors"):
        save_file({k: v * 1.5 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    assert _compare(model, text, res, "--methods", "magnitude") == 0
    assert len(fake_runs) == 2


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--bogus", "1"], "--bogus"),
        (["--out", "elsewhere"], "--out"),  # a prune option compare has no use for
        (["--estimator", "exact"], "none of the methods magnitude has setting(s) --estimator"),
    ],
)
def test_unknown_options_are_refused_in_one_line(tiny_dir, tmp_path, capsys, fake_runs, extra, named):
    model, text = tiny_dir
    assert _compare(model, text, tmp_path / "res", "--methods", "magnitude", *extra) == 2
    assert named in _one_line_error(capsys)
    assert fake_runs == [] and not (tmp_path / "res").exists()


def test_a_failing_run_is_one_line_naming_method_and_sparsity(tiny_dir, tmp_path, capsys):
    """A real spawned run: the child's error comes back through the pipe as one line."""
    model, text = tiny_dir
    argv = ["--methods", "magnitude", "--units", "attn_group", "--sparsity", "0.9"]
    assert _compare(model, text, tmp_path / "res", *argv) == 2
    line = _one_line_error(capsys)
    assert line.startswith("secateurs: error: magnitude at 0.9: ") and "remove every unit" in line
    assert line.count("error:") == 1  # the child's message, not its whole stderr line


def test_each_run_is_a_spawned_process_calling_run_prune(tiny_dir, tmp_path, capsys):
    """A real run, with a swept data setting: the child honours it (the rows' evaluation tokens)."""
    model, text = tiny_dir
    res = tmp_path / "res"
    argv = ["--methods", "random", "--seed", "0", "--eval-tokens", "256,512"]
    assert _compare(model, text, res, *argv) == 0
    rows = json.loads((res / "compare.json").read_text())
    assert [r["eval_tokens"] for r in rows] == [256, 512]
    assert all(r["peak_rss_mb"] > 0 and r["ppl"] > 0 for r in rows)
    assert "| random | 30% | eval_tokens=512 |" in capsys.readouterr().out  # the table, printed


def test_repair_modes_share_one_search(tiny_dir, tmp_path, monkeypatch):
    """`--reconstruct none,lstsq` runs the method once (one process, the same plan and search time in
    both rows) and finishes it with each repair; `bias` adds biases, so it gets a search of its own."""
    model, text = tiny_dir
    res = tmp_path / "res"
    calls = []
    real = compare.run_group
    monkeypatch.setattr(
        compare, "run_group", lambda cfg, m, s, each: calls.append(len(each)) or real(cfg, m, s, each)
    )
    monkeypatch.setattr(compare, "run_one", lambda cfg, m, s, st: calls.append(1) or real(cfg, m, s, [st])[0])
    assert _compare(model, text, res, "--methods", "wanda-sp", "--reconstruct", "none,lstsq,bias") == 0
    rows = json.loads((res / "compare.json").read_text())
    assert [r["reconstruct"] for r in rows] == ["none", "lstsq", "bias"]
    assert sorted(calls) == [1, 2]
    none, lstsq, bias = rows
    assert none["shapes"] == lstsq["shapes"] and none["time_s"] == lstsq["time_s"]
    assert none["ppl"] != lstsq["ppl"]


def test_tasks_add_accuracy_columns_and_a_picture_and_key_the_cache(
    tiny_dir, tmp_path, fake_runs, monkeypatch
):
    """Canned runs with task figures: one column per task, the dense figure below the table, compare.png;
    a changed task setting is a new run."""
    from helpers_tasks import TASK, write_task

    def with_tasks(cfg, method, sparsity, settings):
        fake_runs.append((method, sparsity, settings, cfg.task_eval))
        record = _record(sparsity)
        figures = {"acc": 0.5 + sparsity, "acc_stderr": 0.1, "acc_norm": 0.4, "samples": 24, "n_shot": 0}
        record["report"]["pruned_tasks"] = {"tasks": {TASK: figures}}
        record["report"]["dense_tasks"] = {"tasks": {TASK: figures | {"acc": 0.9}}}
        return record

    monkeypatch.setattr(compare, "run_one", with_tasks)
    model, text = tiny_dir
    res = tmp_path / "res"
    tasks = ["--tasks", TASK, "--include-path", str(write_task(tmp_path / "tasks"))]
    assert _compare(model, text, res, "--methods", "magnitude,random", *tasks) == 0
    assert [c[3].tasks for c in fake_runs] == [(TASK,), (TASK,)]
    table = (res / "compare.md").read_text()
    assert f"| {TASK} acc |" in table and "| 0.800 ± 0.100 |" in table
    assert f"dense accuracy: {TASK} acc 0.900 ± 0.100" in table
    if plots_available():
        assert (res / "compare.png").is_file()
    assert _compare(model, text, res, "--methods", "magnitude,random", *tasks) == 0
    assert len(fake_runs) == 2  # cached
    assert _compare(model, text, res, "--methods", "magnitude,random", *tasks, "--limit", "3") == 0
    assert len(fake_runs) == 4 and fake_runs[-1][3].limit == 3


def plots_available() -> bool:
    from secateurs.report.plots import available

    return available()


def test_a_spawned_run_scores_the_tasks(tiny_dir, tmp_path, hf_datasets_cache):
    """A real run: the child loads the tasks from the settings it is sent and scores both models."""
    pytest.importorskip("lm_eval")
    from helpers_tasks import TASK, write_task

    model, text = tiny_dir
    res = tmp_path / "res"
    tasks = ["--tasks", TASK, "--include-path", str(write_task(tmp_path / "tasks")), "--limit", "6"]
    assert _compare(model, text, res, "--methods", "magnitude", *tasks) == 0
    (row,) = json.loads((res / "compare.json").read_text())
    assert row["tasks"][TASK]["samples"] == 6 and row["dense_tasks"][TASK]["samples"] == 6


def test_jobs_share_a_search_across_repair_modes_but_not_across_repair_windows():
    """A search that scores sub-models as repaired fits on the repair's windows: jobs that differ in
    the repair's mode share one search, jobs that differ in its windows do not."""
    jobs = [
        compare.Job("policy-gradient", 0.5, {"reconstruct": "none"}),
        compare.Job("policy-gradient", 0.5, {"reconstruct": "lstsq"}),
        compare.Job("policy-gradient", 0.5, {"reconstruct": "lstsq", "reconstruct_nsamples": 64}),
    ]
    assert sorted(compare._search_groups(jobs, [0, 1, 2])) == [[0, 1], [2]]
