import json

import pytest
import torch

from helpers_tokenizer import tiny_tokenizer
from secateurs.data import describe_split, eval_windows, load_documents, sample_windows
from secateurs.data.text import default_articles, default_split_articles
from secateurs.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def txt_file(tmp_path):
    paragraphs = [f"Paragraph {i}: some words about topic {i} and more." for i in range(8)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path, paragraphs


# -- sources -----------------------------------------------------------------------------------------
def test_txt_split_is_75_25_and_disjoint(txt_file):
    path, paragraphs = txt_file
    calib = load_documents(str(path), "calib")
    evald = load_documents(str(path), "eval")
    everything = load_documents(str(path), "all")
    assert calib == ["\n\n".join(paragraphs[:6])]
    assert evald == ["\n\n".join(paragraphs[6:])]
    assert everything == ["\n\n".join(paragraphs)]


def test_jsonl_records_and_split(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": f"record number {i}", "id": i} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(str(path), "calib", text_field="body") == [f"record number {i}" for i in range(3)]
    assert load_documents(str(path), "eval", text_field="body") == ["record number 3"]
    assert len(load_documents(str(path), "all", text_field="body")) == 4


def test_jsonl_missing_field_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"other": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2.*'text'"):
        load_documents(str(path), "all")


def test_jsonl_bad_json_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 3.*not valid JSON"):
        load_documents(str(path), "all")


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        load_documents(str(path), "calib")
    with pytest.raises(DataError, match="nope.jsonl"):
        load_documents(str(tmp_path / "nope.jsonl"), "calib")


def test_empty_text(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_documents(str(path), "all")


def test_single_paragraph_cannot_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only one paragraph here", encoding="utf-8")
    assert load_documents(str(path), "all") == ["only one paragraph here"]
    with pytest.raises(DataError, match="at least 2"):
        load_documents(str(path), "eval")


def test_unknown_split_and_source(tmp_path):
    with pytest.raises(ConfigError):
        load_documents("default", "train")
    with pytest.raises(DataError):
        load_documents("no-such-source", "calib")


def test_hub_sources_fail_clearly_without_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="datasets"):
            load_documents("wikitext2", "eval")
    else:
        pytest.skip("datasets is installed; the offline failure path needs the network to be absent")


# -- windows -----------------------------------------------------------------------------------------
def test_sample_windows_seeded_and_nonoverlapping(tok):
    docs = ["".join(chr(ord("a") + (i * 7 + j) % 26) for j in range(300)) for i in range(5)]
    a = sample_windows(tok, docs, n=6, seq_len=50, seed=0)
    b = sample_windows(tok, docs, n=6, seq_len=50, seed=0)
    c = sample_windows(tok, docs, n=6, seq_len=50, seed=1)
    assert a.shape == (6, 50) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_windows_exact_fit_uses_every_token_once(tok):
    docs = ["abcdefghij" * 3]  # 30 tokens, character level
    w = sample_windows(tok, docs, n=3, seq_len=10, seed=3)
    assert sorted(w.flatten().tolist()) == sorted(tok(docs[0], add_special_tokens=False)["input_ids"])


def test_stream_puts_eos_between_documents(tok):
    w = eval_windows(tok, ["ab", "cd"], seq_len=5)
    ids = tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids += tok("cd", add_special_tokens=False)["input_ids"]
    assert w.tolist() == [ids]


def test_too_short_text(tok):
    with pytest.raises(DataError, match="need 100 tokens.*only 26"):
        sample_windows(tok, ["abcdefghijklmnopqrstuvwxyz"], n=2, seq_len=50, seed=0)
    with pytest.raises(DataError, match="only 26"):
        eval_windows(tok, ["abcdefghijklmnopqrstuvwxyz"], seq_len=50)


def test_bad_window_shapes(tok):
    with pytest.raises(DataError):
        sample_windows(tok, ["abc" * 10], n=0, seq_len=4, seed=0)
    with pytest.raises(DataError):
        sample_windows(tok, ["abc" * 10], n=1, seq_len=1, seed=0)
    with pytest.raises(DataError):
        eval_windows(tok, ["abc" * 10], seq_len=1)


def test_eval_windows_count_and_contiguity(tok):
    text = "the quick brown fox jumps over the lazy dog. " * 20  # 900 characters
    stream = tok(text, add_special_tokens=False)["input_ids"]
    w = eval_windows(tok, [text], seq_len=64, max_tokens=512)
    assert w.shape == (8, 64)
    assert w.flatten().tolist() == stream[: 8 * 64]
    assert eval_windows(tok, [text], seq_len=64, max_tokens=10).shape == (1, 64)  # at least one
    assert eval_windows(tok, [text], seq_len=64, max_tokens=10**6).shape == (900 // 64, 64)  # as many as fit


# -- the default text (gensim's Wikipedia sample) -------------------------------------------------------
@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("SECATEURS_CACHE", str(cache))
    yield cache
    mp.undo()


def test_default_split_disjoint_and_nontrivial(default_cache):
    calib = default_split_articles("calib")
    evald = default_split_articles("eval")
    everything = default_articles()
    titles_c, titles_e = {a["title"] for a in calib}, {a["title"] for a in evald}
    assert not titles_c & titles_e
    assert titles_c | titles_e == {a["title"] for a in everything}
    assert not {a["text"] for a in calib} & {a["text"] for a in evald}
    words_c = sum(len(a["text"].split()) for a in calib)
    words_e = sum(len(a["text"].split()) for a in evald)
    assert len(evald) >= 20 and len(calib) >= 60
    assert 0.15 < words_e / (words_c + words_e) < 0.35
    assert words_e > 30_000  # > ~40k tokens
    assert load_documents("default", "eval") == [a["text"] for a in evald]
    assert "'''" not in "".join(a["text"] for a in everything)
    assert "Anarchism" in titles_c | titles_e
    assert "sorted by title" in describe_split("default")


def test_default_text_cached_as_json(default_cache):
    default_articles()
    files = list((default_cache / "text").glob("*.json"))
    assert len(files) == 1
    assert not list((default_cache / "text").glob(".*tmp"))  # written atomically, no leftovers
    cached = json.loads(files[0].read_text(encoding="utf-8"))["articles"]
    assert cached == default_articles()


def test_eval_command_scores_only_the_held_out_part_of_a_file(tiny_dir, capsys):
    """`secateurs eval --data FILE` must not score the part of FILE that `prune --calib FILE` fits on."""
    from transformers import AutoTokenizer

    from secateurs.cli import main
    from secateurs.data import token_stream

    model, text = tiny_dir
    seq = 16
    assert (
        main(
            [
                "eval",
                str(model),
                "--data",
                str(text),
                "--seq-len",
                str(seq),
                "--eval-tokens",
                "100000",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(model)
    held_out = token_stream(tok, load_documents(str(text), "eval")).numel()
    assert result["tokens"] == held_out // seq * seq
