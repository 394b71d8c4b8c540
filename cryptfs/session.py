"""Connecting to a volume: the S3 store, the KMS client on the same loop thread, server-side
encryption settings and unlocking.  Shared by the CLI commands, the mount daemon and the
offline tools, so that every one of them opens a volume the same way.

Resource handling:
    ``open_remote()`` owns the S3 and KMS clients (one asyncio loop thread) and closes them.
Error handling:
    SSE mismatches while reading the volume config become one-line ``UsageError``s that say
    which flag is missing or superfluous.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cryptfs.crypto import Secret
from cryptfs.errors import AccessDenied, SseMismatch, UsageError
from cryptfs.format.volume import KeySource
from cryptfs.store.kms import KmsClient, KmsOptions, open_kms
from cryptfs.store.s3 import S3Location, S3Options, S3Store, open_s3_store
from cryptfs.store.sse import Sse
from cryptfs.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class Remote:
    """Where and how to talk to S3 and KMS (no volume-specific secrets except SSE-C's)."""

    s3: S3Options = field(default_factory=S3Options)
    kms: KmsOptions = field(default_factory=KmsOptions)
    sse_c_key: Secret | None = None
    s3ec_keys: tuple[Secret, ...] = ()  # raw AES keys of the AWS S3 Encryption Client
    s3ec_kms_keys: tuple[str, ...] = ()  # KMS keys their data keys may be under

    def __repr__(self) -> str:
        return f"<Remote s3={self.s3.endpoint_url} kms={self.kms.endpoint_url}>"


@asynccontextmanager
async def open_remote(loc: S3Location, remote: Remote) -> AsyncIterator[tuple[S3Store, KmsClient]]:
    async with open_s3_store(loc, remote.s3) as store, open_kms(store.bridge, remote.kms) as kms:
        if remote.sse_c_key is not None:
            # SSE-C objects (the config included) cannot even be read without the key
            store.set_sse(Sse("c", customer_key=remote.sse_c_key))
        yield store, kms


def sse_from_config(sse: dict[str, str] | None, customer_key: Secret | None) -> Sse | None:
    if sse is None:
        return None
    if sse["mode"] == "c":
        return Sse("c", customer_key=customer_key)
    return Sse(sse["mode"], kms_key_id=sse.get("key_id"))


async def open_volume(
    store: S3Store, kms: KmsClient, source: KeySource, remote: Remote | None = None
) -> Volume:
    """Load the config, unlock it, and switch the store to the volume's SSE settings."""
    given_c = store.sse is not None and store.sse.mode == "c"
    try:
        vol = await Volume.open(store, source, kms)
    except SseMismatch:
        if given_c:
            raise UsageError("this volume does not use SSE-C: drop --sse-c-key-file") from None
        raise UsageError("this volume uses SSE-C: give --sse-c-key-file") from None
    except AccessDenied as e:
        if given_c:
            raise AccessDenied(f"{e} (wrong SSE-C key?)") from None
        raise
    sse = vol.config.sse
    if sse is not None and sse["mode"] == "c" and not given_c:
        raise UsageError("this volume uses SSE-C: give --sse-c-key-file")
    if given_c and (sse is None or sse["mode"] != "c"):
        raise UsageError("this volume does not use SSE-C: drop --sse-c-key-file")
    store.set_sse(sse_from_config(sse, store.sse.customer_key if store.sse else None))
    if remote is not None:
        vol.keyring.s3ec_keys = list(remote.s3ec_keys)
        vol.keyring.s3ec_kms_keys = [await kms.key_arn(k) for k in remote.s3ec_kms_keys]
    return vol


@asynccontextmanager
async def volume_session(
    store: S3Store, kms: KmsClient, source: KeySource, remote: Remote | None = None
) -> AsyncIterator[Volume]:
    """``open_volume``, and its keyring closed when the block ends, however it ends: the
    master key and the unwrapped data keys leave memory with the command."""
    vol = await open_volume(store, kms, source, remote)
    try:
        yield vol
    finally:
        vol.keyring.close()
