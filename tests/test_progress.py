"""Long phases report progress and ETA in logs when stderr is not a terminal."""

import logging

import pytest
import torch

from secateurs import progress as progress_module
from secateurs.methods.policy_gradient import PolicyGradient, PolicyGradientConfig
from secateurs.testing import tiny_model
from secateurs.units.space import UnitSpace


@pytest.mark.parametrize("interval", [0.0, 1000.0])
def test_policy_gradient_progress_reaches_a_log_file(monkeypatch, caplog, interval):
    """The 57-minute phase used to print nothing between start and end when logging to a file; and a
    log gets a line per interval, not one per step."""
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", interval)
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = PolicyGradientConfig(sparsity=0.3, steps=3, samples=2, init="uniform")
    with caplog.at_level(logging.INFO, logger="secateurs.progress"):
        PolicyGradient(cfg).plan(model, UnitSpace.from_model(model), calib)
    lines = [r.getMessage() for r in caplog.records if r.name == "secateurs.progress"]
    steps = [line for line in lines if line.startswith("policy-gradient")]
    assert any("3/3" in line for line in steps), lines
    assert any("<" in line and "step" in line for line in steps), lines  # elapsed<remaining, rate
    if interval:
        assert len(steps) <= 2, lines  # the start and the end
