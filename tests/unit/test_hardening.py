"""Keys never reach a core dump: every cryptfs process turns dumps (and same-user ptrace) off
before it reads a key.  Checked in a subprocess: the change cannot be undone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import ctypes, resource, sys
from cryptfs import cli
rc = cli.main(sys.argv[1:])
dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
limits = open("/proc/self/limits").read()
core = [line for line in limits.splitlines() if line.startswith("Max core file size")][0]
print(rc, dumpable, resource.getrlimit(resource.RLIMIT_CORE), core.split()[4:6])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc: Linux")
@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "s3://some-bucket/v", "--key-file", "/nonexistent/key"],  # reads keys: refused
        ["stats", "/nonexistent/mnt"],
    ],
)
def test_the_cli_entry_disables_core_dumps(argv: list[str]) -> None:
    # a soft limit above 0 to start from (as a shell with `ulimit -c unlimited` would)
    r = subprocess.run(
        [sys.executable, "-c", "import resource, os, sys; "
         "resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, resource.RLIM_INFINITY)); "
         "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], *sys.argv[2:]])",
         _PROBE, *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    rc, dumpable, *rest = r.stdout.strip().split(maxsplit=2)
    assert rc == "1" and "cryptfs:" in r.stderr  # (the command itself failed, as meant)
    assert dumpable == "0", r.stdout
    assert rest == ["(0, 0) ['0', '0']"], r.stdout


def test_disable_core_dumps_is_idempotent() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "from cryptfs.hardening import disable_core_dumps, dumpable\n"
         "assert dumpable() is True\n"
         "disable_core_dumps(); disable_core_dumps()\n"
         "print(dumpable())"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    assert r.stdout.strip() == "False", r.stderr
