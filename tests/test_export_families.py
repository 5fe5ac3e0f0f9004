"""Families no export target was checked against are refused by name, before anything is written."""

import pytest

import secateurs
from secateurs.export import ExportError
from secateurs.testing import random_plan, tiny_model, uniform_plan
from secateurs.units.space import UnitSpace

UNCHECKED = ("gemma2", "gemma3", "olmo2", "granite", "phi3")


@pytest.mark.parametrize("target", ["gguf", "vllm"])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("family", UNCHECKED)
def test_export_refuses_unchecked_families(family, uniform, target, tmp_path):
    model = tiny_model(family)
    space = UnitSpace.from_model(model)
    plan = uniform_plan(space, groups=1, channels=20) if uniform else random_plan(space, seed=1)
    secateurs.apply_plan_(model, plan)
    secateurs.save(model, tmp_path / "src", plan)
    out = tmp_path / ("out.gguf" if target == "gguf" else "out")
    with pytest.raises(ExportError, match=family):
        secateurs.export(tmp_path / "src", target, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
