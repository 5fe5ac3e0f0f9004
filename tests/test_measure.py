"""Speed measurement: prefill and decode through the current transformers API, for stock and saved models."""

import copy
import warnings

import secateurs
from secateurs.eval.measure import bench_speed
from secateurs.testing import random_plan, tiny_model
from secateurs.units.space import UnitSpace


def test_bench_uses_no_deprecated_api_for_stock_and_saved_models(tmp_path):
    """transformers 5.24 deprecates `past_key_values` (removed in 5.40); a FutureWarning here means the
    bench (or the saved modelling file) will break on a transformers release the pin allows."""
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    plan = random_plan(UnitSpace.from_model(pruned), seed=0)
    secateurs.apply_plan_(pruned, plan)
    secateurs.save(pruned, tmp_path / "p", plan)
    loaded, _ = secateurs.load(tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        r = bench_speed({"dense": dense, "pruned": loaded}, prompt_len=8, new_tokens=3, repeats=1)
    for name in ("dense", "pruned"):
        assert r[name]["prefill_tok_s"] > 0 and r[name]["decode_tok_s"] > 0
    assert r["pruned"]["macs_per_token"] < r["dense"]["macs_per_token"]
