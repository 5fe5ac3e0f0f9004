"""lm-eval on the real default model (SmolLM2-135M, its byte-level BPE tokenizer, transformers 5), dense
and pruned with per-layer shapes: the harness's accuracy equals the one worked out from the model's own
log-likelihoods, and the pruned figure is the saved model's."""

import json

import pytest

from helpers_tasks import FACTS, TASK, by_hand, write_task
from secateurs.cli import main
from secateurs.surgery.saving import load_pruned

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")


def test_default_model_dense_and_pruned_accuracy_by_hand(tmp_path, hf_datasets_cache):
    from secateurs.models.loading import load_model

    folder = write_task(tmp_path / "tasks")
    out = tmp_path / "pruned"
    argv = ["prune", "default", "--method", "flap", "--sparsity", "0.3", "--out", str(out), "--no-eval"]
    argv += ["--nsamples", "8", "--seq-len", "64", "--reconstruct", "none", "--device", "cpu"]
    assert main([*argv, "--tasks", TASK, "--include-path", str(folder)]) == 0
    assert (out / "modeling_secateurs.py").is_file()  # per-layer shapes: the heterogeneous model path
    record = json.loads((out / "plan.json").read_text())["report"]
    dense, pruned = record["dense_tasks"]["tasks"][TASK], record["pruned_tasks"]["tasks"][TASK]
    model, tok = load_model("default", device="cpu")
    want = by_hand(model, tok, FACTS)
    assert dense["acc"] == want["acc"] and dense["acc_norm"] == want["acc_norm"]
    assert dense["acc"] > 0.5  # 24 easy facts, three endings each: far above chance (1/3) for SmolLM2
    del model
    model, tok = load_pruned(out)
    want = by_hand(model, tok, FACTS)
    assert pruned["acc"] == want["acc"] and pruned["acc_norm"] == want["acc_norm"]
