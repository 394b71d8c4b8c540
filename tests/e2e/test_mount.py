"""Real mounts in a subprocess driven by real tools."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e
MARKER = b"PLAINTEXT-MARKER-7f3a"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def sh(*cmd: str, cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    assert r.returncode == 0, f"{cmd} failed: {r.stderr}"
    return r.stdout


def make_tree(root: Path) -> None:
    (root / "docs/deep/er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "secret-name-report.txt").write_bytes(MARKER * 10)
    (root / "docs/big.bin").write_bytes(os.urandom(3 * 65536 + 1234))
    (root / "docs/deep/er/small").write_text("small\n")
    (root / "docs/empty").write_bytes(b"")
    (root / ("ü" * 100)).write_text("unicode long name")
    (root / ("L" * 255)).write_text("longest name")
    os.symlink("../secret-name-report.txt", root / "docs/link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.chmod(root / "docs/deep/er/small", 0o600)
    os.chmod(root / "docs/deep", 0o750)
    os.utime(root / "docs/big.bin", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    os.utime(root / "docs/deep", ns=(1_200_000_000_000_000_001, 1_200_000_000_000_000_001))


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            content = (
                os.readlink(p)
                if p.is_symlink()
                else ("" if p.is_dir() else p.read_bytes().hex()[:64])
            )
            mtime = st.st_mtime_ns if not p.is_symlink() else 0
            out[str(p.relative_to(root))] = (
                st.st_mode,
                mtime,
                st.st_size if p.is_file() else 0,
                content,
            )
    return out


def test_cp_rsync_diff_remount_and_no_plaintext(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    volume.mount()
    m = volume.mnt
    sh("cp", "-a", str(src), str(m / "cp"))
    sh("rsync", "-a", f"{src}/", f"{m}/rs/")
    sh("diff", "-r", "--no-dereference", str(src), str(m / "cp"))
    sh("diff", "-r", "--no-dereference", str(src), str(m / "rs"))
    assert snapshot(m / "cp") == snapshot(src)
    assert snapshot(m / "rs") == snapshot(src)
    assert sh("rsync", "-ai", f"{src}/", f"{m}/rs/") == ""  # no-op second pass
    volume.umount()
    assert not os.path.ismount(m)
    volume.mount()
    assert snapshot(m / "cp") == snapshot(src)
    assert snapshot(m / "rs") == snapshot(src)
    sh("diff", "-r", "--no-dereference", str(src), str(m / "rs"))
    assert sh("rsync", "-ai", f"{src}/", f"{m}/rs/") == ""
    volume.umount()
    # the raw bucket holds neither plaintext content nor names
    c = volume.server.client()
    keys = volume.raw_keys()
    assert len(keys) > 20
    for k in keys:
        assert "secret" not in k and "docs" not in k and "L" * 50 not in k
        body = c.get_object(Bucket=volume.bucket, Key=k)["Body"].read()
        assert MARKER not in body and b"secret-name" not in body
        md = c.head_object(Bucket=volume.bucket, Key=k)["Metadata"]
        assert "secret" not in str(md)


def test_posix_operations(volume: Volume) -> None:
    volume.mount()
    m = volume.mnt
    f = m / "f"
    sh("dd", "if=/dev/urandom", f"of={f}", "bs=64k", "count=10", "status=none")
    ref = bytearray(f.read_bytes())
    # random writes and append
    with open(f, "r+b") as fh:
        fh.seek(100_000)
        fh.write(b"Z" * 5000)
        ref[100_000:105_000] = b"Z" * 5000
    with open(f, "ab") as fh:
        fh.write(b"appended")
    ref += b"appended"
    assert f.read_bytes() == ref
    os.truncate(f, 70_000)
    del ref[70_000:]
    os.truncate(f, 80_000)
    ref += bytes(10_000)
    assert f.read_bytes() == ref
    # rename over an existing file, NOREPLACE via mv -n, directory rename
    (m / "g").write_text("old")
    sh("mv", str(f), str(m / "g"))
    assert (m / "g").read_bytes() == ref and not f.exists()
    (m / "d1/sub").mkdir(parents=True)
    (m / "d1/sub/x").write_text("x")
    (m / "d1/y").write_text("y")
    sh("mv", str(m / "d1"), str(m / "d2"))
    assert (m / "d2/sub/x").read_text() == "x" and not (m / "d1").exists()
    with pytest.raises(OSError) as ei:
        os.rmdir(m / "d2")
    assert ei.value.errno == 39  # ENOTEMPTY
    sh("chmod", "751", str(m / "d2"))
    sh("touch", "-d", "2003-04-05 06:07:08.123456789", str(m / "d2/y"))
    os.chown(m / "d2/y", 1234, 5678)
    sh("ln", "-s", "d2/y", str(m / "sym"))
    with pytest.raises(OSError) as ei:
        os.link(m / "d2/y", m / "hard")
    assert ei.value.errno == 1  # EPERM: hard links are not supported
    with pytest.raises(OSError) as ei:
        (m / ("n" * 256)).write_text("x")
    assert ei.value.errno == 36  # ENAMETOOLONG
    with open(m / "synced", "wb") as fh:
        fh.write(b"durable")
        fh.flush()
        os.fsync(fh.fileno())
    # fsync returned: the object is in S3 already
    assert any(k.endswith(".cryptfs.json") for k in volume.raw_keys())
    st = os.statvfs(m)
    assert st.f_namemax == 255
    for _ in range(2):  # extended attributes: not supported, the same answer every time
        with pytest.raises(OSError) as ei:
            os.getxattr(m / "synced", "user.x")
        assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as ei:
        os.setxattr(m / "synced", "user.x", b"v")
    assert ei.value.errno == errno.EOPNOTSUPP
    assert os.listxattr(m / "synced") == []
    volume.umount()
    volume.mount()
    assert (m / "g").read_bytes() == ref
    st = (m / "d2/y").stat()
    assert st.st_mtime_ns == 1049522828123456789 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert oct((m / "d2").stat().st_mode & 0o777) == "0o751"
    assert os.readlink(m / "sym") == "d2/y" and (m / "sym").read_text() == "y"
    assert (m / "synced").read_bytes() == b"durable"
    shutil.rmtree(m / "d2")
    os.unlink(m / "g")
    assert sorted(os.listdir(m)) == ["sym", "synced"]
    volume.umount()


@pytest.mark.allow_error_logs
def test_tampered_object_reads_eio_others_fine(volume: Volume) -> None:
    volume.mount()
    (volume.mnt / "victim").write_bytes(b"v" * 200_000)
    (volume.mnt / "other").write_bytes(b"o" * 1000)
    volume.umount()
    victim = volume.flip_byte(150_000)
    volume.mount()
    with pytest.raises(OSError) as ei:
        (volume.mnt / "victim").read_bytes()
    assert ei.value.errno == 5  # EIO
    assert (volume.mnt / "other").read_bytes() == b"o" * 1000
    volume.umount()
    assert "integrity failure" in volume.log and victim.split("/", 1)[1] in volume.log


def test_wrong_key_and_bad_input_are_one_clear_line(volume: Volume, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("A" * 43 + "\n")
    os.chmod(wrong, 0o600)
    r = volume.try_mount("--key-file", str(wrong))
    assert r.returncode != 0 and "wrong key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(volume.mnt)
    os.chmod(wrong, 0o644)
    r = cryptfs("mount", volume.url, str(volume.mnt), "--key-file", str(wrong), check=False)
    assert r.returncode != 0 and "chmod 600" in r.stderr
    (volume.mnt / "junk").write_text("x")
    r = volume.try_mount("--key-file", str(volume.key))
    assert r.returncode != 0 and "not empty" in r.stderr
    (volume.mnt / "junk").unlink()
    r = cryptfs(
        "mount",
        f"s3://missing-bucket-{os.getpid()}/x",
        str(volume.mnt),
        "--key-file",
        str(volume.key),
        "--endpoint-url",
        volume.endpoint,
        check=False,
    )
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cryptfs(
        "init",
        volume.url,
        "--key-file",
        str(volume.key),
        "--endpoint-url",
        volume.endpoint,
        check=False,
    )
    assert r.returncode != 0 and "already exists" in r.stderr


def test_fusermount_unmount_keeps_pending_data(volume: Volume) -> None:
    volume.mount("--writeback-delay", "3600")
    (volume.mnt / "late").write_bytes(b"written just before unmount")
    subprocess.run(["fusermount3", "-u", str(volume.mnt)], check=True)
    deadline = time.monotonic() + 60
    while "unmounted cleanly" not in volume.log and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "unmounted cleanly" in volume.log
    volume.mount()
    assert (volume.mnt / "late").read_bytes() == b"written just before unmount"
    volume.umount()


def test_passphrase_slot_and_missing_credentials(s3server, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, pw = tmp_path / "k", tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    os.chmod(pw, 0o600)
    env = dict(os.environ)  # (passphrase slots use the real Argon2id parameters)
    url = f"s3://{bucket}/pp"
    cryptfs(
        "init",
        url,
        "--key-file",
        str(key),
        "--passphrase-file",
        str(pw),
        "--endpoint-url",
        s3server.endpoint,
        env=env,
    )
    mnt = tmp_path / "m"
    mnt.mkdir()
    v = Volume(url, s3server.endpoint, key, mnt, tmp_path / "cache", bucket, s3server)
    v.try_mount("--passphrase-file", str(pw), check=True)
    try:
        (mnt / "f").write_text("via passphrase")
    finally:
        v.umount()
    v.try_mount("--key-file", str(key), check=True)
    try:
        assert (mnt / "f").read_text() == "via passphrase"
    finally:
        v.umount()
    bare = {k: val for k, val in os.environ.items() if not k.startswith("AWS_")}
    bare["HOME"] = str(tmp_path)
    r = v.try_mount("--key-file", str(key), env=bare)
    assert r.returncode == 1
    assert "credentials" in r.stderr or "access denied" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.ismount(mnt)
    pw.write_text("wrong passphrase\n")
    r = v.try_mount("--passphrase-file", str(pw))
    assert r.returncode == 1
    assert "wrong key or passphrase" in r.stderr


def test_unreachable_endpoint_is_one_clear_line(volume: Volume) -> None:
    from tests.conftest import free_ports

    port = free_ports(1)[0]
    r = volume.try_mount("--key-file", str(volume.key), endpoint=f"http://127.0.0.1:{port}")
    assert r.returncode == 1
    assert "unreachable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tar_find_dd_and_editor_save(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    archive = tmp_path / "a.tar"
    sh("tar", "--format=posix", "-cf", str(archive), "-C", str(src), ".")
    volume.mount()
    m = volume.mnt
    (m / "x").mkdir()
    sh("tar", "-xpf", str(archive), "-C", str(m / "x"))
    assert snapshot(m / "x") == snapshot(src)
    sh("tar", "--format=posix", "-cf", str(tmp_path / "b.tar"), "-C", str(m / "x"), ".")
    out = tmp_path / "out"
    out.mkdir()
    sh("tar", "-xpf", str(tmp_path / "b.tar"), "-C", str(out))
    assert snapshot(out) == snapshot(src)
    found = sorted(sh("find", str(m / "x"), "-type", "f", "-size", "+100k").split())
    assert found == [str(m / "x/docs/big.bin")]
    # dd with seek: an in-place random write of one block, no truncation
    f = m / "x/docs/big.bin"
    ref = bytearray(f.read_bytes())
    sh(
        "dd",
        "if=/dev/zero",
        f"of={f}",
        "bs=4096",
        "seek=10",
        "count=1",
        "conv=notrunc",
        "status=none",
    )
    ref[40960:45056] = bytes(4096)
    assert f.read_bytes() == ref
    # an editor's save: write a temp file, fsync, rename over the original
    doc = m / "x/doc.txt"
    doc.write_text("first draft\n")
    tmp = m / "x/.doc.txt.swp"
    with open(tmp, "w") as fh:
        fh.write("final text\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, doc)
    sh("mv", str(m / "x/docs/deep"), str(m / "moved-deep"))
    volume.umount()
    volume.mount()
    assert doc.read_text() == "final text\n"
    assert not tmp.exists()
    assert (m / "moved-deep/er/small").read_text() == "small\n"
    assert f.read_bytes() == ref
    volume.umount()


def test_kill_9_after_close_loses_nothing(volume: Volume) -> None:
    volume.mount("--writeback-delay", "3600")
    data = os.urandom(300_000)
    (volume.mnt / "d").mkdir()
    (volume.mnt / "d/closed").write_bytes(data)
    r = subprocess.run(
        ["pgrep", "-f", f"cryptfs mount .*{volume.mnt}"],
        capture_output=True,
        text=True,
        check=False,
    )
    pids = [int(p) for p in r.stdout.split()]
    assert pids, "daemon not found"
    for p in pids:
        os.kill(p, 9)
    time.sleep(0.5)
    # the daemon left no report: umount says so, and that its staged files are not lost
    r = cryptfs("umount", str(volume.mnt), check=False)
    assert r.returncode == 3 and "ended without reporting" in r.stderr, r.stderr
    assert not os.path.ismount(volume.mnt)
    volume.mount()
    assert (volume.mnt / "d/closed").read_bytes() == data
    assert "recovered staged file" in volume.log
    volume.umount()


def test_sigterm_unmounts_and_uploads(volume: Volume) -> None:
    out = volume.mount("--writeback-delay", "3600").stdout
    pid = int(out.rsplit("(pid ", 1)[1].split(")")[0])
    (volume.mnt / "pending").write_bytes(b"uploaded on SIGTERM")
    os.kill(pid, 15)
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert not os.path.ismount(volume.mnt)
    assert "unmounted cleanly" in volume.log
    staged = list(volume.cache.glob("*/staging/*.data"))
    assert staged == []
    volume.mount()
    assert (volume.mnt / "pending").read_bytes() == b"uploaded on SIGTERM"
    volume.umount()


def test_offline_ls_and_decrypt_without_fuse(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    volume.mount()
    sh("cp", "-a", f"{src}/.", str(volume.mnt))
    volume.umount()
    common = ["--key-file", str(volume.key), "--endpoint-url", volume.endpoint]
    listing = cryptfs("ls", volume.url, *common).stdout.splitlines()
    assert "secret-name-report.txt" in listing
    assert "dangling -> /nonexistent/target" in listing
    long_listing = cryptfs("ls", f"{volume.url}/docs", "-l", *common).stdout
    assert "big.bin" in long_listing and "-rw-r--r--" in long_listing
    out = tmp_path / "out"
    cryptfs("decrypt", volume.url, str(out), *common)
    assert snapshot(out) == snapshot(src)
    one = tmp_path / "one"
    one.mkdir()
    cryptfs("decrypt", f"{volume.url}/docs/big.bin", str(one), *common)
    assert (one / "big.bin").read_bytes() == (src / "docs/big.bin").read_bytes()
    r = cryptfs("ls", f"{volume.url}/no/such", *common, check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr


def test_more_staged_files_than_the_soft_open_file_limit(volume: Volume) -> None:
    """Each staged file holds a descriptor; the daemon lifts the soft limit (1024 under
    systemd) to the hard one, so a cp of many small files does not fail with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon
    try:
        volume.mount("--writeback-delay", "60")  # all of them stay staged until unmount
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    many = volume.mnt / "many"
    many.mkdir()
    for i in range(400):
        (many / f"f{i}").write_bytes(b"x" * i)
    volume.umount()
    volume.mount()
    assert all((many / f"f{i}").read_bytes() == b"x" * i for i in range(400))
    volume.umount()


def test_a_shorter_rewrite_through_o_trunc_leaves_nothing_of_the_old(volume: Volume) -> None:
    """``printf x > f`` over a longer f: libfuse's atomic_o_trunc hands O_TRUNC to the open
    and sends no truncate, and the open did not truncate: f kept its old size and every
    byte after x (found by tests/e2e/test_two_mounts.py, issue 18). Also after a remount,
    through the shell and through Python's open("w")."""
    volume.mount()
    f = volume.mnt / "f"
    old = b"".join(b"old line %05d\n" % i for i in range(6000))  # 90 KB, two chunks
    f.write_bytes(old)
    assert f.read_bytes() == old
    sh("sh", "-c", 'printf "%s\\n" new > "$1"', "sh", str(f))
    assert f.read_bytes() == b"new\n" and f.stat().st_size == 4
    sh("sh", "-c", 'printf "%s\\n" more >> "$1"', "sh", str(f))
    f2 = volume.mnt / "g"
    f2.write_bytes(old)
    volume.umount()
    volume.mount()
    assert f.read_bytes() == b"new\nmore\n"
    f2.write_text("short\n")  # O_WRONLY|O_CREAT|O_TRUNC on a file this mount has not read
    assert f2.read_bytes() == b"short\n"
    volume.umount()
    volume.mount()
    assert f2.read_bytes() == b"short\n"
    volume.umount()
