"""The runtime directory (pid, status, stats socket): never a place someone else controls."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cryptfs import runstate
from cryptfs.errors import UsageError

USER = 4242  # a non-root uid (only the choice of directory depends on it)


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A non-root user without XDG_RUNTIME_DIR or /run/user/<uid>: the /tmp fallback,
    moved to ``tmp_path / "tmp"`` (world-writable and sticky, as /tmp)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    monkeypatch.setattr(runstate, "_uid", lambda: USER)
    monkeypatch.setattr(runstate, "_TMP", tmp)
    monkeypatch.setattr(runstate, "_RUN_USER", tmp_path / "run-user")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp


def test_the_preferred_directories(
    user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runstate.runtime_dir() == user / f"cryptfs-{USER}" / "cryptfs"
    run_user = tmp_path / "run-user" / str(USER)
    run_user.mkdir(parents=True, mode=0o700)
    assert runstate.runtime_dir() == run_user / "cryptfs"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert runstate.runtime_dir() == tmp_path / "xdg" / "cryptfs"
    monkeypatch.setattr(runstate, "_uid", lambda: 0)
    assert runstate.runtime_dir() == Path("/run/cryptfs")


def test_the_tmp_fallback_is_made_private(user: Path) -> None:
    d = runstate.ensure_runtime_dir()
    for p in (d.parent, d):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, p
    # what an earlier version left (0755 from mkdir(parents=True)) is ours: made private
    d.parent.chmod(0o755)
    assert runstate.ensure_runtime_dir() == d
    assert stat.S_IMODE(os.lstat(d.parent).st_mode) == 0o700


def test_a_planted_symlink_is_refused(user: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (user / f"cryptfs-{USER}").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="not a directory"):
        runstate.ensure_runtime_dir()
    assert not any(elsewhere.iterdir())


def test_a_directory_of_someone_else_is_refused(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (user / f"cryptfs-{USER}").mkdir(mode=0o700)
    real = os.geteuid()
    monkeypatch.setattr(runstate, "_euid", lambda: real + 1)  # it is not ours
    with pytest.raises(UsageError, match="belongs to uid"):
        runstate.ensure_runtime_dir()


def test_a_directory_others_can_write_is_refused(user: Path) -> None:
    base = user / f"cryptfs-{USER}"
    base.mkdir()
    base.chmod(0o777)
    with pytest.raises(UsageError, match="writable by others"):
        runstate.ensure_runtime_dir()
    base.chmod(0o700)
    (base / "cryptfs").mkdir()
    (base / "cryptfs").chmod(0o730)
    with pytest.raises(UsageError, match="writable by others"):
        runstate.ensure_runtime_dir()


def test_state_files_are_never_written_through_a_symlink(user: Path, tmp_path: Path) -> None:
    d = runstate.ensure_runtime_dir()
    pidfile = runstate.state_file(tmp_path / "mnt", "pid")
    assert pidfile.parent == d
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile.symlink_to(victim)
    with pytest.raises(UsageError, match="symlink"):
        runstate.write_state(pidfile, "123\n")
    assert victim.read_text() == "precious\n"
    pidfile.unlink()
    runstate.write_state(pidfile, "123\n")
    runstate.write_state(pidfile, "45\n")  # truncated, not appended to
    assert pidfile.read_text() == "45\n"
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
