"""Calibration and evaluation text: where it comes from (`text`) and how it becomes token windows (`windows`)."""

from secateurs.data.text import SOURCES, cache_dir, describe_split, load_documents
from secateurs.data.windows import eval_windows, sample_windows, token_stream

__all__ = [
    "SOURCES",
    "cache_dir",
    "describe_split",
    "eval_windows",
    "load_documents",
    "sample_windows",
    "token_stream",
]
