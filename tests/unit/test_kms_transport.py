"""KMS requests carry master and data keys: never over plain http off the machine.

No KMS server is needed: the refusal comes before anything is sent (the endpoints are
TEST-NET addresses that no request could reach quickly).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptfs.errors import KeyAccessDenied, UsageError
from cryptfs.store.bridge import open_bridge
from cryptfs.store.kms import KmsOptions, cleartext_refusal, is_loopback_url, open_kms

FAR = "http://192.0.2.7:9"  # TEST-NET-1: not this machine
QUICK = {"max_attempts": 1, "connect_timeout": 0.5, "read_timeout": 0.5}


@pytest.fixture(autouse=True)
def _no_aws_endpoints(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:4566", True),
        ("http://127.8.9.10", True),
        ("http://[::1]:80", True),
        ("http://localhost:4566", True),
        ("http://LOCALHOST.", True),
        ("http://10.0.0.1:4566", False),
        ("http://kms.internal", False),
        ("http://localhost.evil.example", False),
        ("http://[::ffff:10.0.0.1]", False),
    ],
)
def test_loopback_hosts(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback
    assert (cleartext_refusal(url) is None) is loopback
    assert cleartext_refusal(url.replace("http://", "https://", 1)) is None


async def test_an_explicit_plain_http_endpoint_is_refused_at_once() -> None:
    async with open_bridge() as bridge:
        with pytest.raises(UsageError, match=r"not https://.*in clear"):
            async with open_kms(bridge, KmsOptions(endpoint_url=FAR, **QUICK)):
                pass
        # loopback (moto in the tests, a local KMS proxy) stays allowed
        async with open_kms(bridge, KmsOptions(endpoint_url="http://127.0.0.1:9")) as kms:
            assert kms.endpoint == "http://127.0.0.1:9"


def _profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    cfg = tmp_path / "aws-config"
    cfg.write_text(body)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("AWS_PROFILE", "p")


@pytest.mark.parametrize("source", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "profile", "svc"])
async def test_a_resolved_plain_http_endpoint_is_refused_before_any_request(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What botocore resolves by itself (environment, profile) is checked as well; the
    refusal comes at the first request, so a volume that never uses KMS is not affected
    by an AWS_ENDPOINT_URL meant for its S3 server."""
    if source == "profile":
        _profile(tmp_path, monkeypatch, f"[profile p]\nendpoint_url = {FAR}\n")
    elif source == "svc":
        _profile(
            tmp_path,
            monkeypatch,
            f"[profile p]\nservices = s\n[services s]\nkms =\n  endpoint_url = {FAR}\n",
        )
    else:
        monkeypatch.setenv(source, FAR)
    async with open_bridge() as bridge, open_kms(bridge, KmsOptions(**QUICK)) as kms:
        assert kms.endpoint == FAR
        for call in (
            kms.decrypt(b"blob", {"a": "b"}, what="keyslot s1"),
            kms.generate_data_key("alias/k", {"a": "b"}),
            kms.key_arn("alias/k"),
        ):
            with pytest.raises(KeyAccessDenied, match=r"192\.0\.2\.7.*not https://"):
                await call
        assert kms.calls == 0


async def test_https_and_loopback_endpoints_resolved_from_the_environment_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_bridge() as bridge:
        async with open_kms(bridge, KmsOptions(**QUICK)) as kms:
            assert kms.endpoint.startswith("https://kms.")  # AWS itself
            assert kms._refusal is None
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        async with open_kms(bridge, KmsOptions(**QUICK)) as kms:
            assert kms._refusal is None


def test_the_refusal_names_no_password() -> None:
    msg = cleartext_refusal("http://user:secret@kms.internal:8080/path")
    assert msg is not None and "secret" not in msg and "http://kms.internal:8080" in msg
