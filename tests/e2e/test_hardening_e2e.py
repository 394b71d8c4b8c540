"""The mount daemon hardened: no core dumps, state files that cannot be redirected, and the
commands that talk to it (stats, umount) still working."""

from __future__ import annotations

import contextlib
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.runstate import state_file
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def _core_dumps_allowed() -> Iterator[None]:
    """A soft core limit above 0, inherited by what is started meanwhile (the default here
    is 0 already, which would prove nothing)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _core_limit(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError("no core limit in /proc/PID/limits")


def test_the_daemon_dumps_no_core_and_stats_and_umount_still_work(volume: Volume) -> None:
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("core dumps are off for this whole test run already")
    with _core_dumps_allowed():
        volume.mount()
    pidfile = state_file(volume.mnt, "pid")
    pid = int(pidfile.read_text())
    assert _core_limit(pid) == ["0", "0"]
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(pidfile.parent).st_mode) == 0o700
    (volume.mnt / "f").write_bytes(b"x" * 1000)
    r = cryptfs("stats", str(volume.mnt), "--json")
    assert f'"pid": {pid}' in r.stdout
    volume.umount()  # (waits for the daemon through /proc/PID/stat: still readable)
    assert not os.path.ismount(volume.mnt)
    with contextlib.suppress(FileNotFoundError):  # gone, or a zombie nobody reaped yet
        assert Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] == "Z"
    assert volume.raw_keys()


def test_a_symlink_planted_as_the_pidfile_is_not_written_through(
    volume: Volume, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = state_file(volume.mnt, "pid")
    pidfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pidfile.symlink_to(victim)
    try:
        r = volume.try_mount("--key-file", str(volume.key))
        assert r.returncode != 0 and "symlink" in r.stderr, r.stderr
        assert victim.read_text() == "precious\n"
        assert not os.path.ismount(volume.mnt)
    finally:
        pidfile.unlink(missing_ok=True)
