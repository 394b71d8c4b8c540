"""``cryptfs mount``, ``umount`` and ``stats``: a mount's daemon, started, stopped and asked.

Must not import: ``cryptfs.fs`` and ``cryptfs.daemon`` at module level (``mount`` loads them
when it runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from cryptfs.cli.common import Progress, key_source, remote_of
from cryptfs.config import daemon_argv, fs_options
from cryptfs.errors import CryptfsError, UsageError


def cmd_mount(args: Any) -> int:
    from cryptfs.daemon import MountConfig, check_mountpoint, run_mount
    from cryptfs.fs.model import Options
    from cryptfs.runstate import default_cache_dir
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    mp = args.mountpoint.absolute()
    cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    source = key_source(args)  # validates key files before daemonising
    check_mountpoint(mp)
    opts = [o for group in args.options for o in group.split(",")]
    if not args.foreground:
        return spawn_daemon(args, cache_dir)

    ready_fd = args.ready_fd
    cfg = MountConfig(
        location=loc,
        mountpoint=mp,
        source=source,
        remote=remote_of(args),
        cache_dir=cache_dir,
        fuse_options=opts,
        fs=Options(**fs_options(vars(args))),
        metrics_address=args.metrics_address,
        read_ahead_kb=args.read_ahead_kb,
        writeback_cache=bool(args.writeback_cache),
        cache_size=args.cache_size,
    )

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"OK\n")
            os.close(ready_fd)

    try:
        left = trio.run(run_mount, cfg, ready)
    except CryptfsError as e:
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {e}\n".encode())
        raise
    return 0 if left == 0 else 3


def spawn_daemon(args: Any, cache_dir: Path) -> int:
    log_file = (args.log_file or cache_dir / "cryptfs.log").absolute()
    # the daemon runs in "/" so it keeps no directory busy: hand it absolute paths only
    argv = [
        sys.executable, "-m", "cryptfs", "mount", args.location,
        str(args.mountpoint.absolute()), "--foreground", "--cache-dir", str(cache_dir),
        "--log-file", str(log_file),
    ]  # fmt: skip
    argv += daemon_argv(vars(args))  # (every setting as resolved here, from the table)
    for o in args.options:
        argv += ["-o", o]
    argv += ["-v"] * args.verbose
    r, w = os.pipe()
    argv += ["--ready-fd", str(w)]
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = subprocess.Popen(
        argv,
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.readline().decode(errors="replace").strip()
    if msg == "OK":
        print(f"mounted {args.location} at {args.mountpoint.absolute()} (pid {proc.pid})")
        return 0
    rc = proc.wait()
    if msg.startswith("ERR "):
        print(f"cryptfs: {msg[4:]}", file=sys.stderr)
    else:
        print(f"cryptfs: mount failed (daemon exit {rc}); see {log_file}", file=sys.stderr)
    return 1


def cmd_umount(args: Any) -> int:
    import json

    from cryptfs.runstate import state_file

    mp = args.mountpoint.absolute()
    pidfile = state_file(mp, "pid")
    statusfile = state_file(mp, "status")
    pid = None
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().strip())
        except ValueError:
            pid = None
    r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise UsageError(f"cannot unmount {mp}: {r.stderr.strip() or 'fusermount3 failed'}")
    if pid is None:
        return 0
    deadline = time.monotonic() + args.timeout
    bar = Progress("uploading")
    first: int | None = None
    try:
        while alive(pid):
            if time.monotonic() > deadline:
                raise UsageError(f"daemon {pid} still uploading after {args.timeout:.0f} s")
            left = pending(mp)
            if left is not None and left > 0:
                first = max(first or 0, left)
                bar.update(first - left, first)
            # (no event loop in this process: a trio.run of its own for each pause, as before,
            # cost more than the pause is for)
            time.sleep(0.1)  # noqa: TID251
    finally:
        bar.close()
    try:
        status = json.loads(statusfile.read_text())
    except (OSError, ValueError):
        print(
            f"cryptfs: the daemon (pid {pid}) ended without reporting what it uploaded (see"
            " its log); whatever it had staged is uploaded at the next mount",
            file=sys.stderr,
        )
        return 3
    return report_left(mp, status)


def report_left(mp: Path, status: dict[str, Any]) -> int:
    """Exit code 3 and the names of what an unmount left behind (its daemon's status: paths
    in the volume, shown under the mount point)."""
    staged, lost = list(status.get("staged", [])), list(status.get("lost", []))
    left = int(status.get("pending", 0))
    if not left:
        return 0

    def names(paths: list[str]) -> str:
        shown = [f"  {mp}{p.encode(errors='surrogateescape').decode(errors='replace')}"
                 for p in paths[:20]]  # fmt: skip
        more = [f"  … and {len(paths) - 20} more"] if len(paths) > 20 else []
        return "\n".join(shown + more)

    if staged or not lost:
        print(
            f"cryptfs: {len(staged) or left} file(s) could not be uploaded; they stay staged"
            " and are uploaded at the next mount" + (":\n" + names(staged) if staged else ""),
            file=sys.stderr,
        )
    if lost:
        print(
            f"cryptfs: {len(lost)} change(s) of attributes only (mode, owner, times, a new"
            " directory) could not be uploaded and are lost:\n" + names(lost),
            file=sys.stderr,
        )
    return 3


def pending(mp: Path) -> int | None:
    """Files the daemon of ``mp`` still has to upload (None if it does not answer)."""
    from cryptfs.runstate import state_file
    from cryptfs.stats import read_socket

    try:
        return int(read_socket(state_file(mp, "sock"), timeout=1.0)["pending_files"])
    except (OSError, ValueError, KeyError):
        return None


def cmd_stats(args: Any) -> int:
    import json

    from cryptfs.runstate import state_file
    from cryptfs.stats import human_text, read_socket

    mp = args.mountpoint.absolute()
    try:
        snap = read_socket(state_file(mp, "sock"))
    except OSError:
        raise UsageError(f"no cryptfs mount answers at {mp}") from None
    print(json.dumps(snap, indent=1, sort_keys=True) if args.json else human_text(snap), end="")
    if args.json:
        print()
    return 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
