"""The benchmark scripts run (tiny shapes, on the CPU) and print their tables; their figures are not
asserted."""

import importlib.util
from pathlib import Path

import pytest

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
