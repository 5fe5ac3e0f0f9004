"""Data-parallel workers: 2 and 3 gloo ranks give the plans, and the very losses, of one process, each
rank doing a disjoint share; a killed worker stops the run with a clear error, nothing half-written,
and `--resume` (under torchrun) finishes it with the plan of an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers_cli import small
from helpers_dist import SEARCHES, search_all, spawn_ranks
from secateurs import distributed
from secateurs.checkpoint import load_state
from secateurs.cli import main
from secateurs.errors import WorkerError
from secateurs.scoring.stats import Moments


@pytest.fixture(scope="module")
def single():
    return search_all()


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request):
    names = SEARCHES if request.param == 2 else ("bonsai",)  # 3 ranks: the longest search only
    return request.param, spawn_ranks(request.param, names)


@pytest.mark.parametrize("name", SEARCHES)
def test_ranks_give_the_plan_and_losses_of_one_process(single, ranks, name):
    world, records = ranks
    if name not in records[0]:
        pytest.skip(f"{world} ranks run bonsai only")
    one = single[name]
    for r in records:
        assert r[name]["plan"] == one["plan"]
        assert r[name]["losses"] == one["losses"]  # every loss, bit for bit, on every rank


@pytest.mark.parametrize("name", SEARCHES)
def test_each_rank_does_a_disjoint_share(single, ranks, name):
    """The gather sums the ranks' shares: a micro-batch two ranks computed would come back doubled and one
    nobody computed as zero, so equal losses (above) and counts that add up mean disjoint and complete."""
    world, records = ranks
    if name not in records[0]:
        pytest.skip(f"{world} ranks run bonsai only")
    one = single[name]
    local = [r[name]["local_forwards"] for r in records]
    decoder = [r[name]["decoder_forwards"] for r in records]
    assert all(r[name]["forwards"] == one["forwards"] for r in records)  # the global count is the same
    assert sum(local) == one["local_forwards"] == one["forwards"]
    # The policy gradient's repair bank (`sample_repair` lstsq) makes its one dense pass on every rank,
    # like the repair: 8 calibration windows in batches of 2 rows, so 4 decoder forwards per extra rank.
    repeated = (world - 1) * 4 if name == "policy-gradient" else 0
    assert sum(decoder) == one["decoder_forwards"] + repeated
    assert all(d > 0 for d in decoder)  # everybody worked
    if name != "wanda-sp":
        assert all(n > 0 for n in local)
        assert max(local) - min(local) <= one["forwards"] // 2  # round robin, per call


def test_moments_merged_in_batch_order_equal_one_stream():
    x = torch.randn(40, 5, dtype=torch.float64)
    whole = Moments().update(x[:10]).update(x[10:25]).update(x[25:])
    parts = [Moments().update(x[:10]), Moments().update(x[10:25]), Moments().update(x[25:])]
    merged = Moments()
    for p in parts:
        merged.merge(p)
    assert merged.count == whole.count
    assert torch.equal(merged.mean, whole.mean) and torch.equal(merged.m2, whole.m2)


def test_one_process_needs_no_group():
    t = torch.tensor([1.0, 2.0])
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_disjoint(t) is t
    assert list(distributed.my_share(3)) == [0, 1, 2]
    assert distributed.on_main(lambda: 7) == 7


def test_launch_names_the_worker_that_died(tmp_path, monkeypatch):
    """`launch` itself, on a command line whose rank 1 kills itself: one line names it and how."""
    monkeypatch.setattr(distributed, "SETTLE_S", 0.5)
    script = tmp_path / "fake.py"
    script.write_text(
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 1 was killed by SIGKILL; stopped worker\(s\) 0"):
        distributed.launch([], 2, command=[sys.executable, str(script)])
    assert time.monotonic() - t0 < 30


def _prune_args(tiny_dir, out, ck, *extra):
    path, text = tiny_dir
    return [
        "prune", str(path), "--method", "policy-gradient", "--sparsity", "0.3", "--out", str(out),
        "--calib", str(text), "--eval", str(text), *small(nsamples=8), "--steps", "150",
        "--samples", "4", "--batch-rows", "2", "--split-len", "0", "--checkpoint-dir", str(ck),
        "--checkpoint-every", "5", "--no-eval", *extra,
    ]  # fmt: skip


def _env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.environ | {
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        distributed.TIMEOUT_ENV: "60",
    }


def _rank(proc: psutil.Process, rank: str) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in proc.children():
            try:
                if child.environ().get("RANK") == rank:
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank}")


def test_killed_worker_stops_the_run_and_resume_finishes_it(tiny_dir, tmp_path, capsys):
    out, ck = tmp_path / "out", tmp_path / "ck"
    cmd = [sys.executable, "-m", "secateurs", "-q", *_prune_args(tiny_dir, out, ck, "--workers", "2")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _rank(psutil.Process(proc.pid), "1")
    deadline = time.monotonic() + 240
    while not (ck / "state.json").is_file():  # mid-run: after the first checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # well within the collective timeout
    assert proc.returncode == 2
    assert "worker 1 was killed by SIGKILL" in err, err
    assert "Traceback" not in err.split("worker 1 was killed")[-1]
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers
    step = load_state(ck)["state"]["step"]
    assert 0 < step < 150

    # resume under torchrun, 2 ranks; the plan equals an uninterrupted run's (1 process, same seed)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    args = _prune_args(tiny_dir, out, ck, "--resume")
    run = subprocess.run(
        [str(torchrun if torchrun.exists() else "torchrun"), "--nproc-per-node", "2", "-m", "secateurs", "-q", *args],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1  # rank 0 alone reports
    assert main(["-q", *_prune_args(tiny_dir, tmp_path / "ref", tmp_path / "ck-ref")]) == 0
    capsys.readouterr()
    resumed = json.loads((out / "plan.json").read_text())
    reference = json.loads((tmp_path / "ref" / "plan.json").read_text())
    assert resumed["layers"] == reference["layers"]
    assert resumed["info"]["probabilities"] == reference["info"]["probabilities"]
