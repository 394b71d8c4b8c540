"""The one request path of the store's S3 calls: HEAD, GET, PUT, CopyObject, DeleteObject,
DeleteObjects, ListObjectsV2, the multipart calls (create, UploadPart, UploadPartCopy,
complete, abort, ListMultipartUploads).

Owns: AWS Signature Version 4 for those requests (``SigV4``), their aiohttp session and
connection pool, their one retry policy (``LeanS3``), the parsers of S3's XML answers, and
the error an S3 refusal raises (``ErrorAnswer``).  Runs on the bridge's asyncio loop thread,
inside the coroutines ``store.s3.S3Store`` submits; only ``store.s3`` uses it.
Must not import: fs, fuse, format.

Why a signer of our own rather than botocore's request path: botocore spends 1.0–1.3 ms of
CPU on every request here (event hooks, parameter validation, endpoint rules, user-agent
assembly, model-driven serialising and parsing, dateutil), against 0.2–0.3 ms for the same
signed request built directly (docs/PERFORMANCE.md has the measurement).  On two cores shared
with the S3 server that is most of a small file's cost.  botocore keeps what it does best: the
credential chain (this module asks the same botocore session for credentials on every request,
so refreshable credentials refresh), endpoint and region resolution, and the bucket probe at
mount (``store.s3``); the unit tests check this signer against botocore's.

Error handling:
    A non-2xx answer raises ``ErrorAnswer`` (S3's error code, message and HTTP status), which
    ``store.classify`` maps to ``cryptfs.errors``; transport errors (connection reset,
    timeout, truncated body) and answers S3 documents as transient (500, 502, 503, 504, 429,
    ``SlowDown``, ``RequestTimeout`` …) are retried like botocore's "standard" mode: at most
    ``attempts`` tries in all, exponential backoff with full jitter, capped at 20 s.  What is
    left is raised unchanged for ``store.classify``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import html
import re
import secrets
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote_plus, urlsplit
from xml.etree import ElementTree

import aiohttp
import aiohttp.payload
from botocore.exceptions import NoCredentialsError
from botocore.httpsession import create_urllib3_context, get_cert_path
from yarl import URL

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class ErrorAnswer(Exception):
    """S3 refused a request: a non-2xx answer, an error body after a 200 status line, or an
    answer that is not what the request calls for.  ``store.classify`` maps it to a domain
    error; its text holds no key (the request's URL is not kept)."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{code} (HTTP {status})" + (f": {message}" if message else ""))
        self.status = status
        self.code = code
        self.message = message


_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# botocore's standard retry mode: transient and throttling error codes
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestThrottled",
        "EC2ThrottledException",
        "TransactionInProgressException",
    }
)
_MAX_BACKOFF = 20.0
_META = "x-amz-meta-"
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_ETAG = re.compile(rb"<ETag>([^<]{1,200})</ETag>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,1000})</Message>")
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


class FrozenCredentials(Protocol):
    access_key: str
    secret_key: str
    token: str | None


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class SigV4:
    """Signs S3 requests with an unsigned payload (AES-GCM authenticates every body byte).

    Every header passed in is signed, with ``host``, ``x-amz-date``,
    ``x-amz-content-sha256`` and (temporary credentials) ``x-amz-security-token`` added.
    The derived signing key is kept per secret and day.
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key: tuple[str, str, bytes] | None = None  # (secret, day, signing key)

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key is None or self._key[0] != secret or self._key[1] != day:
            k = _hmac(("AWS4" + secret).encode(), day)
            k = _hmac(_hmac(_hmac(k, self.region), self.service), "aws4_request")
            self._key = (secret, day, k)
        return self._key[2]

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        headers: dict[str, str],
        creds: FrozenCredentials,
        now: datetime.datetime,
        query: str = "",
    ) -> dict[str, str]:
        """``path`` is already URI-encoded (each byte once, as S3 wants); ``query`` is the
        canonical query string (``canonical_query``).

        Returns the headers to send, ``Authorization`` included; ``headers`` is not changed.
        """
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        out = dict(headers)
        out["x-amz-date"] = amz_date
        out["x-amz-content-sha256"] = UNSIGNED_PAYLOAD
        if creds.token:
            out["x-amz-security-token"] = creds.token
        canon = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
        canon["host"] = host
        names = sorted(canon)
        signed = ";".join(names)
        request = "\n".join(
            (
                method,
                path,
                query,
                "".join(f"{n}:{canon[n]}\n" for n in names),
                signed,
                UNSIGNED_PAYLOAD,
            )
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            ("AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest())
        )
        sig = hmac.new(
            self._signing_key(creds.secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        out["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={sig}"
        )
        out["Host"] = host
        return out


def canonical_query(params: Mapping[str, str]) -> str:
    """The query string as SigV4 signs it (and as it is sent): sorted, each part encoded."""
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )


class _Body(aiohttp.payload.Payload):
    """A request body of bytes, handed to the transport in 1 MiB views: no copies (aiohttp's
    own payloads for bytes warn above 1 MiB, and for BytesIO copy it 64 KiB at a time with a
    loop wake-up each, 20 % of the loop thread's time while uploading parts)."""

    def __init__(self, value: bytes | memoryview) -> None:
        super().__init__(value, content_type="application/octet-stream")
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a binary body")

    async def write(self, writer: Any) -> None:
        view = memoryview(self._value)
        for i in range(0, len(view), 1 << 20):
            await writer.write(view[i : i + (1 << 20)])


def http_date(value: str) -> float:
    """Epoch seconds of an RFC 7231 date (``Tue, 01 Dec 2026 17:46:54 GMT``); 0.0 if not one."""
    try:
        if len(value) == 29 and value.endswith(" GMT"):
            return datetime.datetime(
                int(value[12:16]),
                _MONTHS[value[8:11]],
                int(value[5:7]),
                int(value[17:19]),
                int(value[20:22]),
                int(value[23:25]),
                tzinfo=datetime.UTC,
            ).timestamp()
    except (KeyError, ValueError):
        pass
    return 0.0


def sse_customer_headers(key: bytes, prefix: str = "") -> dict[str, str]:
    """SSE-C headers (``prefix``: ``copy-source-`` for the source of a copy)."""
    p = f"x-amz-{prefix}server-side-encryption-customer-"
    return {
        p + "algorithm": "AES256",
        p + "key": base64.b64encode(key).decode(),
        p + "key-MD5": base64.b64encode(hashlib.md5(key).digest()).decode(),  # noqa: S324 - S3's key checksum
    }


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: its status, headers (case-insensitive) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def metadata(self) -> dict[str, str]:
        """User metadata, names lower-cased as S3 stores them."""
        n = len(_META)
        return {k[n:].lower(): v for k, v in self.headers.items() if k.lower().startswith(_META)}

    def sse(self) -> dict[str, str]:
        """The server-side encryption the answer reports, under botocore's response names."""
        h = self.headers
        out = {}
        for name, header in (
            ("ServerSideEncryption", "x-amz-server-side-encryption"),
            ("SSEKMSKeyId", "x-amz-server-side-encryption-aws-kms-key-id"),
            ("SSECustomerAlgorithm", "x-amz-server-side-encryption-customer-algorithm"),
        ):
            if header in h:
                out[name] = h[header]
        return out


def _ssl_context(verify: bool | str, ca_bundle: str | None) -> ssl.SSLContext | bool:
    """The TLS settings aiobotocore would use for the same ``verify`` (and ``AWS_CA_BUNDLE``
    or the profile's ``ca_bundle``)."""
    if verify is False:
        return False
    ctx: ssl.SSLContext = create_urllib3_context()
    ctx.check_hostname = True
    cert = get_cert_path(verify if isinstance(verify, str) else (ca_bundle or True))
    if cert:
        ctx.load_verify_locations(cert, None, None)
    return ctx


STYLES = ("auto", "path", "virtual")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def addressing_style(style: str, endpoint_url: str | None, bucket: str) -> str:
    """How requests name ``bucket``: ``path`` (``host/bucket/key``) or ``virtual``
    (``bucket.host/key``).  ``auto``, as botocore's: virtual-hosted on AWS endpoints for a
    bucket name that can be a host name (over https, one without dots: the certificate is a
    wildcard of one label), path style on a custom endpoint (``endpoint_url``: an
    S3-compatible server, which may know no bucket host names)."""
    if style not in STYLES:
        raise ValueError(f"addressing style must be one of {', '.join(STYLES)}, not {style!r}")
    if style != "auto":
        return style
    if endpoint_url is not None:
        host = (urlsplit(endpoint_url).hostname or "").lower()
        if not (host == "amazonaws.com" or host.endswith(".amazonaws.com")):
            return "path"
        https = urlsplit(endpoint_url).scheme == "https"
    else:
        https = True
    return "virtual" if _dns_bucket(bucket, https) else "path"


def _dns_bucket(bucket: str, https: bool) -> bool:
    if not 3 <= len(bucket) <= 63 or (https and "." in bucket):
        return False
    labels = bucket.split(".")
    if all(label.isdigit() for label in labels):  # (an IP address)
        return False
    return all(_DNS_LABEL.match(label) for label in labels)


class LeanS3:
    """Object requests, signed here, sent with aiohttp.  Loop-thread only."""

    def __init__(
        self,
        session: Any,  # aiobotocore session: the credential chain
        endpoint_url: str,
        region: str,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        attempts: int,
        verify: bool | str,
        style: str = "path",
    ) -> None:
        self._botocore = session
        u = urlsplit(endpoint_url)
        self._scheme, self._netloc = u.scheme, u.netloc
        self._origin = f"{u.scheme}://{u.netloc}"
        self.style = style  # "path" or "virtual" (``addressing_style``)
        self._proxies: dict[str, str | None] = {}
        self._path_base = quote(u.path.rstrip("/"), safe="/~")
        self.host = u.netloc.lower()
        if (u.scheme, u.port) in (("https", 443), ("http", 80)):
            self.host = self.host.rsplit(":", 1)[0]
        self.signer = SigV4(region)
        self.attempts = max(1, attempts)
        self._limit = limit
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._verify = verify
        self._http: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    async def open(self) -> None:
        ctx = _ssl_context(self._verify, self._botocore.get_config_variable("ca_bundle"))
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit, ssl=ctx, keepalive_timeout=12),
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            # trust_env would read ~/.netrc and the proxy variables again on every request
            # (in an executor thread): the proxy is resolved once, below
            trust_env=False,
        )
        self._proxy = _env_proxy(self._origin)
        self._proxies = {self._origin: self._proxy}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(
        self,
        method: str,
        bucket: str,
        key: str,
        headers: dict[str, str],
        body: bytes | memoryview | None = None,
        query: Mapping[str, str] | None = None,
        *,
        error_in_200: bool = False,
    ) -> Answer:
        """One S3 object request, retried while the failure is transient."""
        assert self._http is not None
        qs = canonical_query(query) if query else ""
        origin, host, path = self._origin, self.host, self._path_base
        if self.style == "virtual":  # bucket.host/key, signed for the Host actually sent
            origin = f"{self._scheme}://{bucket}.{self._netloc}"
            host = f"{bucket}.{self.host}"
            path += "/" + quote(key, safe="/~")
        else:
            path += f"/{bucket}" + (f"/{quote(key, safe='/~')}" if key else "")
        url = URL(origin + path + (f"?{qs}" if qs else ""), encoded=True)
        if origin not in self._proxies:
            self._proxies[origin] = _env_proxy(origin)
        proxy = self._proxies[origin]
        attempt = 0
        while True:
            attempt += 1
            try:
                creds = await self._credentials()
                now = datetime.datetime.now(datetime.UTC)
                signed = self.signer.sign(method, host, path, headers, creds, now, qs)
                payload = None if body is None else _Body(body)
                async with self._http.request(
                    method, url, headers=signed, data=payload, proxy=proxy
                ) as r:
                    data = await r.read()
                    status, got = r.status, r.headers
            except (aiohttp.ClientError, TimeoutError, OSError):
                if attempt >= self.attempts:
                    raise
                await self._backoff(attempt)
                continue
            # CopyObject can fail after its 200 status line: the error is then the body
            if status < 300 and not (error_in_200 and b"<Error>" in data[:512]):
                return Answer(status, got, data)
            code, message = _error_of(status, data)
            transient = status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
            if attempt < self.attempts and transient:
                await self._backoff(attempt)
                continue
            raise ErrorAnswer(status, code, message)

    async def _credentials(self) -> FrozenCredentials:
        creds = await self._botocore.get_credentials()
        if creds is None:
            raise NoCredentialsError()
        return await creds.get_frozen_credentials()  # type: ignore[no-any-return]

    @staticmethod
    async def _backoff(attempt: int) -> None:
        # full jitter over an exponential base, as botocore's standard mode
        cap = min(_MAX_BACKOFF, 2.0 ** (attempt - 1))
        await asyncio.sleep(cap * secrets.randbelow(1 << 16) / (1 << 16))


@dataclass(frozen=True)
class ListPage:
    """One page of ListObjectsV2 (keys decoded): (key, size, etag, modified) per object."""

    objects: list[tuple[str, int, str, float]]
    prefixes: list[str]
    next_token: str | None  # None: the last page


def parse_list_page(body: bytes) -> ListPage:
    """A ListObjectsV2 answer asked with ``encoding-type=url`` (keys are %-encoded, so that
    any byte of a key survives XML)."""
    # the S3 server's own answer; expat (Python >= 3.11) refuses entity expansion attacks
    root = ElementTree.fromstring(body)  # noqa: S314
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    encoded = root.findtext(f"{ns}EncodingType") == "url"

    def name(v: str | None) -> str:
        return unquote_plus(v or "") if encoded else (v or "")

    objects = [
        (
            name(c.findtext(f"{ns}Key")),
            int(c.findtext(f"{ns}Size") or 0),
            c.findtext(f"{ns}ETag") or "",
            iso_date(c.findtext(f"{ns}LastModified") or ""),
        )
        for c in root.iter(f"{ns}Contents")
    ]
    prefixes = [name(p.findtext(f"{ns}Prefix")) for p in root.iter(f"{ns}CommonPrefixes")]
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    return ListPage(
        objects, prefixes, root.findtext(f"{ns}NextContinuationToken") if truncated else None
    )


def copy_etag(body: bytes) -> str:
    """The new object's ETag from a CopyObject answer."""
    m = _ETAG.search(body)
    if m is None:
        raise ErrorAnswer(200, "InvalidCopyAnswer", "no ETag")
    return html.unescape(m.group(1).decode())


def iso_date(value: str) -> float:
    """Epoch seconds of an ISO 8601 time as listings give it; 0.0 if not one."""
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0


def _env_proxy(origin: str) -> str | None:
    """The proxy for ``origin`` from HTTP(S)_PROXY / NO_PROXY, as botocore would use it."""
    u = urlsplit(origin)
    if urllib.request.proxy_bypass_environment(u.hostname or ""):  # type: ignore[attr-defined]
        return None
    return urllib.request.getproxies_environment().get(u.scheme)


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    """S3's error code and message from an XML error body; HEAD answers have no body, so
    their code is the status (as botocore reports them)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return (
        code.group(1).decode("utf-8", "replace") if code else str(status),
        message.group(1).decode("utf-8", "replace") if message else "",
    )


def _root(body: bytes) -> tuple[ElementTree.Element, str]:
    """An S3 answer's XML; one that is not XML is an S3 error (never a parser's exception)."""
    try:
        # the S3 server's own answer; expat (Python >= 3.11) refuses entity expansion attacks
        root = ElementTree.fromstring(body)  # noqa: S314
    except ElementTree.ParseError:
        raise ErrorAnswer(200, "InvalidAnswer", "not XML") from None
    return root, (root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else "")


def xml_text(body: bytes, tag: str) -> str:
    """The text of the first ``tag`` of an S3 answer (CreateMultipartUpload's UploadId,
    CompleteMultipartUpload's ETag); an answer without one is an S3 error."""
    root, ns = _root(body)
    value = root.findtext(f".//{ns}{tag}")
    if not value:
        raise ErrorAnswer(200, "InvalidAnswer", f"no {tag}")
    return value


@dataclass(frozen=True)
class UploadsPage:
    """One page of ListMultipartUploads: (key, upload id, initiated) per upload."""

    uploads: list[tuple[str, str, float]]
    next: tuple[str, str] | None  # (key marker, upload id marker); None: the last page


def parse_uploads_page(body: bytes) -> UploadsPage:
    """A ListMultipartUploads answer asked with ``encoding-type=url``."""
    root, ns = _root(body)
    encoded = root.findtext(f"{ns}EncodingType") == "url"

    def name(v: str | None) -> str:
        return unquote_plus(v or "") if encoded else (v or "")

    uploads = [
        (
            name(u.findtext(f"{ns}Key")),
            u.findtext(f"{ns}UploadId") or "",
            iso_date(u.findtext(f"{ns}Initiated") or ""),
        )
        for u in root.iter(f"{ns}Upload")
    ]
    if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true":
        return UploadsPage(uploads, None)
    marker = (name(root.findtext(f"{ns}NextKeyMarker")), root.findtext(f"{ns}NextUploadIdMarker"))
    return UploadsPage(uploads, (marker[0], marker[1] or ""))


def delete_body(keys: list[str]) -> bytes:
    """DeleteObjects' request, quiet (only failures are answered)."""
    objects = "".join(f"<Object><Key>{html.escape(k)}</Key></Object>" for k in keys)
    return f"<Delete><Quiet>true</Quiet>{objects}</Delete>".encode()


def content_md5(body: bytes) -> str:
    """DeleteObjects must carry one (an integrity check of the request, not security)."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def parse_delete_errors(body: bytes) -> list[tuple[str, str, str]]:
    """(key, code, message) of each key a DeleteObjects answer says it could not delete."""
    root, ns = _root(body)
    return [
        (
            e.findtext(f"{ns}Key") or "",
            e.findtext(f"{ns}Code") or "",
            e.findtext(f"{ns}Message") or "",
        )
        for e in root.iter(f"{ns}Error")
    ]
