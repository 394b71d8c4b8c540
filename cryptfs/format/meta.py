"""Object user metadata: encrypted attributes bound to the object's path (docs/FORMAT.md §3).

Revision 2 (docs/FORMAT.md §7.3) is what new volumes write: ``cfs-a`` is sealed under a key of
the volume's current *master key* (named by ``cfs-m``), with a key of its own per seal, and its
AAD covers the object key and every field that decides how the body is decrypted (wrapping
scheme, key id, wrapped key, long name).  ``MetaCodec`` reads both revisions, as the volume
config allows, and writes the config's.  Revision 1, below, is still read and written on
volumes not yet upgraded.

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

from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, NewerFormat, UnsupportedFormat
from cryptfs.format.keys import (
    LOCAL_KID,
    SCHEME_KMS,
    SCHEME_LOCAL,
    VolumeKeys,
    WrappedKey,
    master_derive,
    open_once,
    seal_once,
)
from cryptfs.format.names import b64d, b64e
from cryptfs.format.volume import SlotPayload, VolumeConfig

FORMAT = "1"
FORMAT2 = "2"
# revision 3 (FORMAT.md §8): §7.3's construction under labels of its own; what volumes with
# revision-3 bodies write, so that a cryptfs before them refuses such objects (its rename,
# rotation or chmod never reseals one without the body revision it does not know)
FORMAT3 = "3"
FORMATS = (FORMAT, FORMAT2, FORMAT3)
KIND_FILE = "f"
KIND_DIR = "d"
KIND_LINK = "l"
# special files (FORMAT.md §7.9): an empty body; devices carry their number (``rdev``)
KIND_FIFO = "p"
KIND_CHR = "c"
KIND_BLK = "b"
KIND_SOCK = "s"
_KIND_BITS = {
    KIND_FILE: stat.S_IFREG,
    KIND_DIR: stat.S_IFDIR,
    KIND_LINK: stat.S_IFLNK,
    KIND_FIFO: stat.S_IFIFO,
    KIND_CHR: stat.S_IFCHR,
    KIND_BLK: stat.S_IFBLK,
    KIND_SOCK: stat.S_IFSOCK,
}
KIND_OF_TYPE = {bits: kind for kind, bits in _KIND_BITS.items()}
SPECIAL_KINDS = frozenset({KIND_FIFO, KIND_CHR, KIND_BLK, KIND_SOCK})
DEVICE_KINDS = frozenset({KIND_CHR, KIND_BLK})
BODY_REVISIONS = (1, 3)  # §2 and §8.5 bodies (revision 2 changed metadata only)
_ATTR_LABEL = b"cryptfs/v1/attrs\0"
MARKER = ".cryptfs.dir"  # the last component of a directory marker's key (FORMAT.md §3)


def kind_fits_key(kind: str, key: str) -> bool:
    """A directory's attributes only in a marker, anything else only at an entry's key
    (FORMAT.md §7.9): revision 1 binds the path, which a file and a directory share."""
    return (kind == KIND_DIR) == (key == MARKER or key.endswith("/" + MARKER))


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
    rdev: int = 0  # device number of a character or block device (0 for every other kind)
    # the body's revision: 1 = §2 (one salt, one key), 3 = §8.5 (segments, sealed manifest);
    # only regular files' bodies are ever revision 3 (docs/FORMAT.md §8.5)
    body: int = 1
    # the body's pin (a revision-3 body's ``trailer_pin``, a small §2 body's
    # ``body_pin``), set by a rotation that reseals metadata over a body whose data key
    # predates it: a body the holder of that key seals later does not match (FORMAT.md
    # §8.5, "Pinned bodies"); empty for every other object
    pin: bytes = b""

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
        if self.kind in DEVICE_KINDS:
            d["rd"] = self.rdev  # (only devices carry it: other objects' bytes are unchanged)
        if self.body != 1:
            d["b"] = self.body  # (absent on §2 bodies: their bytes are unchanged)
        if self.pin:
            d["bp"] = b64e(self.pin)
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
                rdev=int(d.get("rd", 0)),
                body=int(d.get("b", 1)),
                pin=b64d(str(d["bp"])) if "bp" in d else b"",
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError("malformed attributes") from None
        if a.kind not in _KIND_BITS:
            raise NewerFormat(f"unknown object kind {a.kind!r} (written by a later cryptfs?)")
        if ("rd" in d) != (a.kind in DEVICE_KINDS) or not 0 <= a.rdev < 1 << 64:
            raise IntegrityError("malformed attributes (device number)")
        if "b" in d and (a.body == 1 or a.kind != KIND_FILE or type(d["b"]) is not int):
            raise IntegrityError("malformed attributes (body revision)")
        if "bp" in d and (a.kind not in (KIND_FILE, KIND_LINK) or len(a.pin) != 32):
            raise IntegrityError("malformed attributes (body pin)")
        if a.body not in BODY_REVISIONS:
            raise NewerFormat(f"body revision {a.body} (written by a later cryptfs?)")
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


# -- revision 2 ------------------------------------------------------------------------------

_ATTR2_LABEL = b"cryptfs/v2/attrs\0"
_ATTR2_INFO = b"cryptfs/v2/attrs"
# revision 3: the labels name the revision (its metadata is not readable as revision 2's)
_LABELS = {FORMAT2: (_ATTR2_LABEL, _ATTR2_INFO),
           FORMAT3: (b"cryptfs/v3/attrs\0", b"cryptfs/v3/attrs")}  # fmt: skip


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _aad2(volume_id: bytes, file_id: bytes, key: str, md: dict[str, str], blob: bytes) -> bytes:
    return b"".join(
        [
            _LABELS[md["cfs"]][0],
            volume_id,
            file_id,
            _lp(key.encode()),
            _lp(md["cfs-w"].encode()),
            _lp(md["cfs-kid"].encode()),
            _lp(blob),
            _lp(md["cfs-m"].encode()),
            _lp(md.get("cfs-n", "").encode()),
        ]
    )


class MetaCodec:
    """Object metadata as an opened volume's config and payload say: which revisions are
    accepted, which is written, under which master key, and which data-key wrappings may be
    believed (docs/FORMAT.md §7.2–§7.4).  Rebuilt whenever the config or payload changes."""

    def __init__(self, keys: VolumeKeys, payload: SlotPayload, config: VolumeConfig) -> None:
        self.keys = keys
        self.write_rev = config.write_rev
        self.accept = config.accepted_objects
        self.cur = payload.cur
        vid = keys.volume_id
        self.retiring = config.retiring
        retiring = config.retiring_kids()
        if payload.rev >= 2:
            # the current master key, and the ones a rotation the config names is retiring
            # (within its time bound): a payload's other keys are never believed, so a mount
            # whose payload predates a rotation's end accepts nothing new under them
            kids = {payload.cur} | (retiring & set(payload.mks))
            self.local_kids = frozenset(kids)
        else:
            kids = {LOCAL_KID}
            self.local_kids = frozenset(
                k for k in ({LOCAL_KID} | set(payload.mks)) if payload.master(k) is not None
            )
        self._meta: dict[str, Secret] = {}
        for kid in kids:
            mk = payload.master(kid)
            assert mk is not None
            self._meta[kid] = master_derive(mk, vid, "meta", kid)
        # revision 1: only the config's own target (keyslots are outside its MAC)
        self.kms_keys = config.allowed_kms()
        # the master and KMS keys a rotation retires
        self.retiring_keys = retiring | frozenset(config.retiring.kms if config.retiring else ())
        self._payload = payload
        # set when this mount refused a changed config (its keys may have been retired): from
        # then on nothing S3 wrote after that config is believed (docs/FORMAT.md §7.8)
        self.frozen: float | None = None

    def __repr__(self) -> str:
        return f"<MetaCodec write={self.write_rev} accept={sorted(self.accept)} cur={self.cur}>"

    def check_wrapping(self, wk: WrappedKey | None, modified: float | None = None) -> None:
        """A data key is believed only under a key this volume's config and payload name;
        with ``modified`` (the object's Last-Modified), one under a key being retired only
        if the object predates the rotation's bound."""
        if wk is None:
            return
        if not (
            (wk.scheme == SCHEME_LOCAL and wk.kid in self.local_kids)
            or (wk.scheme == SCHEME_KMS and wk.kid in self.kms_keys)
        ):
            raise IntegrityError(
                f"data key wrapped under a key this volume does not use ({wk.kid})"
            )
        if modified is not None and wk.kid in self.retiring_keys:
            self._check_window(wk.kid, modified)

    def _check_window(self, kid: str, modified: float) -> None:
        if self.retiring is None or not self.retiring.admits(modified):
            raise IntegrityError(
                f"written under {kid}, which a rotation is retiring, after the rotation began"
            )

    def encode(self, path: bytes, key: str, meta: ObjectMeta) -> dict[str, str]:
        if meta.attrs.body == 3 and self.write_rev < 3:
            raise ValueError("a revision-3 body needs revision-3 metadata")
        if self.write_rev < 2:
            return encode_meta(self.keys, path, meta)
        wk = meta.dek
        if wk is not None and wk.scheme == SCHEME_LOCAL and wk.rev < 2:
            wk = self._rewrap_local_v2(wk, meta.file_id)
        md = {
            "cfs": FORMAT3 if self.write_rev >= 3 else FORMAT2,
            "cfs-f": b64e(meta.file_id),
            "cfs-w": wk.scheme if wk is not None else "-",
            "cfs-kid": wk.kid if wk is not None else "-",
            "cfs-m": self.cur,
        }
        blob = b""
        if wk is not None:
            blob = wk.blob
            md["cfs-k"] = b64e(blob)
        if meta.long_name is not None:
            md["cfs-n"] = meta.long_name
        aad = _aad2(self.keys.volume_id, meta.file_id, key, md, blob)
        info = _LABELS[md["cfs"]][1]
        md["cfs-a"] = b64e(seal_once(self._meta[self.cur], info, meta.attrs.to_json(), aad))
        return md

    def _rewrap_local_v2(self, wk: WrappedKey, file_id: bytes) -> WrappedKey:
        """A revision-1 local blob re-encoded for revision-2 metadata (same data key)."""
        kek = self.keys.local_kek(wk.kid, self._payload.master(wk.kid))
        dek = self.keys.unwrap_local(kek, wk, file_id)
        return self.keys.wrap_local(kek, wk.kid, dek, file_id, rev=2)

    def decode(
        self,
        path: bytes,
        key: str,
        md: dict[str, str],
        modified: float | None = None,
        *,
        window: bool = True,
    ) -> ObjectMeta:
        """Authenticate and parse; IntegrityError for anything not written for ``key`` (and
        ``path``, in revision 1) by a holder of a key this volume accepts.  ``modified``:
        the object's Last-Modified (S3's clock), which decides whether metadata under a key
        being retired is believed; without it such metadata is refused (``window=False``:
        only whether it authenticates at all, for a rotation's report)."""
        if window and self.frozen is not None and not 0 < (modified or 0.0) <= self.frozen:
            raise IntegrityError(
                "written after a config this mount could not authenticate (a rotation "
                "elsewhere?): restart the mount with the current key"
            )
        rev = md.get("cfs")
        timed = window
        if rev in (FORMAT2, FORMAT3):
            if rev == FORMAT3 and 3 not in self.accept:
                # (written once `cryptfs upgrade` turned revision-3 bodies on, which this
                # mount learns when it next reads the config: not an integrity failure)
                raise UnsupportedFormat("revision-3 object in a volume whose config (as this "
                                        "mount read it) does not accept them")  # fmt: skip
            if 2 not in self.accept:
                raise IntegrityError("revision-2 object in a revision-1 volume")
            try:
                meta = self._decode2(key, md)
            except NewerFormat:
                # authentic, of a kind this release does not know: believed (so that a
                # rotation stops at it) only as far as the key it is sealed under is
                if window and md["cfs-m"] != self.cur:
                    self._check_window(md["cfs-m"], modified or 0.0)
                raise
            if md["cfs-m"] == self.cur:
                # the current key vouches for everything in its AAD, the data key included
                # (a rename or chmod during a rotation keeps a data key under a retiring key)
                timed = False
            elif window:
                self._check_window(md["cfs-m"], modified or 0.0)
        elif rev == FORMAT:
            if 1 not in self.accept:
                raise IntegrityError("revision-1 object in a volume upgraded to revision 2")
            meta = decode_meta(self.keys, path, md)
        else:
            meta = decode_meta(self.keys, path, md)  # raises: foreign or unknown revision
        if not kind_fits_key(meta.attrs.kind, key):
            raise IntegrityError("object kind does not match its key")
        if meta.attrs.body == 3 and rev != FORMAT3:
            raise IntegrityError("a revision-3 body named by metadata of another revision")
        if meta.attrs.kind != KIND_DIR:
            self.check_wrapping(meta.dek, (modified or 0.0) if timed else None)
        return meta

    def _decode2(self, key: str, md: dict[str, str]) -> ObjectMeta:
        try:
            file_id = b64d(md["cfs-f"])
            wrap, kid, mkid = md["cfs-w"], md["cfs-kid"], md["cfs-m"]
            sealed = b64d(md["cfs-a"])
            blob = b64d(md["cfs-k"]) if "cfs-k" in md else b""
        except KeyError as e:
            raise IntegrityError(f"metadata field {e.args[0]} missing") from None
        if len(file_id) != 16:
            raise IntegrityError("bad file id")
        info = _LABELS[md["cfs"]][1]
        mkey = self._meta.get(mkid)
        if mkey is None:
            raise IntegrityError(f"metadata sealed under a master key this volume lacks ({mkid})")
        aad = _aad2(self.keys.volume_id, file_id, key, md, blob)
        try:
            attrs = Attrs.from_json(open_once(mkey, info, sealed, aad))
        except IntegrityError:
            raise IntegrityError("metadata does not authenticate for this object key") from None
        wrapped: WrappedKey | None
        if attrs.kind == KIND_DIR:
            if wrap != "-" or kid != "-" or blob:
                raise IntegrityError("directory marker carries a data key")
            wrapped = None
        elif wrap in (SCHEME_LOCAL, SCHEME_KMS) and "cfs-k" in md:
            wrapped = WrappedKey(wrap, kid, blob, 2)
        else:
            raise UnsupportedFormat(f"data-key wrapping {wrap!r} not supported")
        return ObjectMeta(file_id, attrs, wrapped, md.get("cfs-n"))

    def sealed_by(self, md: dict[str, str]) -> str | None:
        """The master key an object's metadata is sealed under (``vmk`` for revision 1)."""
        if md.get("cfs") in (FORMAT2, FORMAT3):
            return md.get("cfs-m")
        return LOCAL_KID if md.get("cfs") == FORMAT else None
