"""Checkpoints for long runs, one rule for every iterative method (Bonsai, the policy gradient).

A checkpoint is `state.json` (everything but tensors) plus one safetensors file of tensors that it
names. Nothing is pickled: a checkpoint is a user's file, and `torch.load(weights_only=False)` on one
would run whatever it holds. The tensor file is written first under a fresh name and `state.json` is
replaced atomically after it, so a killed run leaves the previous checkpoint or the new one, never a
torn mix; `--resume` continues to the same result as an uninterrupted run with the same seed (the
state includes the RNGs).

The rule (`RunCheckpoint.start`):
- without `resume`, a directory that already holds a checkpoint is refused (a new run would overwrite
  it), unless `overwrite`;
- with `resume`, an empty directory or one holding another method's, another version's, another
  model's or other data's checkpoint is an error, never a silent fresh start;
- settings may differ from the checkpoint's only in the keys the method names as resumable.

With data-parallel workers (`secateurs.distributed`), rank 0 alone reads and writes the checkpoint; the
others receive what it read (or its error) and wait for each save, so a checkpoint that cannot be written
stops every rank with the same error.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from secateurs import distributed
from secateurs.errors import ConfigError
from secateurs.io import atomic_write_json, jsonable, tensor_digest, tmp_sibling

STATE_FILE = "state.json"
LEGACY_FILE = "state.pt"  # pickled checkpoints of secateurs <= 0.1; refused, never unpickled
_TENSOR = "__tensor__"


def run_fingerprint(model: nn.Module | None, calib: torch.Tensor) -> dict[str, Any]:
    """What a checkpoint must have been made on: the model's weights and the calibration windows
    (`model=None`: a run on synthetic losses, tests)."""
    checksum = None
    if model is not None:
        with torch.no_grad():
            from secateurs.models.placement import tensors  # offloaded weights, one module at a time

            checksum = round(float(sum(p.detach().double().abs().sum().cpu() for _, p in tensors(model))), 3)
    return {"params": checksum, "calib": tensor_digest(calib), "calib_shape": list(calib.shape)}


def _split(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure with every tensor replaced by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {str(k): _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors) for v in obj]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (nested dicts/lists of JSON values and tensors) as a checkpoint in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    record = _split(state, tensors)
    name = f"state-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = tmp_sibling(directory / name)
    save_file(tensors, str(tmp))
    tmp.rename(directory / name)
    path = atomic_write_json(directory / STATE_FILE, {"tensors": name, "state": record}, indent=None)
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def load_state(directory: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when the directory holds no checkpoint. A damaged one is a ConfigError."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        if (directory / LEGACY_FILE).is_file():
            raise ConfigError(
                f"{directory / LEGACY_FILE} is a pickled checkpoint of an older secateurs; it is not read "
                "(pickle runs code). Start a new run in another directory"
            )
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / record["tensors"]))
        return _join(record["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ConfigError(f"checkpoint {path} is damaged or not a secateurs checkpoint: {e}") from None


def clear_state(directory: str | Path) -> None:
    """Remove a checkpoint (what `--overwrite` does to `--checkpoint-dir` when not resuming)."""
    directory = Path(directory)
    for path in (directory / STATE_FILE, directory / LEGACY_FILE, *directory.glob("state-*.safetensors")):
        path.unlink(missing_ok=True)


@dataclass
class RunCheckpoint:
    """One iterative run's checkpoint directory and what a state in it must match to be resumed.

    `settings` are the run's settings (compared key by key, except `resumable`), `fingerprint` what the
    run is made on (`run_fingerprint`).
    """

    directory: str | Path | None
    method: str
    version: int
    settings: dict[str, Any]
    fingerprint: dict[str, Any]
    resumable: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Compared with what a JSON round trip gives back (tuples become lists, enums plain strings).
        self.settings = jsonable(self.settings)
        self.fingerprint = jsonable(self.fingerprint)

    def start(self, resume: bool, overwrite: bool = False) -> dict[str, Any] | None:
        """The state to continue from (None: start afresh), after the checks in the module docstring."""
        return distributed.on_main(lambda: self._start(resume, overwrite), "reading the checkpoint")

    def _start(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        if self.directory is None:
            if resume:
                raise ConfigError("resume needs a checkpoint directory")
            return None
        saved = load_state(self.directory)
        if not resume:
            if saved is not None and not overwrite:
                raise ConfigError(
                    f"{self.directory} already holds a checkpoint; pass --resume to continue it, --overwrite "
                    "to start over, or use a new directory"
                )
            return None
        if saved is None:
            raise ConfigError(f"cannot resume: {self.directory} holds no checkpoint")
        self._check(saved)
        return saved

    def save(self, state: dict[str, Any]) -> None:
        if self.directory is not None:
            header = {"method": self.method, "version": self.version, "settings": self.settings}
            record = header | {"fingerprint": self.fingerprint, "state": state}
            distributed.on_main(lambda: save_state(self.directory, record), "saving the checkpoint")

    def _check(self, saved: dict[str, Any]) -> None:
        if saved.get("method") != self.method or saved.get("version") != self.version:
            raise ConfigError(
                f"cannot resume: {self.directory} holds no {self.method} checkpoint of version {self.version}"
            )
        then = saved.get("settings", {})
        diff = sorted(
            k
            for k in set(self.settings) | set(then)
            if k not in self.resumable and self.settings.get(k) != then.get(k)
        )
        if diff:
            raise ConfigError(f"cannot resume: settings differ from the checkpoint's: {', '.join(diff)}")
        if saved.get("fingerprint") != self.fingerprint:
            raise ConfigError("cannot resume: the model or calibration windows differ from the checkpoint's")
