"""The benchmark scripts run (tiny shapes, on the CPU) and print their tables; their figures are not
asserted."""

import importlib.util
from pathlib import Path

import pytest
import transformers

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_with_tiny_shapes(capsys):
    assert (
        _script("gpu_check").main(
            ["--tiny", "--device", "cpu", "--nsamples", "8", "--seq-len", "32", "--masks-per-round", "8"]
        )
        == 0
    )
    out = capsys.readouterr().out
    for model in ("llama-3-8b", "qwen2.5-7b"):
        for phase in ("policy-gradient", "bonsai round", "repair of 2 layers"):
            assert any(model in line and phase in line for line in out.splitlines()), (model, phase)


def test_gpu_check_refuses_real_shapes_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _script("gpu_check").main(["--device", "cpu"]) == 2
    assert "use --tiny" in capsys.readouterr().err


def test_proxy_fidelity_scores_the_shapes_of_compare_runs(tiny_dir, tmp_path, capsys):
    """Each compare run's shape and a metric method's own get a proxy figure beside the real one; the
    shape that keeps everything scores as the dense model on the same windows."""
    import json

    from secateurs.testing import tiny_model
    from secateurs.units.space import UnitSpace

    path, text = tiny_dir
    space = UnitSpace.from_model(tiny_model("llama", vocab_size=128))
    full = [
        {"layer": i, "groups": lu.n_groups, "channels": lu.n_channels} for i, lu in enumerate(space.layers)
    ]
    half = [s | {"groups": 1, "channels": s["channels"] // 2} for s in full]
    rows = [
        {"method": m, "target": 0.3, "settings": {"seed": 0}, "ppl": ppl, "shapes": sh}
        for m, ppl, sh in (("keep-all", 9.0, full), ("halved", 12.0, half))
    ]
    res = tmp_path / "res"
    res.mkdir()
    (res / "compare.json").write_text(json.dumps(rows))
    argv = [str(res), "--model", str(path), "--text", str(text), "--nsamples", "4", "--seq-len", "16"]
    argv += ["--eval-seq-len", "32", "--heldout", "4", "--methods", "wanda-sp", "--bank-windows", "search"]
    assert _script("proxy_fidelity").main(argv) == 0
    lines = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |")]
    assert [cells[2].strip() for cells in lines] == ["keep-all", "halved", "wanda-sp"]
    keep_all, halved = (float(cells[5]) for cells in lines[:2])
    from helpers_tokenizer import tiny_tokenizer
    from secateurs.eval.loss import SubmodelEvaluator
    from secateurs.pipeline import DataConfig, calibration_windows

    data = DataConfig(calib=str(text), eval=str(text), nsamples=4, seq_len=16)
    dense = transformers.AutoModelForCausalLM.from_pretrained(path)
    want = float(SubmodelEvaluator(dense, calibration_windows(tiny_tokenizer(), data)).losses().exp())
    assert keep_all == pytest.approx(want, abs=0.01)
    assert halved != keep_all
    assert lines[2][4].strip() == "nan"  # a metric method's real figure is not measured here
