"""The lean S3 request path (store.lean): its SigV4 signatures are botocore's, byte for byte."""

from __future__ import annotations

import datetime
from urllib.parse import quote

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from cryptfs.store.lean import (
    ErrorAnswer,
    SigV4,
    _error_of,
    canonical_query,
    copy_etag,
    http_date,
    parse_list_page,
    sse_customer_headers,
)

NOW = datetime.datetime(2026, 12, 1, 17, 46, 54, tzinfo=datetime.UTC)


def botocore_authorization(
    method: str, url: str, headers: dict[str, str], creds: Credentials, region: str
) -> str:
    """What botocore's own S3 signer puts in Authorization for the same request."""
    req = AWSRequest(method=method, url=url, headers=headers)
    # as cryptfs configures aiobotocore: s3={"payload_signing_enabled": False}
    req.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    signer = auth.S3SigV4Auth(creds, "s3", region)
    orig = auth.get_current_datetime
    auth.get_current_datetime = lambda: NOW.replace(tzinfo=None)  # type: ignore[assignment]
    try:
        signer.add_auth(req)
    finally:
        auth.get_current_datetime = orig  # type: ignore[assignment]
    return str(req.headers["Authorization"])


@pytest.mark.parametrize(
    ("method", "key", "headers"),
    [
        ("HEAD", "pre/fix/AbC-_x/yz", {}),
        ("GET", "a b+c=d/é~ü!*'()", {"Range": "bytes=0-65535", "If-Match": '"abc"'}),
        (
            "PUT",
            "vol/Zm9v/YmFy",
            {
                "x-amz-meta-cfs": "AQIDBAUG  spaced  value",
                "x-amz-meta-cfs-n": "bG9uZyBuYW1l",
                "Content-Type": "application/octet-stream",
                "If-None-Match": "*",
                **sse_customer_headers(b"k" * 32),
            },
        ),
        ("PUT", "k", {"x-amz-server-side-encryption": "aws:kms", "If-Match": '"0"'}),
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDAbc+/="])
def test_signature_matches_botocore(
    method: str, key: str, headers: dict[str, str], token: str | None
) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    region = "eu-west-3"
    host = "127.0.0.1:8333"
    path = "/bucket/" + quote(key, safe="/~")
    ours = SigV4(region).sign(method, host, path, headers, creds.get_frozen_credentials(), NOW)
    theirs = botocore_authorization(method, f"http://{host}{path}", headers, creds, region)
    assert ours["Authorization"] == theirs
    assert ours["Host"] == host and ours["x-amz-date"] == "20261201T174654Z"
    assert ("x-amz-security-token" in ours) == (token is not None)
    # a different secret or day signs differently (the cached signing key is not reused)
    other = Credentials("AKIDEXAMPLE", "another-secret", token).get_frozen_credentials()
    signer = SigV4(region)
    a = signer.sign(method, host, path, headers, creds.get_frozen_credentials(), NOW)
    b = signer.sign(method, host, path, headers, other, NOW)
    c = signer.sign(
        method, host, path, headers, creds.get_frozen_credentials(), NOW + datetime.timedelta(1)
    )
    assert len({a["Authorization"], b["Authorization"], c["Authorization"]}) == 3


def test_http_date_and_errors() -> None:
    assert http_date("Tue, 01 Dec 2026 17:46:54 GMT") == NOW.timestamp()
    assert http_date("") == 0.0 and http_date("Tue, 01 Foo 2026 17:46:54 GMT") == 0.0
    body = b"<?xml?><Error><Code>NoSuchKey</Code><Message>The key does not exist</Message></Error>"
    assert _error_of(404, body) == ("NoSuchKey", "The key does not exist")
    assert _error_of(412, b"") == ("412", "")  # HEAD answers carry no body
    h = sse_customer_headers(bytes(range(32)))
    assert h["x-amz-server-side-encryption-customer-key"] == (
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    )
    assert h["x-amz-server-side-encryption-customer-key-MD5"] == "tP/LI3N87DFaSk0aoqYgzg=="


def test_query_signature_matches_botocore() -> None:
    """UploadPart: the query (an upload id with characters that must be encoded) is signed."""
    creds = Credentials("AKIDEXAMPLE", "secret")
    qs = canonical_query({"uploadId": "2~x/y+z=AB c", "partNumber": "12"})
    assert qs == "partNumber=12&uploadId=2~x%2Fy%2Bz%3DAB%20c"
    host, path = "s3.example:9000", "/bucket/k"
    ours = SigV4("us-east-1").sign("PUT", host, path, {}, creds.get_frozen_credentials(), NOW, qs)
    theirs = botocore_authorization("PUT", f"http://{host}{path}?{qs}", {}, creds, "us-east-1")
    assert ours["Authorization"] == theirs


def test_list_page_and_copy_answer_parsing() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Name>b</Name><Prefix>p%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"
        b"<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
        b"<NextContinuationToken>tok/+=</NextContinuationToken>"
        b"<Contents><Key>p/a+b%C3%A9%0A</Key><LastModified>2026-12-01T17:46:54.000Z"
        b"</LastModified><ETag>&quot;0123&quot;</ETag><Size>42</Size></Contents>"
        b"<CommonPrefixes><Prefix>p/sub%2F</Prefix></CommonPrefixes></ListBucketResult>"
    )
    page = parse_list_page(body)
    assert page.objects == [("p/a b\u00e9\n", 42, '"0123"', NOW.timestamp())]
    assert page.prefixes == ["p/sub/"] and page.next_token == "tok/+="
    last = body.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert parse_list_page(last).next_token is None
    copied = (
        b'<?xml version="1.0" encoding="UTF-8"?><CopyObjectResult><LastModified>'
        b"2026-12-01T17:46:54.000Z</LastModified><ETag>&#34;abc&#34;</ETag></CopyObjectResult>"
    )
    assert copy_etag(copied) == '"abc"'


def test_addressing_style_auto_is_botocores() -> None:
    """``auto``: virtual-hosted on AWS for a bucket that can be a host name (not over https
    with a dot: the certificate covers one label), path style on a custom endpoint."""
    from cryptfs.store.lean import addressing_style

    aws = "https://s3.eu-west-3.amazonaws.com"
    assert addressing_style("auto", None, "my-bucket") == "virtual"
    assert addressing_style("auto", aws, "my-bucket") == "virtual"
    assert addressing_style("auto", aws, "my.bucket") == "path"
    assert addressing_style("auto", "http://s3.amazonaws.com", "my.bucket") == "virtual"
    for bad in ("My-Bucket", "ab", "a" * 64, "192.168.1.2", "-x-", "a..b", "a_b"):
        assert addressing_style("auto", aws, bad) == "path", bad
    assert addressing_style("auto", "http://127.0.0.1:8333", "my-bucket") == "path"
    assert addressing_style("auto", "https://minio.example", "my-bucket") == "path"
    assert addressing_style("virtual", "http://127.0.0.1:8333", "b") == "virtual"
    assert addressing_style("path", None, "my-bucket") == "path"
    with pytest.raises(ValueError, match="addressing style"):
        addressing_style("dns", None, "b")


def test_a_virtual_hosted_request_is_signed_for_the_host_it_goes_to() -> None:
    """Virtual-hosted: the bucket is in the Host (signed), not in the path; botocore signs
    the same request the same way."""
    creds = Credentials("AKIDEXAMPLE", "secret")
    host, path = "my-bucket.s3.eu-west-3.amazonaws.com", "/vol/Zm9v"
    headers = {"Range": "bytes=0-9"}
    ours = SigV4("eu-west-3").sign("GET", host, path, headers, creds.get_frozen_credentials(), NOW)
    theirs = botocore_authorization("GET", f"https://{host}{path}", headers, creds, "eu-west-3")
    assert ours["Authorization"] == theirs and ours["Host"] == host


def test_multipart_and_delete_answers_parsing() -> None:
    """The control calls moved off botocore (issue 19): their answers, and requests."""
    from cryptfs.store.lean import (
        content_md5,
        delete_body,
        parse_delete_errors,
        parse_uploads_page,
        xml_text,
    )

    ns = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    started = f"<InitiateMultipartUploadResult {ns}><Bucket>b</Bucket><UploadId>u/+="
    assert xml_text((started + "</UploadId></InitiateMultipartUploadResult>").encode(),
                    "UploadId") == "u/+="  # fmt: skip
    assert xml_text(b"<CompleteMultipartUploadResult><ETag>&quot;ab-2&quot;</ETag>"
                    b"</CompleteMultipartUploadResult>", "ETag") == '"ab-2"'  # fmt: skip
    with pytest.raises(ErrorAnswer, match="InvalidAnswer"):
        xml_text(b"<x/>", "UploadId")
    page = parse_uploads_page(
        f"<ListMultipartUploadsResult {ns}><EncodingType>url</EncodingType>"
        "<IsTruncated>true</IsTruncated><NextKeyMarker>p%2Fk</NextKeyMarker>"
        "<NextUploadIdMarker>u2</NextUploadIdMarker><Upload><Key>p/a%20b</Key>"
        "<UploadId>u1</UploadId><Initiated>2026-12-01T17:46:54.000Z</Initiated></Upload>"
        "</ListMultipartUploadsResult>".encode()
    )
    assert page.uploads == [("p/a b", "u1", NOW.timestamp())] and page.next == ("p/k", "u2")
    body = delete_body(["a&b", "c<d"])
    assert body == (b"<Delete><Quiet>true</Quiet><Object><Key>a&amp;b</Key></Object>"
                    b"<Object><Key>c&lt;d</Key></Object></Delete>")  # fmt: skip
    assert content_md5(b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="
    errs = parse_delete_errors(
        f"<DeleteResult {ns}><Error><Key>k</Key><Code>AccessDenied</Code>"
        "<Message>no</Message></Error></DeleteResult>".encode()
    )
    assert errs == [("k", "AccessDenied", "no")]
    for junk in (b"", b"<html>502 Bad Gateway"):  # (an answer that is not XML: an S3 error)
        with pytest.raises(ErrorAnswer, match="InvalidAnswer"):
            parse_delete_errors(junk)


def test_an_s3_refusal_is_classified_by_its_code_and_status() -> None:
    """The transport's own error type (no botocore type in the object path) maps as S3's
    codes say; a HEAD answer has no body, so its status alone decides."""
    from cryptfs.errors import (
        AccessDenied,
        KeyTooLong,
        NotFound,
        PreconditionFailed,
        SseMismatch,
        StoreError,
        StoreUnavailable,
    )
    from cryptfs.store.classify import classify

    def kind(status: int, code: str, message: str = "") -> type:
        return type(classify(ErrorAnswer(status, code, message), "k", ("k",)))

    assert kind(404, "NoSuchKey") is NotFound and kind(404, "404") is NotFound
    assert kind(412, "PreconditionFailed") is PreconditionFailed
    assert kind(409, "ConditionalRequestConflict") is PreconditionFailed
    assert kind(403, "403") is AccessDenied and kind(403, "SignatureDoesNotMatch") is AccessDenied
    assert kind(400, "KeyTooLongError") is KeyTooLong
    assert kind(503, "SlowDown") is StoreUnavailable
    assert kind(500, "InternalError") is StoreUnavailable
    assert kind(400, "InvalidRequest", "The customer-provided key is wrong") is SseMismatch
    assert kind(200, "InvalidAnswer", "not XML") is StoreError
    with pytest.raises(ErrorAnswer, match="InvalidCopyAnswer"):
        copy_etag(b"<CopyObjectResult></CopyObjectResult>")
