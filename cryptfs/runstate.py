"""Where a mount keeps its run-time state (pid, status, stats socket) and its cache.

Kept apart from the daemon so that ``cryptfs umount`` and ``cryptfs stats`` start without
importing the S3 and FUSE stacks (a third of a second saved on every unmount).

The runtime directory is ``/run/cryptfs`` for root; for other users
``$XDG_RUNTIME_DIR/cryptfs``, else ``/run/user/<uid>/cryptfs`` (where systemd made that
directory), and only as a last resort ``/tmp/cryptfs-<uid>/cryptfs``: a name anyone can
predict, in a directory anyone can write, so another user could have made it first, or
planted a symlink there.  Before the daemon writes anything, every directory of ours on
the way is checked (``ensure_runtime_dir``): a real directory (not a symlink), owned by us,
not writable by anyone else; otherwise nothing is written and the mount is refused.  State
files are opened with ``O_NOFOLLOW`` and mode 0600.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from cryptfs.errors import UsageError

# (module attributes, so that tests can move them)
_uid = os.getuid
_euid = os.geteuid
_RUN_USER = Path("/run/user")
_TMP = Path("/tmp")  # noqa: S108 (the last resort, checked by ensure_runtime_dir)


def _is_own_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == _euid()


def _dirs() -> list[Path]:
    """The runtime directory, after the directories of ours leading to it (outermost first)."""
    uid = _uid()
    if uid == 0:
        return [Path("/run/cryptfs")]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return [Path(xdg) / "cryptfs"]
    user = _RUN_USER / str(uid)
    if _is_own_dir(user):
        return [user / "cryptfs"]
    base = _TMP / f"cryptfs-{uid}"
    return [base, base / "cryptfs"]


def runtime_dir() -> Path:
    return _dirs()[-1]


def _check_dir(path: Path) -> None:
    """Make ``path`` (mode 0700) if missing; refuse it unless it is a real directory, ours,
    and writable by nobody else (read or search bits for others, as an earlier version left
    ``/tmp/cryptfs-<uid>``, are taken away)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UsageError(f"cannot create the runtime directory {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(
                f"runtime directory {path} is not a directory (a symlink?): refusing to keep "
                "mount state there; remove it"
            ) from None
        raise UsageError(f"cannot open the runtime directory {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != _euid():
            raise UsageError(
                f"runtime directory {path} belongs to uid {st.st_uid}, not to us "
                f"(uid {_euid()}): refusing to keep mount state there; set XDG_RUNTIME_DIR"
            )
        if st.st_mode & 0o022:
            raise UsageError(
                f"runtime directory {path} is writable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): refusing to keep mount state there; "
                "remove it"
            )
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def ensure_runtime_dir() -> Path:
    """The runtime directory, made and checked (``UsageError`` if it cannot be trusted)."""
    dirs = _dirs()
    for d in dirs:
        _check_dir(d)
    return dirs[-1]


def write_state(path: Path, text: str) -> None:
    """``text`` into state file ``path`` (mode 0600), never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symlink: refusing to write through it") from None
        raise
    try:
        os.fchmod(fd, 0o600)  # (a file an earlier version left may have had another mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def state_file(mountpoint: Path, suffix: str) -> Path:
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:24]
    return runtime_dir() / f"{digest}.{suffix}"


def default_cache_dir() -> Path:
    if os.getuid() == 0:
        return Path("/var/cache/cryptfs")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cryptfs"
