"""Object user metadata: encrypted attributes bound to the object's path (docs/FORMAT.md §3).

Every object (file, symlink, directory marker) carries:

=========  =================================================================
``cfs``    format marker ``"1"``
``cfs-f``  base64url(file_id), 16 bytes
``cfs-w``  data-key wrapping: ``"gcm"`` (local master key) or ``"kms"``; directories ``"-"``
``cfs-kid`` wrapping key id: ``"vmk"`` (legacy), ``"mk-…"`` (local) or a KMS key ARN
``cfs-k``  base64url(wrapped data key) (absent on directory markers)
``cfs-a``  base64url(nonce ‖ AES-GCM(K_attrs, attributes JSON, AAD))
``cfs-n``  full encrypted name, only for long names
=========  =================================================================

The attributes AAD is ``label ‖ volume_id ‖ file_id ‖ path``: an object copied or moved to
another key by anyone without the volume key no longer authenticates (EIO).  The attributes
hold the body generation's salt and the plaintext size, so metadata cannot be paired with
another generation of the same file's body either.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, replace

from cryptfs.errors import IntegrityError, UnsupportedFormat
from cryptfs.format.keys import SCHEME_KMS, SCHEME_LOCAL, VolumeKeys, WrappedKey
from cryptfs.format.names import b64d, b64e

FORMAT = "1"
KIND_FILE = "f"
KIND_DIR = "d"
KIND_LINK = "l"
_KIND_BITS = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_LINK: stat.S_IFLNK}
_ATTR_LABEL = b"cryptfs/v1/attrs\0"


@dataclass(frozen=True)
class Attrs:
    kind: str
    mode: int  # permission bits only (07777)
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    size: int = 0  # plaintext size of the body this metadata belongs to
    salt: bytes = b""  # body generation this metadata belongs to (empty for directories)

    @property
    def st_mode(self) -> int:
        return _KIND_BITS[self.kind] | (self.mode & 0o7777)

    def with_(self, **kw: object) -> Attrs:
        return replace(self, **kw)  # type: ignore[arg-type]

    def to_json(self) -> bytes:
        d = {
            "t": self.kind,
            "m": self.mode,
            "u": self.uid,
            "g": self.gid,
            "mt": self.mtime_ns,
            "ct": self.ctime_ns,
            "at": self.atime_ns,
            "sz": self.size,
            "gen": b64e(self.salt),
        }
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Attrs:
        try:
            d = json.loads(data)
            a = cls(
                kind=str(d["t"]),
                mode=int(d["m"]),
                uid=int(d["u"]),
                gid=int(d["g"]),
                mtime_ns=int(d["mt"]),
                ctime_ns=int(d["ct"]),
                atime_ns=int(d["at"]),
                size=int(d["sz"]),
                salt=b64d(str(d["gen"])),
            )
        except (ValueError, KeyError, TypeError):
            raise IntegrityError("malformed attributes") from None
        if a.kind not in _KIND_BITS:
            raise UnsupportedFormat(f"unknown object kind {a.kind!r}")
        return a


@dataclass(frozen=True)
class ObjectMeta:
    file_id: bytes
    attrs: Attrs
    dek: WrappedKey | None  # None for directory markers
    long_name: str | None = None


def _attr_aad(keys: VolumeKeys, file_id: bytes, path: bytes) -> bytes:
    return _ATTR_LABEL + keys.volume_id + file_id + path


def encode_meta(keys: VolumeKeys, path: bytes, meta: ObjectMeta) -> dict[str, str]:
    md = {
        "cfs": FORMAT,
        "cfs-f": b64e(meta.file_id),
        "cfs-w": meta.dek.scheme if meta.dek is not None else "-",
        "cfs-kid": meta.dek.kid if meta.dek is not None else "-",
        "cfs-a": b64e(
            keys.attrs.seal_random(meta.attrs.to_json(), _attr_aad(keys, meta.file_id, path))
        ),
    }
    if meta.dek is not None:
        md["cfs-k"] = b64e(meta.dek.blob)
    if meta.long_name is not None:
        md["cfs-n"] = meta.long_name
    return md


def decode_meta(keys: VolumeKeys, path: bytes, md: dict[str, str]) -> ObjectMeta:
    """Authenticate and parse; raises IntegrityError for anything not written for ``path``."""
    if md.get("cfs") != FORMAT:
        if "cfs" in md:
            raise UnsupportedFormat(f"object format {md['cfs']!r} not supported")
        raise IntegrityError("object has no cryptfs metadata (foreign object)")
    try:
        file_id = b64d(md["cfs-f"])
        wrap = md["cfs-w"]
        kid = md["cfs-kid"]
        sealed = b64d(md["cfs-a"])
    except KeyError as e:
        raise IntegrityError(f"metadata field {e.args[0]} missing") from None
    if len(file_id) != 16:
        raise IntegrityError("bad file id")
    try:
        attrs = Attrs.from_json(keys.attrs.open_random(sealed, _attr_aad(keys, file_id, path)))
    except IntegrityError:
        raise IntegrityError("attributes do not authenticate for this path") from None
    wrapped: WrappedKey | None
    if attrs.kind == KIND_DIR:
        wrapped = None
    elif wrap in (SCHEME_LOCAL, SCHEME_KMS) and "cfs-k" in md:
        wrapped = WrappedKey(wrap, kid, b64d(md["cfs-k"]))
    else:
        raise UnsupportedFormat(f"data-key wrapping {wrap!r} not supported")
    return ObjectMeta(file_id, attrs, wrapped, md.get("cfs-n"))
