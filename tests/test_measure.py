"""Speed measurement: prefill and decode through the current transformers API, for stock and saved models."""

import copy
import mmap
import warnings

import pytest

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


def test_peaks_are_per_phase_and_nested_blocks_keep_theirs():
    from secateurs.eval.measure import _reset_peak_rss, measure, peak_rss_mb

    if not _reset_peak_rss():
        pytest.skip("this kernel cannot restart the peak RSS")
    base = peak_rss_mb()
    with measure() as outer:
        with measure() as inner:
            blob = mmap.mmap(-1, 200 * 2**20)  # 200 MB of fresh pages (not the allocator's free ones)
            for i in range(0, len(blob), mmap.PAGESIZE):
                blob[i] = 1
            blob.close()
        with measure() as later:
            pass
    assert inner.peak_rss_mb > base + 150
    assert later.peak_rss_mb < inner.peak_rss_mb - 150  # its own peak, not the process's
    assert outer.peak_rss_mb >= inner.peak_rss_mb  # the inner block's reset did not lose it
