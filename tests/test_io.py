"""The one atomic-write helper: whole or absent, the user's umask, stale temp files of killed runs removed."""

import os
import stat
import subprocess
import sys

import pytest

from secateurs.errors import OutputExistsError
from secateurs.io import atomic_dir, atomic_write, file_digest, tmp_sibling


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_files_and_directories_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            atomic_write(d / "x", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "x").stat().st_mode) == 0o644


def test_saved_model_files_are_readable_by_others(tmp_path):
    """transformers writes model.safetensors through a 0600 temp file; outputs follow the umask."""
    import secateurs
    from secateurs.testing import random_plan, tiny_model
    from secateurs.units.space import UnitSpace

    model = tiny_model("llama")
    plan = random_plan(UnitSpace.from_model(model))
    secateurs.apply_plan_(model, plan)
    old = os.umask(0o022)
    try:
        secateurs.save(model, tmp_path / "p", plan)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "p").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_stale_temp_dirs_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.tmp-{os.getppid()}-cafecafe"  # our parent is alive
    live.mkdir()
    with atomic_dir(out) as d:
        (d / "f").write_text("ok")
    assert not stale.exists() and live.exists() and (out / "f").read_text() == "ok"
    live.rmdir()


def test_failed_write_leaves_nothing_and_keeps_the_old_content(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as d:
        (d / "f").write_text("new")
        raise RuntimeError("disk full")
    assert (out / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError):
        atomic_dir(out).__enter__()


def test_file_digest_sees_an_edit_in_place(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1_000_000)
    before = file_digest(tmp_path)
    data = bytearray(f.read_bytes())
    data[0] = ord("b")
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert file_digest(tmp_path) != before
    assert tmp_sibling(f).parent == tmp_path
