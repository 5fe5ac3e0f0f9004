"""Fail before the work, never after it; one line, exit 2; nothing left behind (issue: reliability).

Each test drives the CLI as a user would and asserts the one-line message, the exit code and what is
left on disk (the conftest's litter check covers the working directory)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers_cli import small
from secateurs.cli import main

SMALL = small(nsamples=4)


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("secateurs:")]
    assert len(ours) == 1 and ours[0].startswith("secateurs: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in ours[0], ours[0]
    return ours[0]


def _prune(model, text, out, *extra):
    return main(
        ["prune", str(model), "--calib", str(text), "--eval", str(text), "--out", str(out), *SMALL, *extra]
    )


@pytest.fixture
def mount(tmp_path):
    """Mount a tmpfs (options given) under tmp_path; skipped where the machine does not allow mounting."""
    mounted = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
            )
        except OSError as e:  # no mount binary
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _no_load(monkeypatch):
    """The output checks must come before the (slow) model load."""
    import secateurs.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_read_only_output_fails_before_loading(tiny_dir, mount, monkeypatch, capsys):
    model, text = tiny_dir
    ro = mount("ro", "ro,size=1m")
    _no_load(monkeypatch)
    assert _prune(model, text, ro / "out", "--method", "magnitude") == 2
    _one_line(capsys, "Read-only file system", str(ro / "out"))
    assert list(ro.iterdir()) == []


def test_output_that_is_a_mount_point_fails_before_loading(tiny_dir, mount, monkeypatch, capsys):
    model, text = tiny_dir
    point = mount("mnt", "size=1m")
    _no_load(monkeypatch)
    assert _prune(model, text, point, "--method", "magnitude", "--overwrite") == 2
    _one_line(capsys, "mount point")
    assert not [p for p in point.parent.iterdir() if p.name.startswith(".")] and list(point.iterdir()) == []


def test_too_little_space_fails_before_the_work(tiny_dir, mount, capsys):
    model, text = tiny_dir
    small = mount("small", "size=16k")
    assert _prune(model, text, small / "out", "--method", "magnitude") == 2
    _one_line(capsys, "MB free", "needs about")
    assert list(small.iterdir()) == []


def test_disk_full_during_the_save_keeps_the_plan(tiny_dir, mount, monkeypatch, tmp_path, capsys):
    """The space estimate passed (here: skipped) but the disk filled up during the save: the plan is
    written where it fits and the message says how to redo the save without the search."""
    import secateurs.pipeline as pipeline

    model, text = tiny_dir
    full = mount("full", "size=64k")
    monkeypatch.setattr(pipeline, "check_free_space", lambda *a: None)
    ckpt = tmp_path / "ckpt"
    args = ["--method", "policy-gradient", "--steps", "2", "--samples", "2", "--checkpoint-dir", str(ckpt)]
    assert _prune(model, text, full / "out", *args) == 2
    line = _one_line(capsys, "No space left on device", "secateurs apply")
    rescued = ckpt / "out.plan.json"
    assert str(rescued) in line and json.loads(rescued.read_text())["method"] == "policy-gradient"
    assert list(full.iterdir()) == []
    # the rescued plan redoes the save
    again = tmp_path / "again"
    assert main(["apply", str(model), "--plan", str(rescued), "--out", str(again), "--device", "cpu"]) == 0
    assert (again / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["garbage-json", "foreign-json", "pickled-legacy", "missing-tensors"])
def test_damaged_or_foreign_checkpoint_is_one_line(tiny_dir, tmp_path, capsys, damage):
    model, text = tiny_dir
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if damage == "garbage-json":
        (ckpt / "state.json").write_text("{not json")
    elif damage == "foreign-json":
        (ckpt / "state.json").write_text(json.dumps({"tensors": "x.safetensors", "state": {}}))
        (ckpt / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    elif damage == "pickled-legacy":
        (ckpt / "state.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: never unpickled
    else:
        (ckpt / "state.json").write_text(json.dumps({"tensors": "gone.safetensors", "state": {}}))
    args = [
        "--method",
        "policy-gradient",
        "--steps",
        "2",
        "--samples",
        "2",
        "--checkpoint-dir",
        str(ckpt),
        "--resume",
    ]
    assert _prune(model, text, tmp_path / "out", *args) == 2
    _one_line(capsys, str(ckpt))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["bonsai", "policy-gradient"])
def test_checkpoint_hygiene_is_one_rule(tiny_dir, tmp_path, capsys, method):
    model, text = tiny_dir
    ckpt = tmp_path / "ckpt"
    budget = (
        ["--masks-per-round", "4", "--eval-windows", "2", "--prune-frac", "0.3"]
        if method == "bonsai"
        else ["--steps", "2", "--samples", "2"]
    )
    base = ["--method", method, "--sparsity", "0.3", "--checkpoint-dir", str(ckpt), *budget]
    # --resume on an empty directory is an error, not a fresh start
    ckpt.mkdir()
    assert _prune(model, text, tmp_path / "a", *base, "--resume") == 2
    _one_line(capsys, "holds no checkpoint")
    assert _prune(model, text, tmp_path / "a", *base) == 0
    capsys.readouterr()
    state = (ckpt / "state.json").read_text()
    # a new run into the same directory without --resume refuses, and leaves the checkpoint alone
    assert _prune(model, text, tmp_path / "b", *base) == 2
    _one_line(capsys, "already holds a checkpoint", "--resume", "--overwrite")
    assert (ckpt / "state.json").read_text() == state and not (tmp_path / "b").exists()
    # --overwrite starts over
    assert _prune(model, text, tmp_path / "b", *base, "--overwrite") == 0


def test_plan_with_wrong_types_is_one_line(tiny_dir, tmp_path, capsys):
    model, _ = tiny_dir
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"method": "manual", "layers": [{"keep_channels": "all"}] * 4}))
    assert (
        main(["apply", str(model), "--plan", str(plan), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    )
    _one_line(capsys, "keep_channels", "list of unit indices")
    assert not (tmp_path / "o").exists()


def test_sequence_longer_than_the_context_is_refused(tiny_dir, tmp_path, capsys):
    model, text = tiny_dir  # tiny models have max_position_embeddings 128
    assert main(["eval", str(model), "--data", str(text), "--seq-len", "200", "--eval-tokens", "400"]) == 2
    line = _one_line(capsys, "--seq-len 200", "context (128 tokens)", "--allow-long-context")
    assert "--eval-seq-len" not in line  # eval's own name for its window length
    long = ["--seq-len", "200", "--eval-tokens", "400", "--allow-long-context"]
    assert main(["eval", str(model), "--data", str(text), *long]) == 0


def test_io_error_is_one_line_and_debug_shows_the_traceback(tiny_dir, tmp_path, capsys, monkeypatch):
    model, text = tiny_dir
    import secateurs.pipeline as pipeline

    def broken(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(pipeline, "calibration_windows", broken)
    assert _prune(model, text, tmp_path / "out", "--method", "magnitude") == 2
    _one_line(capsys, "Permission denied", str(tmp_path / "x"))
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["text.txt", "tiny"]
    monkeypatch.setenv("SECATEURS_DEBUG", "1")
    with pytest.raises(PermissionError):
        _prune(model, text, tmp_path / "out", "--method", "magnitude")
