"""AWS KMS through aiobotocore, on the same asyncio loop thread as the S3 client.

Owns: the KMS client and the classification of KMS errors into ``cryptfs.errors``.
Must not import: format, fs, fuse, keys.

Resource handling:
    ``open_kms()`` creates the client on the bridge's loop and closes it there.  Plaintext data
    keys cross into trio only wrapped in ``Secret``.
Transport:
    KMS requests carry the volume's master key (keyslots) and every data key in plaintext
    inside TLS: an endpoint that is plain ``http://`` (given, or resolved by botocore from
    ``AWS_ENDPOINT_URL_KMS``, ``AWS_ENDPOINT_URL`` or the profile's ``endpoint_url``) is
    refused unless it is a loopback address, where nothing leaves the machine.  An explicit
    ``endpoint_url`` is refused when the client is opened; one that only the environment or
    the profile supplies (``AWS_ENDPOINT_URL`` is often an S3 server's) when KMS is first
    used, so a volume that never needs KMS opens as before.
Error handling:
    botocore's standard retry mode retries throttling and transient errors with exponential
    backoff and jitter (``max_attempts``); what is left is mapped by ``_classify``: denied,
    disabled, pending deletion, not found -> ``KeyAccessDenied`` (final); a ciphertext that
    does not decrypt under the given encryption context -> ``IntegrityError``; the rest ->
    ``KeyServiceUnavailable``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from cryptfs.crypto import Secret
from cryptfs.errors import (
    IntegrityError,
    KeyAccessDenied,
    KeyServiceError,
    KeyServiceUnavailable,
    UsageError,
)
from cryptfs.store.bridge import AsyncioBridge

log = logging.getLogger(__name__)

_DENIED = {
    "AccessDeniedException",
    "DisabledException",
    "NotFoundException",
    "KMSInvalidStateException",
    "InvalidKeyUsageException",
    "IncorrectKeyException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
}


@dataclass(frozen=True)
class KmsOptions:
    endpoint_url: str | None = None
    region: str | None = None
    verify: bool | str = True
    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_concurrency: int = 16


def is_loopback_url(url: str) -> bool:
    """Does ``url`` name this machine (127.0.0.0/8, ::1 or ``localhost``)?"""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cleartext_refusal(url: str) -> str | None:
    """Why KMS must not be used at ``url`` (None: https, or plain http on loopback)."""
    u = urlsplit(url)
    if u.scheme.lower() == "https" or is_loopback_url(url):
        return None
    where = f"{u.scheme}://{u.netloc.rpartition('@')[2]}"  # (never a password in a URL)
    return (
        f"AWS KMS endpoint {where} is not https://: the volume's master key and data keys "
        "would cross the network in clear (only loopback addresses may use http://)"
    )


def _classify(exc: Exception, what: str) -> KeyServiceError | IntegrityError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = str(err.get("Message", "")).strip()
        if code == "InvalidCiphertextException":
            return IntegrityError(
                f"AWS KMS cannot decrypt the {what} (wrong encryption context or corrupted)"
            )
        if code in _DENIED:
            return KeyAccessDenied(f"AWS KMS refused {what}: {code}{': ' + msg if msg else ''}")
        return KeyServiceUnavailable(f"AWS KMS failed {what}: {code or 'error'} {msg}".strip())
    if isinstance(exc, NoCredentialsError):
        return KeyAccessDenied("no AWS credentials for KMS (set AWS_ACCESS_KEY_ID/… or a profile)")
    if isinstance(exc, BotoCoreError | OSError):
        return KeyServiceUnavailable(f"AWS KMS unreachable for {what}: {type(exc).__name__}")
    raise exc


class KmsClient:
    def __init__(self, bridge: AsyncioBridge, client: Any, limit: int) -> None:
        self._bridge = bridge
        self._client = client
        self._limiter = trio.CapacityLimiter(limit)
        self.calls = 0  # requests made, for tests and ``cryptfs stats``
        # the endpoint botocore resolved (flag, environment, profile): never used in clear
        self.endpoint = str(client.meta.endpoint_url)
        self._refusal = cleartext_refusal(self.endpoint)

    async def _call(self, what: str, op: str, **kw: Any) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            return dict(await getattr(self._client, op)(**kw))

        if self._refusal is not None:  # final, before anything is sent
            raise KeyAccessDenied(f"{self._refusal}; refused for {what}")
        async with self._limiter:
            self.calls += 1
            try:
                return await self._bridge.run(run)
            except (ClientError, BotoCoreError, OSError) as e:
                raise _classify(e, what) from None

    async def key_arn(self, key_id: str) -> str:
        """Resolve an alias, id or ARN to the key's ARN; refuses disabled keys."""
        r = await self._call(f"key {key_id}", "describe_key", KeyId=key_id)
        md = r["KeyMetadata"]
        if not md.get("Enabled", True) or md.get("KeyState", "Enabled") != "Enabled":
            raise KeyAccessDenied(f"KMS key {md['Arn']} is {md.get('KeyState', 'disabled')}")
        return str(md["Arn"])

    async def generate_data_key(
        self, key_id: str, context: Mapping[str, str]
    ) -> tuple[Secret, bytes, str]:
        r = await self._call(
            "a new data key",
            "generate_data_key",
            KeyId=key_id,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        return Secret(r["Plaintext"]), bytes(r["CiphertextBlob"]), str(r["KeyId"])

    async def decrypt(
        self, blob: bytes, context: Mapping[str, str], key_id: str | None = None, what: str = ""
    ) -> tuple[Secret, str]:
        kw: dict[str, Any] = {"CiphertextBlob": blob, "EncryptionContext": dict(context)}
        if key_id:
            kw["KeyId"] = key_id
        r = await self._call(what or "a data key", "decrypt", **kw)
        return Secret(r["Plaintext"]), str(r["KeyId"])

    async def encrypt(
        self, key_id: str, plaintext: Secret, context: Mapping[str, str], what: str = ""
    ) -> tuple[bytes, str]:
        r = await self._call(
            what or "a data key",
            "encrypt",
            KeyId=key_id,
            Plaintext=plaintext.reveal(),
            EncryptionContext=dict(context),
        )
        return bytes(r["CiphertextBlob"]), str(r["KeyId"])

    async def re_encrypt(
        self, blob: bytes, context: Mapping[str, str], source_key: str, dest_key: str
    ) -> tuple[bytes, str]:
        """Move a ciphertext to another KMS key inside KMS (the data key never leaves it)."""
        r = await self._call(
            "a data key",
            "re_encrypt",
            CiphertextBlob=blob,
            SourceEncryptionContext=dict(context),
            SourceKeyId=source_key,
            DestinationKeyId=dest_key,
            DestinationEncryptionContext=dict(context),
        )
        return bytes(r["CiphertextBlob"]), str(r["KeyId"])


@asynccontextmanager
async def open_kms(bridge: AsyncioBridge, opts: KmsOptions) -> AsyncIterator[KmsClient]:
    stack = AsyncExitStack()

    async def create() -> Any:
        session = get_session()
        kw: dict[str, Any] = {
            "config": AioConfig(
                max_pool_connections=opts.max_concurrency,
                connect_timeout=opts.connect_timeout,
                read_timeout=opts.read_timeout,
                retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
            ),
            "verify": opts.verify,
            "region_name": opts.region or session.get_config_variable("region") or "us-east-1",
        }
        if opts.endpoint_url:
            kw["endpoint_url"] = opts.endpoint_url
        return await stack.enter_async_context(session.create_client("kms", **kw))

    client = await bridge.run(create)
    try:
        kms = KmsClient(bridge, client, opts.max_concurrency)
        if opts.endpoint_url and kms._refusal is not None:
            raise UsageError(kms._refusal)  # asked for explicitly: refused at once
        yield kms
    finally:
        with trio.CancelScope(shield=True):
            await bridge.run(stack.aclose)
