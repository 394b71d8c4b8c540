"""Process hardening for every cryptfs process that may hold keys in memory.

A core dump (a crash, ``SIGQUIT``, ``gcore``) would write the volume master key, data keys
and plaintext to disk, where a crash collector (systemd-coredump, apport) keeps them; a
process of the same user could also read them live via ``ptrace`` or ``/proc/PID/mem``.  So at
start: ``RLIMIT_CORE`` 0 (soft and hard: it cannot be raised again, and child processes
inherit it) and ``PR_SET_DUMPABLE`` 0, which also refuses ``ptrace`` attachment by the same
user and makes ``/proc/PID/`` of the process root's (the process still reads its own, but for
``environ``; ``stat`` and ``status`` stay readable by all, as before).
``execve`` resets the dumpable flag, so the daemon, started by ``cryptfs mount`` as a new
interpreter, sets it again itself.

Kept free of imports beyond the standard library: it runs before anything else is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def disable_core_dumps() -> None:
    """No core dumps and no same-user ``ptrace`` for this process (Linux; elsewhere only the
    rlimit).  Idempotent; failures are logged, never fatal."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux
        return
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())


def dumpable() -> bool | None:
    """The dumpable flag of this process (None where ``prctl`` does not exist)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
