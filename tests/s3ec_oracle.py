"""The official AWS S3 Encryption Client as a test oracle, run in a venv of its own.

``amazon-s3-encryption-client-python`` pins ``cryptography<49``; cryptfs wants 50 or later,
the first whose AES-GCM releases the GIL (its worker threads then seal and open in
parallel).  So the oracle lives in ``.venv-oracle`` (``make install``) and is driven through
this script: one JSON request on stdin, one JSON answer on stdout.

Request: ``{"op": "put" | "get", "s3": URL, "kms": URL, "key_arn": ARN, "bucket": B,
"objects": ...}``: for ``put`` ``{key: [version, base64 body]}``, for ``get`` ``{key:
version}``, answered with ``{key: base64 body}``; credentials from the environment.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any


def _clients(req: dict[str, Any]) -> tuple[Any, Any]:
    import boto3
    from s3_encryption import (
        AlgorithmSuite,
        CommitmentPolicy,
        S3EncryptionClient,
        S3EncryptionClientConfig,
    )
    from s3_encryption.materials.kms_keyring import KmsKeyring

    def client(service: str, endpoint: str) -> Any:
        return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1")

    keyring = KmsKeyring(client("kms", req["kms"]), req["key_arn"])
    # one boto3 S3 client per S3EC client: each registers its own event hooks
    v3 = S3EncryptionClient(client("s3", req["s3"]), S3EncryptionClientConfig(keyring=keyring))
    v2 = S3EncryptionClient(
        client("s3", req["s3"]),
        S3EncryptionClientConfig(
            keyring=keyring,
            encryption_algorithm=AlgorithmSuite.ALG_AES_256_GCM_IV12_TAG16_NO_KDF,
            commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT,
        ),
    )
    return v3, v2


def main() -> None:
    req = json.load(sys.stdin)
    v3, v2 = _clients(req)
    bucket = req["bucket"]
    out: dict[str, str] = {}
    if req["op"] == "put":
        for key, (version, body) in req["objects"].items():
            c = v3 if version == 3 else v2
            c.put_object(Bucket=bucket, Key=key, Body=base64.b64decode(body))
    else:
        for key, version in req["objects"].items():
            c = v3 if version == 3 else v2
            out[key] = base64.b64encode(
                c.get_object(Bucket=bucket, Key=key)["Body"].read()
            ).decode()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
