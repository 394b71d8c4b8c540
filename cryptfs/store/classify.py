"""Which domain error a failed S3 request is.

Owns: the one mapping from what S3 and the transport raise (``store.lean.ErrorAnswer`` for
the object requests, botocore's ``ClientError`` for the bucket probe, aiohttp's, botocore's
and the OS's transport errors) to ``cryptfs.errors``.
Must not import: fs, fuse, format.

A key in the text of an error is declared in its ``object_keys``, so that a log line can cut
it out (``lognames``): transport errors quote the request's URL, which names the key.
"""

from __future__ import annotations

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from cryptfs.errors import (
    AccessDenied,
    BucketNotFound,
    KeyTooLong,
    NotFound,
    PreconditionFailed,
    SseMismatch,
    StoreError,
    StoreUnavailable,
)
from cryptfs.store.lean import ErrorAnswer

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
# what ``classify`` maps; anything else is a bug and propagates unchanged
FAILURES = (ErrorAnswer, ClientError, BotoCoreError, OSError, aiohttp.ClientError)


def classify(exc: Exception, what: str, keys: tuple[str, ...]) -> StoreError:
    """The domain error of a failed request about ``what``, which holds the object ``keys``
    (``CryptfsError.object_keys``: a log line may have to cut them out)."""
    if isinstance(exc, ErrorAnswer):
        return _refused(exc.code, str(exc.status), exc.message, what, keys)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return _refused(str(err.get("Code", "")), status, str(err.get("Message", "")), what, keys)
    if isinstance(exc, NoCredentialsError):
        return AccessDenied("no S3 credentials found (set AWS_ACCESS_KEY_ID/… or a profile)")
    # botocore's transport errors quote the request's URL, the object key in it
    url = getattr(exc, "kwargs", {}).get("endpoint_url")
    info = getattr(exc, "request_info", None)  # aiohttp's answer errors
    keys += (str(url),) if url else (str(info.real_url),) if info is not None else ()
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return StoreUnavailable(f"S3 endpoint unreachable: {exc}", object_keys=keys)
    if isinstance(exc, BotoCoreError | OSError | aiohttp.ClientError):
        return StoreUnavailable(f"S3 request failed: {type(exc).__name__}: {exc}", object_keys=keys)
    raise exc


def _refused(code: str, status: str, msg: str, what: str, keys: tuple[str, ...]) -> StoreError:
    """S3 answered with error ``code`` (may be empty: HEAD answers have no body) and HTTP
    ``status``."""
    if code in _NOT_FOUND or (code == "" and status == "404"):
        return NotFound(what, object_keys=keys)
    if code in _PRECONDITION or status == "412":
        return PreconditionFailed(what, object_keys=keys)
    if code == "NoSuchBucket":
        return BucketNotFound(f"bucket does not exist ({what})", object_keys=keys)
    if code in _DENIED or status == "403":
        return AccessDenied(
            f"access denied by the S3 server ({code or status}) for {what}", object_keys=keys
        )
    if "customer" in msg.lower() and ("key" in msg.lower()):
        return SseMismatch(f"{what}: {msg} (this volume needs --sse-c-key-file)", object_keys=keys)
    if code == "KeyTooLongError":
        return KeyTooLong(what, object_keys=keys)
    if status.startswith("5") or code in ("SlowDown", "RequestTimeout"):
        return StoreUnavailable(f"S3 server error {code or status} for {what}", object_keys=keys)
    return StoreError(f"S3 error {code or status} for {what}", object_keys=keys)
