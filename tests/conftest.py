import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_and_no_litter(request, tmp_path_factory, monkeypatch):
    """Point the cache at a temp dir (slow tests keep the real one, so the default model converts once),
    and fail a test that leaves files behind in the working directory."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path_factory.mktemp("cache")))
    before = set(os.listdir(Path.cwd()))
    yield
    left = set(os.listdir(Path.cwd())) - before
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
