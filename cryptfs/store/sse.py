"""Server-side encryption of S3 (SSE-S3, SSE-KMS, SSE-C): the one builder of its request
headers, and the check that what S3 answers was stored as the volume requires.

Must not import: anything of cryptfs but ``crypto``, ``errors`` and ``store.lean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptfs.crypto import Secret
from cryptfs.errors import SseMismatch
from cryptfs.store.lean import sse_customer_headers

_SSE_HEADER = {"s3": "AES256", "kms": "aws:kms"}


@dataclass(frozen=True, repr=False)
class Sse:
    """Server-side encryption applied to every object call (on top of client-side).

    ``s3``: SSE-S3 (AES256); ``kms``: SSE-KMS with ``kms_key_id`` (else the bucket's default
    AWS managed key); ``c``: SSE-C with ``customer_key``, sent on every PUT, GET, HEAD, COPY
    and multipart call.  Responses to reads are checked: an object stored without the
    required encryption is an ``SseMismatch``, never silently accepted.
    """

    mode: str
    kms_key_id: str | None = None
    customer_key: Secret | None = None

    def __repr__(self) -> str:
        return f"<Sse {self.mode}{' ' + self.kms_key_id if self.kms_key_id else ''}>"

    def _customer_headers(self, prefix: str = "") -> dict[str, str]:
        if self.mode != "c":
            return {}
        assert self.customer_key is not None
        return sse_customer_headers(self.customer_key.reveal(), prefix)

    def copy_source_headers(self) -> dict[str, str]:
        """For the source of CopyObject and UploadPartCopy (SSE-C: its key again)."""
        return self._customer_headers("copy-source-")

    def create_headers(self) -> dict[str, str]:
        """For PutObject, CreateMultipartUpload and the destination of CopyObject."""
        if self.mode == "c":
            return self.access_headers()
        h = {"x-amz-server-side-encryption": _SSE_HEADER[self.mode]}
        if self.mode == "kms" and self.kms_key_id:
            h["x-amz-server-side-encryption-aws-kms-key-id"] = self.kms_key_id
        return h

    def access_headers(self) -> dict[str, str]:
        """For GetObject, HeadObject, UploadPart(Copy) and CompleteMultipartUpload."""
        return self._customer_headers()

    def check(self, resp: Mapping[str, Any], what: str) -> None:
        if self.mode == "c":
            ok = resp.get("SSECustomerAlgorithm") == "AES256"
        else:
            ok = resp.get("ServerSideEncryption") == _SSE_HEADER[self.mode]
            if ok and self.mode == "kms" and self.kms_key_id and resp.get("SSEKMSKeyId"):
                got = str(resp["SSEKMSKeyId"])
                ok = got == self.kms_key_id or got.endswith(self.kms_key_id.split(":")[-1])
        if not ok:
            raise SseMismatch(
                f"{what}: stored without the volume's required server-side encryption "
                f"(SSE-{self.mode.upper()})",
                object_keys=(what,),
            )


__all__ = ["Sse"]
