"""POSIX behaviours call by call on a real mount, the way a conformance suite checks them
(issue 20): the return value or errno of each call, then ``lstat`` of what must have changed;
as root and as other users (``setpriv`` to unprivileged uids, the mount with ``allow_other``),
with a remount in between for what must persist.  docs/SEMANTICS.md lists what differs."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e
ALICE, BOB, CAROL = 1001, 1002, 1003


def as_user(uid: int, cwd: Path, stmt: str) -> str:
    """Run the Python statement ``stmt`` (``os`` imported) as ``uid`` (its own group only)
    in ``cwd``; "OK" or the errno's name.  The child enters ``cwd`` before it drops root, so
    the mount need not be reachable through the test's private temporary directory."""
    code = (
        "import errno, os, sys\n"
        f"try:\n    {stmt}\n    print('OK')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-c", code],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return r.stdout.strip()


def remount(volume: Volume, *extra: str) -> None:
    volume.umount()
    volume.mount(*extra)


def errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def shape(p: Path) -> tuple[int, int, int, int, int]:
    st = p.lstat()
    return (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_nlink)


# ------------------------------------------------------------------ special files


def _make_specials(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o640)
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "disk", stat.S_IFBLK | 0o600, os.makedev(8, 17))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock"))
    s.close()
    os.chown(d / "fifo", ALICE, BOB)
    for name, mode in (("fifo", 0o640), ("null", 0o666), ("disk", 0o600)):
        os.chmod(d / name, mode)  # (whatever the umask took away)


def test_special_files_are_made_kept_and_restored(volume: Volume, tmp_path: Path) -> None:
    volume.mount()
    d = volume.mnt / "dev"
    d.mkdir()
    _make_specials(d)
    want = {
        "fifo": (stat.S_IFIFO | 0o640, ALICE, BOB, 0, 1),
        "null": (stat.S_IFCHR | 0o666, 0, 0, os.makedev(1, 3), 1),
        "disk": (stat.S_IFBLK | 0o600, 0, 0, os.makedev(8, 17), 1),
    }
    got = {n: shape(d / n) for n in want}
    assert got == want
    assert stat.S_ISSOCK((d / "sock").lstat().st_mode)
    # an existing special file: O_CREAT|O_EXCL and mkfifo/mknod over it say EEXIST
    assert errno_of(os.open, d / "fifo", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.mkfifo, d / "null") == errno.EEXIST
    remount(volume)
    assert {n: shape(d / n) for n in want} == want
    assert stat.S_ISSOCK((d / "sock").lstat().st_mode)
    # a device node on the mount opens only with -o dev (libfuse mounts nodev by default)
    assert errno_of((d / "null").read_bytes) == errno.EACCES
    remount(volume, "-o", "dev")
    (d / "null").write_bytes(b"gone")  # the kernel's own /dev/null: swallows, reads nothing
    assert (d / "null").read_bytes() == b""
    # cryptfs ls -l shows them; decrypt restores them (as root: the devices too)
    volume.umount()
    common = ("--key-file", str(volume.key), "--endpoint-url", volume.endpoint)
    listing = cryptfs("ls", volume.url + "/dev", "-l", *common).stdout
    kinds = {line.split()[-1]: line[0] for line in listing.splitlines()}
    assert kinds == {"fifo": "p", "null": "c", "disk": "b", "sock": "s"}
    assert "1, 3" in next(line for line in listing.splitlines() if line.endswith("null"))
    out = tmp_path / "out"
    cryptfs("decrypt", volume.url + "/dev", str(out), *common)
    assert {n: shape(out / n) for n in want} == want
    assert stat.S_ISSOCK((out / "sock").lstat().st_mode)


def test_a_fifo_on_the_mount_is_a_pipe(volume: Volume) -> None:
    volume.mount()
    fifo = volume.mnt / "fifo"
    os.mkfifo(fifo)
    # no reader: a non-blocking writer gets ENXIO, a non-blocking reader opens
    assert errno_of(os.open, fifo, os.O_WRONLY | os.O_NONBLOCK) == errno.ENXIO
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fifo.write_bytes(b"through the pipe\n")
    reader.join(30)
    assert got == [b"through the pipe\n"]
    assert fifo.lstat().st_size == 0


def _tree(root: Path) -> None:
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "file").write_bytes(b"data\n" * 100)
    os.symlink("sub/file", root / "link")
    _make_specials(root / "sub")
    for p in [root / "sub" / n for n in ("fifo", "null", "disk", "sock", "file")]:
        os.utime(
            p, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789), follow_symlinks=False
        )


def _stats(root: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        mtime = 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, size, mtime)
    return out


def test_cp_rsync_and_tar_carry_special_files(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    want = _stats(src)
    volume.mount()
    m = volume.mnt
    subprocess.run(["cp", "-a", str(src), str(m / "cp")], check=True)
    subprocess.run(["rsync", "-a", "--specials", "--devices", f"{src}/", f"{m}/rsync/"], check=True)
    archive = tmp_path / "src.tar"
    # (pax: nanosecond times, as cp and rsync keep them)
    subprocess.run(["tar", "--format=posix", "-C", str(src), "-cf", str(archive), "."], check=True)
    (m / "tar").mkdir()
    subprocess.run(["tar", "-C", str(m / "tar"), "-xf", str(archive)], check=True)
    remount(volume)
    no_socket = {k: v for k, v in want.items() if k != "sub/sock"}  # (tar leaves sockets out)
    for copy, expected in (("cp", want), ("rsync", want), ("tar", no_socket)):
        assert _stats(m / copy) == expected, copy
    # a second rsync finds nothing to do
    r = subprocess.run(
        ["rsync", "-ai", "--specials", "--devices", f"{src}/", f"{m}/rsync/"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert r.stdout == ""  # (nothing itemised, directories included)
    # and tar out of the mount
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(
        f"tar --format=posix -C {m / 'cp'} -cf - . | tar -C {back} -xf -", shell=True, check=True
    )
    assert _stats(back) == no_socket


# ------------------------------------------------------------------ link counts


def test_link_counts(volume: Volume) -> None:
    volume.mount()
    d = volume.mnt / "d"
    d.mkdir()
    assert d.stat().st_nlink == 2
    for name in ("a", "b", "c"):
        (d / name).mkdir()
    (d / "f").write_bytes(b"x")
    assert d.stat().st_nlink == 5
    (d / "b").rmdir()
    assert d.stat().st_nlink == 4
    (volume.mnt / "e").mkdir()
    os.rename(d / "a", volume.mnt / "e" / "a")
    assert (d.stat().st_nlink, (volume.mnt / "e").stat().st_nlink) == (3, 3)
    assert (d / "f").stat().st_nlink == 1
    remount(volume)
    os.listdir(d)
    assert d.stat().st_nlink == 3
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.unlink(d / "f")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


# ------------------------------------------------------------------ permissions


def test_sticky_directories(volume: Volume) -> None:
    volume.mount("-o", "allow_other")
    t = volume.mnt / "tmp"
    t.mkdir()
    os.chmod(t, 0o1777)
    assert t.stat().st_mode & 0o7777 == 0o1777
    assert as_user(ALICE, t, "open('alice', 'w').write('a')") == "OK"
    assert as_user(ALICE, t, "os.mkdir('alicedir')") == "OK"
    # another user may not remove or rename what is not theirs in a sticky directory
    assert as_user(BOB, t, "os.unlink('alice')") == "EPERM"
    assert as_user(BOB, t, "os.rename('alice', 'bob')") == "EPERM"
    assert as_user(BOB, t, "os.rmdir('alicedir')") == "EPERM"
    assert as_user(BOB, t, "open('bobs', 'w').write('b')") == "OK"
    assert as_user(BOB, t, "os.rename('bobs', 'alice')") == "EPERM"  # (nor replace theirs)
    assert (t / "alice").read_text() == "a"
    # the owner of the entry may, and so may the directory's owner
    assert as_user(ALICE, t, "os.rename('alice', 'alice2')") == "OK"
    os.chown(t, CAROL, CAROL)
    assert as_user(CAROL, t, "os.unlink('alice2')") == "OK"
    assert as_user(CAROL, t, "os.rmdir('alicedir')") == "OK"
    assert sorted(os.listdir(t)) == ["bobs"]
    # without the bit, write permission on the directory is enough
    os.chmod(t, 0o777)
    assert as_user(ALICE, t, "os.unlink('bobs')") == "OK"
    remount(volume, "-o", "allow_other")
    assert t.stat().st_mode & 0o7777 == 0o777 and os.listdir(t) == []


def test_ownership_and_set_id_bits(volume: Volume) -> None:
    volume.mount("-o", "allow_other")
    w = volume.mnt / "w"
    w.mkdir(mode=0o777)
    os.chmod(w, 0o777)
    f = w / "f"
    f.write_bytes(b"x")
    os.chown(f, ALICE, ALICE)
    # chown and chmod by someone who is not the owner
    assert as_user(BOB, w, f"os.chown('f', {BOB}, {BOB})") == "EPERM"
    assert as_user(BOB, w, "os.chmod('f', 0o777)") == "EPERM"
    assert as_user(ALICE, w, f"os.chown('f', {BOB}, -1)") == "EPERM"  # (giving it away)
    # setuid and setgid are cleared by another user's write, and by the owner's chown
    os.chmod(f, 0o6777)
    assert (
        as_user(BOB, w, "fd = os.open('f', os.O_WRONLY); os.write(fd, b'y'); os.close(fd)") == "OK"
    )
    assert f.stat().st_mode & 0o7777 == 0o777
    os.chmod(f, 0o6775)
    assert as_user(ALICE, w, f"os.chown('f', -1, {ALICE})") == "OK"
    assert f.stat().st_mode & (stat.S_ISUID | stat.S_ISGID) == 0
    # a set-group-ID directory hands on its group (and the bit to subdirectories)
    g = volume.mnt / "g"
    g.mkdir()
    os.chown(g, 0, 777)
    os.chmod(g, 0o2777)
    assert as_user(ALICE, g, "os.mkdir('sub'); open('file', 'w').close()") == "OK"
    assert ((g / "sub").stat().st_gid, (g / "file").stat().st_gid) == (777, 777)
    assert (g / "sub").stat().st_mode & stat.S_ISGID
    remount(volume, "-o", "allow_other")
    assert f.stat().st_mode & 0o7777 == 0o775 and f.stat().st_uid == ALICE
    assert (g / "sub").stat().st_gid == 777 and (g / "sub").stat().st_mode & stat.S_ISGID


def test_utimensat_rules(volume: Volume) -> None:
    volume.mount("-o", "allow_other")
    w = volume.mnt / "w"
    w.mkdir()
    os.chmod(w, 0o777)
    shared, private = w / "shared", w / "private"
    for p, mode in ((shared, 0o666), (private, 0o644)):
        p.write_bytes(b"x")
        os.chown(p, ALICE, ALICE)
        os.chmod(p, mode)
        os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    # UTIME_NOW needs write permission; explicit times need ownership
    assert as_user(BOB, w, "os.utime('shared')") == "OK"
    assert shared.stat().st_mtime_ns > 2_000_000_000
    assert as_user(BOB, w, "os.utime('shared', ns=(5, 5))") == "EPERM"
    assert as_user(BOB, w, "os.utime('private')") == "EACCES"
    assert as_user(ALICE, w, "os.utime('private', ns=(7, 3_000_000_000))") == "OK"
    # UTIME_OMIT leaves a time as it is (touch -m changes only the mtime)
    subprocess.run(["touch", "-m", "-d", "@981173106", str(private)], check=True)
    st = private.stat()
    assert st.st_atime_ns == 7 and st.st_mtime_ns == 981173106 * 10**9
    before = st.st_ctime_ns
    os.chmod(private, 0o640)  # a change of attributes moves the ctime
    assert private.stat().st_ctime_ns > before
    remount(volume, "-o", "allow_other")
    st = private.stat()
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_mode & 0o777) == (7, 981173106 * 10**9, 0o640)


# ------------------------------------------------------------------ directory times


def test_directory_times_follow_their_entries_and_persist(volume: Volume) -> None:
    volume.mount()
    d, e = volume.mnt / "d", volume.mnt / "e"
    d.mkdir()
    e.mkdir()
    old = 1_000_000_000 * 10**9
    for x in (d, e):
        os.utime(x, ns=(old, old))

    def moved(what: str, fn: object, *args: object) -> None:
        before = d.stat()
        fn(*args)  # type: ignore[operator]
        after = d.stat()
        assert after.st_mtime_ns > before.st_mtime_ns, what
        assert after.st_ctime_ns > before.st_ctime_ns, what
        assert after.st_atime_ns == old, what  # (no atime implied: noatime)

    moved("create", (d / "f").write_bytes, b"x")
    moved("mkdir", os.mkdir, d / "sub")
    moved("symlink", os.symlink, "f", d / "l")
    moved("mkfifo", os.mkfifo, d / "p")
    moved("unlink", os.unlink, d / "l")
    moved("rmdir", os.rmdir, d / "sub")
    moved("rename within", os.rename, d / "p", d / "q")
    f_ctime = (d / "f").stat().st_ctime_ns
    e_before = e.stat().st_mtime_ns
    moved("rename out", os.rename, d / "f", e / "f")
    assert e.stat().st_mtime_ns > e_before
    assert (e / "f").stat().st_ctime_ns > f_ctime  # (the renamed entry's ctime too)
    # find -newer sees the directory changed
    stamp = volume.mnt / "stamp"
    stamp.write_bytes(b"")
    os.utime(stamp, ns=(old + 1, old + 1))
    found = subprocess.run(
        ["find", str(volume.mnt), "-maxdepth", "1", "-newer", str(stamp), "-name", "[de]"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert sorted(found) == [str(d), str(e)]
    want = (d.stat().st_mtime_ns, e.stat().st_mtime_ns)
    remount(volume)  # (the unmount writes the markers due)
    assert (d.stat().st_mtime_ns, e.stat().st_mtime_ns) == want
