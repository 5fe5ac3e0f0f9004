"""Calibration and evaluation text as lists of documents, from a handful of named or local sources.

Sources (the ``source`` argument of :func:`load_documents`):

``"default"``
    The 106 English Wikipedia articles shipped with gensim 4.4.0 (CC BY-SA), cleaned with gensim's own
    wiki utilities. One document per article. Split by article: see :data:`DEFAULT_SPLIT_RULE`.
``path/to/file.txt``
    One document per part. Paragraphs are blank-line separated; the first 75% of paragraphs (by count)
    are calibration, the last 25% evaluation (at least one paragraph each).
``path/to/file.jsonl``
    One JSON object per line with the text under ``text_field``; one document per record; the first 75%
    of records are calibration, the last 25% evaluation.
``"wikitext2"`` / ``"c4"``
    The usual sets, through the optional ``datasets`` package (needs internet or a local HF cache).

``split`` is ``"calib"``, ``"eval"`` or ``"all"`` (everything; for when calibration and evaluation come
from different sources). Calibration and evaluation parts of one source never overlap.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path

from secateurs.errors import ConfigError, DataError
from secateurs.io import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("calib", "eval", "all")
SOURCES = ("default", "wikitext2", "c4", "<file>.txt", "<file>.jsonl")
EVAL_FRACTION = 0.25  # of paragraphs (.txt) / records (.jsonl); the default text uses DEFAULT_EVAL_EVERY

# -- default text: gensim's Wikipedia sample ------------------------------------------------------------
GENSIM_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_EVAL_EVERY = 4  # every 4th article (sorted by title) is evaluation text
DEFAULT_EVAL_OFFSET = 1  # which of the 4: offset 1 gives eval 25% of SmolLM2 tokens (0: 28%, 2: 26%, 3: 20%)
DEFAULT_SPLIT_RULE = (
    "gensim 4.4.0 enwiki sample, split by article: articles sorted by title, "
    f"index % {DEFAULT_EVAL_EVERY} == {DEFAULT_EVAL_OFFSET} -> eval, others -> calib"
)
CLEANING_VERSION = 1  # bump when the cleaning rules below change; it names the cache file
MIN_LINE_WORDS = 5  # shorter lines are headings, captions, empty list items or template debris
MIN_ARTICLE_WORDS = 50  # stubs and disambiguation pages that survive cleaning with almost nothing left
# Sections from these headings on are reference lists, not prose.
END_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "notes and references",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
    }
)

_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])")
_REPEATED_PUNCT = re.compile(r"([,;])(\s*[,;])+")


def cache_dir() -> Path:
    """``$SECATEURS_CACHE`` if set, else ``~/.cache/secateurs``. Not created here."""
    env = os.environ.get("SECATEURS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "secateurs"


def describe_split(source: str = "default") -> str:
    """One line saying how `source` is split into calibration and evaluation parts, for reports."""
    if source == "default":
        return DEFAULT_SPLIT_RULE
    if source == "wikitext2":
        return "wikitext-2-raw-v1: train -> calib, test -> eval"
    if source == "c4":
        return (
            f"allenai/c4 en: first {C4_CALIB_DOCS} documents of train shard 00000 -> calib, "
            f"first {C4_EVAL_DOCS} of validation shard 00000 -> eval"
        )
    unit = "records" if source.endswith(".jsonl") else "paragraphs"
    pct = round(100 * (1 - EVAL_FRACTION))
    return f"{source}: first {pct}% of {unit} -> calib, last {100 - pct}% -> eval"


def clean_wiki_article(raw: str) -> str:
    """Wiki markup -> plain prose: gensim's `filter_wiki`, then drop reference sections, headings, short
    lines and leftover ``'''``/``''`` markup, and collapse whitespace. Paragraphs are joined by newlines."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for line in filter_wiki(raw).splitlines():
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in END_SECTIONS:
                break
            continue
        line = line.replace("'''", "").replace("''", "")
        line = line.lstrip("*#:;| ")
        line = _EMPTY_PARENS.sub("", line)
        line = " ".join(line.split())
        line = _REPEATED_PUNCT.sub(r"\1", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        if len(line.split()) >= MIN_LINE_WORDS:
            lines.append(line)
    return "\n".join(lines)


def _gensim_wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default text needs gensim; run: pip install gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / GENSIM_WIKI_FILE
    if not path.is_file():
        raise DataError(f"the default text file is missing from the gensim install: {path}")
    return path


def _parse_default_articles(path: Path) -> list[dict[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(path, "rb") as f:
        for title, raw, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not raw or raw.lstrip().lower().startswith("#redirect") or "(disambiguation)" in title:
                continue
            text = clean_wiki_article(raw)
            if len(text.split()) >= MIN_ARTICLE_WORDS:
                articles.append({"title": title, "text": text})
    articles.sort(key=lambda a: a["title"])
    return articles


def default_articles() -> list[dict[str, str]]:
    """All cleaned default articles as ``{"title", "text"}``, sorted by title; cached as JSON on disk.
    With data-parallel workers, rank 0 reads (or builds and caches) them and sends them to the others."""
    from secateurs import distributed

    return distributed.on_main(_default_articles, "reading the default text")


def _default_articles() -> list[dict[str, str]]:
    path = cache_dir() / "text" / f"gensim-4.4.0-enwiki-clean-v{CLEANING_VERSION}.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["articles"]
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: rebuild it
    articles = _parse_default_articles(_gensim_wiki_path())
    if not articles:
        raise DataError("no articles survived cleaning the default text")
    atomic_write_json(path, {"rule": DEFAULT_SPLIT_RULE, "articles": articles})
    log.info("cached %d cleaned default articles at %s", len(articles), path)
    return articles


def default_split_articles(split: str) -> list[dict[str, str]]:
    """The default articles of one split (see :data:`DEFAULT_SPLIT_RULE`), with titles."""
    _check_split(split)
    articles = default_articles()
    if split == "all":
        return articles
    want_eval = split == "eval"
    return [a for i, a in enumerate(articles) if (i % DEFAULT_EVAL_EVERY == DEFAULT_EVAL_OFFSET) == want_eval]


# -- local files -------------------------------------------------------------------------------------
def _split_sequence(items: list, split: str, what: str, source: str) -> list:
    """First 75% -> calib, last 25% -> eval, each part at least one item."""
    if split == "all":
        return items
    if len(items) < 2:
        raise DataError(
            f"{source} has {len(items)} {what}; splitting into calib/eval needs at least 2. "
            "Give separate files for calibration and evaluation (split 'all')"
        )
    n_eval = min(len(items) - 1, max(1, math.ceil(len(items) * EVAL_FRACTION)))
    cut = len(items) - n_eval
    return items[:cut] if split == "calib" else items[cut:]


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from exc


def _load_txt(path: Path, split: str) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", _read_text_file(path))]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise DataError(f"text file {path} is empty")
    return ["\n\n".join(_split_sequence(paragraphs, split, "paragraphs", str(path)))]


def _load_jsonl(path: Path, split: str, text_field: str) -> list[str]:
    records = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{path} line {lineno}: no field {text_field!r} (use --text-field to choose one)")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path} line {lineno}: field {text_field!r} is {type(text).__name__}, not text")
        if text.strip():
            records.append(text)
    if not records:
        raise DataError(f"{path} holds no text in field {text_field!r}")
    return _split_sequence(records, split, "records", str(path))


# -- hub datasets (optional `datasets`) --------------------------------------------------------------
C4_CALIB_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_EVAL_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_CALIB_DOCS = 5000  # ~2M tokens: far more than any calibration set needs; streamed, not downloaded whole
C4_EVAL_DOCS = 1100  # the first 1100 validation documents, as in SparseGPT/Wanda's C4 perplexity


def _load_datasets_module():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "sources 'wikitext2' and 'c4' need the optional package datasets: pip install 'secateurs[datasets]'"
        ) from None
    return datasets


def _hub_failure(name: str, exc: Exception) -> DataError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(
        f"cannot load {name} through `datasets`; it needs internet access or a local copy in the HF cache "
        f"(or pass a local .txt/.jsonl file instead): {type(exc).__name__}: {reason}"
    )


def _load_wikitext2(split: str) -> list[str]:
    datasets = _load_datasets_module()
    parts = {"calib": ["train"], "eval": ["test"], "all": ["train", "test"]}[split]
    docs = []
    try:
        for part in parts:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=part)
            docs.append("\n\n".join(ds["text"]))  # the customary whole-split join used for perplexity
    except Exception as exc:  # noqa: BLE001 - network, cache and format errors all mean "not available"
        raise _hub_failure("wikitext-2-raw-v1", exc) from exc
    return docs


def _load_c4(split: str) -> list[str]:
    datasets = _load_datasets_module()
    parts = {"calib": ["calib"], "eval": ["eval"], "all": ["calib", "eval"]}[split]
    docs = []
    try:
        for part in parts:
            file, n = (C4_CALIB_FILE, C4_CALIB_DOCS) if part == "calib" else (C4_EVAL_FILE, C4_EVAL_DOCS)
            ds = datasets.load_dataset("allenai/c4", data_files={"data": file}, split="data", streaming=True)
            docs.extend(row["text"] for row in ds.take(n))
    except Exception as exc:  # noqa: BLE001
        raise _hub_failure("allenai/c4", exc) from exc
    return docs


# -- entry point -------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def load_documents(source: str, split: str, text_field: str = "text") -> list[str]:
    """Documents of one split of a text source (see the module docstring).

    >>> docs = load_documents("default", "eval")  # doctest: +SKIP
    """
    _check_split(split)
    if source == "default":
        docs = [a["text"] for a in default_split_articles(split)]
    elif source == "wikitext2":
        docs = _load_wikitext2(split)
    elif source == "c4":
        docs = _load_c4(split)
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = _load_txt(path, split)
        elif suffix == ".jsonl":
            docs = _load_jsonl(path, split, text_field)
        elif not path.exists():
            raise DataError(
                f"text source {source!r} is not a file; use 'default', 'wikitext2', 'c4', a .txt or a .jsonl"
            )
        else:
            raise DataError(f"text file {source!r} has an unsupported extension; use .txt or .jsonl")
    if not any(d.strip() for d in docs):
        raise DataError(f"text source {source!r} ({split}) holds no text")
    return docs


def fingerprint(docs: list[str]) -> str:
    """A short content hash of a document list (for caches)."""
    h = hashlib.sha1()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
