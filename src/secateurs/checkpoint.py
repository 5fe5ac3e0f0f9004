"""Checkpoints for long runs: one file per run state, replaced atomically after every round or step.

A killed run leaves either the previous checkpoint or the new one, never a torn file; `--resume` loads it
and continues to the same result as an uninterrupted run with the same seed (the state includes RNGs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when the directory holds no checkpoint yet."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)
