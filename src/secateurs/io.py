"""Files that are either whole or absent: the one atomic-write helper, and cheap content hashes.

Every output secateurs writes (saved models, plan.json, caches, checkpoints, the converted default
model) goes through `atomic_write` (one file) or `atomic_dir` (a directory): the content is written
under a temporary name next to the target and renamed into place, so a crash, a full disk or a
concurrent process never leaves a torn file under the real name. Files get the user's umask (0644 with
the usual 022), as `save_pretrained`'s own files do; `tempfile` alone would leave them 0600.

`file_digest` and `source_digest` key caches by content, not by path or version string: a model
changed in place, or changed code, must not be served a stale result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from secateurs.errors import OutputError, OutputExistsError

TMP_MARK = ".tmp-"  # temporary siblings are named ".<name>.tmp-<pid>-<random>"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_mode(directory: bool = False) -> int:
    """The mode a plain `open()` / `mkdir()` would give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def tmp_sibling(path: Path) -> Path:
    """A unique temporary name next to `path` (same filesystem, so a rename is atomic)."""
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove temporary siblings of `path` left by killed processes (their pid is gone); returns them.

    A kill -9 during a save leaves `.NAME.tmp-PID-xxxx` (hundreds of MB for a model); the next write to
    the same target cleans up, but never a live process's work in progress.
    """
    removed = []
    for p in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        pid = p.name[len(f".{path.name}{TMP_MARK}") :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically (text as UTF-8); the parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail before any work if `out` holds something and we may not replace it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {out} is not empty (use --overwrite to replace it)")
    return out


SPACE_MARGIN = 1.1  # free space asked for beyond the estimate: tokenizer files, config, filesystem slack


def reserve_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail in the first second, not after an hour of work: check `out` and create the temporary
    directory the save will write into (pass it to `atomic_dir(..., tmp=)`).

    A read-only filesystem, missing permissions and a mount point as `out` (a rename onto it fails with
    EBUSY) are each a one-line `OutputError` here; `check_free_space` once the model's size is known.
    """
    out = check_output_dir(out, overwrite)
    if out.is_dir() and os.path.ismount(out):
        raise OutputError(
            f"output {out} is a mount point, which cannot be replaced; give a directory inside it"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        tmp = tmp_sibling(out)
        tmp.mkdir(mode=user_mode(directory=True))
    except OSError as e:
        raise OutputError(f"cannot write next to {out}: {e.strerror or e}") from None
    return tmp


@contextmanager
def reserved_dir(
    out: str | Path | None, overwrite: bool = False, tmp: Path | None = None
) -> Iterator[Path | None]:
    """`reserve_dir` for the length of a job (None when there is no output); a job that fails before its
    save leaves nothing behind."""
    if out is None:
        yield None
        return
    tmp = tmp or reserve_dir(out, overwrite)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_free_space(directory: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < need_bytes * SPACE_MARGIN:
        raise OutputError(
            f"{directory} has {free / 2**20:,.1f} MB free; the output needs about "
            f"{need_bytes * SPACE_MARGIN / 2**20:,.1f} MB"
        )


@contextmanager
def atomic_dir(
    out: str | Path, overwrite: bool = False, exist_ok: bool = False, tmp: Path | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` by rename, on error it vanishes.

    Nothing half-written ever appears under `out`, and an existing `out` survives a failed write.
    `exist_ok`: when another process has created `out` meanwhile (a cache filled concurrently), keep
    theirs and discard ours instead of failing. `tmp`: a directory from `reserve_dir`.
    """
    out = Path(out) if exist_ok else check_output_dir(out, overwrite)
    if tmp is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out)
        tmp = tmp_sibling(out)
        tmp.mkdir(mode=user_mode(directory=True))
    try:
        yield tmp
        _user_modes_(tmp)
        _replace_dir(tmp, out, exist_ok)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _user_modes_(root: Path) -> None:
    """Give everything under `root` the user's umask modes: libraries that write through `tempfile`
    (transformers' safetensors writer among them) leave 0600 files that other users cannot read."""
    for p in root.rglob("*"):
        os.chmod(p, user_mode(directory=p.is_dir()))


def _replace_dir(tmp: Path, out: Path, exist_ok: bool) -> None:
    if exist_ok and out.exists():
        return  # someone else finished first; the caller's `finally` discards ours
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if exist_ok and out.exists():
            return  # lost the race to another process: theirs is as good as ours
        raise
    if old is not None:
        shutil.rmtree(old)


def jsonable(obj: Any) -> Any:
    """What a JSON file gives back for `obj`: tuples as lists, enums and other objects as strings. Cache
    keys, checkpoint headers and records compare in this form."""
    return json.loads(json.dumps(obj, default=str))


def tensor_digest(t: Any) -> str:
    """A short content hash of an integer tensor (token windows), independent of its device and dtype."""
    import torch

    return hashlib.sha1(t.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


# -- content hashes for cache keys ---------------------------------------------------------------------
DIGEST_SAMPLES = 16  # blocks read per file: enough to see an edited checkpoint, cheap for 16 GB ones
DIGEST_BLOCK = 1 << 16  # 64 KiB per sampled block


def file_digest(path: str | Path) -> str:
    """Size, mtime and `DIGEST_SAMPLES` evenly spaced blocks of a file (or every file under a directory).

    Reading every byte of a multi-GB checkpoint for a cache key would cost more than the evaluation it
    saves; size + mtime catch a rewrite, the sampled blocks catch a copy-over with preserved times.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            for i in range(DIGEST_SAMPLES):
                fh.seek(st.st_size * i // DIGEST_SAMPLES)
                h.update(fh.read(DIGEST_BLOCK))
    return h.hexdigest()[:16]


def source_digest(modules: Iterable[str]) -> str:
    """A hash of the source files of the named modules (or packages: every .py under them).

    Keyed by content, not by git revision, so a long compare survives unrelated commits but not a change
    to the code that produced its figures.
    """
    import importlib.util

    h = hashlib.sha1()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
