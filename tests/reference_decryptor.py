"""An independent decryptor for cryptfs formats 1 and 2, written from docs/FORMAT.md alone.

It imports nothing from ``cryptfs``: only the standard library and ``cryptography``.  If it
decrypts the golden data in tests/data, the document — not the implementation — is the spec.
Supports key-file slots and local (``gcm``) data-key wrapping; KMS-wrapped keys need AWS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand


class Invalid(Exception):
    """Anything that does not authenticate or parse (a reader reports EIO)."""


def b64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def gcm_open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """``nonce(12) ‖ ciphertext ‖ tag``."""
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except Exception as e:  # InvalidTag, bad lengths
        raise Invalid(f"AES-GCM: {type(e).__name__}") from None


# -- §1 volume config --------------------------------------------------------------------------


@dataclass
class Keys:
    volume_id: bytes
    vmk: bytes
    mks: dict[str, bytes]
    names: bytes
    attrs: bytes
    encrypt_names: bool
    chunk_log2: int
    revision: int = 1
    current: str | None = None  # §7.1: the payload's current master key (revision 2)
    objects: tuple[int, ...] = (1,)
    segment_log2: int | None = None  # §8.5: files' bodies are revision 3, segments of 2^this

    def master(self, kid: str) -> bytes:
        """§7.1: MK(kid); MK("vmk") = VMK only in a revision-1 payload."""
        if kid == "vmk" and self.current is None:
            return self.vmk
        if kid not in self.mks:
            raise Invalid(f"no master key {kid}")
        return self.mks[kid]

    def purpose(self, label: str, n: int = 32) -> bytes:
        return hkdf(self.vmk, self.volume_id, b"cryptfs/v1/" + label.encode(), n)


def open_keyfile_slot(cfg: dict[str, Any], keyfile: bytes) -> bytes:
    """The payload of the first key-file slot of ``cfg`` that opens with ``keyfile`` (§1)."""
    volume_id = b64u(cfg["volume_id"])
    for slot in cfg["keyslots"]:
        if slot.get("type") != "keyfile":
            continue
        kek = hkdf(keyfile, b64u(slot["salt"]), b"cryptfs/v1/keyfile")
        params = {k: v for k, v in slot.items() if k != "wrapped"}
        aad = b"cryptfs/v1/keyslot\0" + volume_id + canonical(params)
        try:
            return gcm_open(kek, b64u(slot["wrapped"]), aad)
        except Invalid:
            continue
    raise Invalid("no key-file slot opens with this key")


def unlock_with_keyfile(config: bytes, keyfile: bytes) -> Keys:
    cfg = json.loads(config)
    volume_id = b64u(cfg["volume_id"])
    vmk, mks, current = _payload(open_keyfile_slot(cfg, keyfile))
    names = hkdf(vmk, volume_id, b"cryptfs/v1/names", 64)
    keys = Keys(volume_id, vmk, mks, names, b"", cfg["names"] == "aes-siv", cfg["chunk_log2"])
    keys.attrs = keys.purpose("attrs")
    keys.current = current
    if cfg["cryptfs"] == 2:
        # §7.2: HMAC under K_config of the current master key, over every field but "mac"
        keys.revision = 2
        keys.objects = tuple(cfg["objects"])
        keys.segment_log2 = cfg.get("segment_log2")
        cur = current or "vmk"
        k_config = hkdf(keys.master(cur), volume_id, b"cryptfs/v2/config\0" + cur.encode())
        body2 = {k: v for k, v in cfg.items() if k != "mac"}
        mac = hmac.new(k_config, b"cryptfs/v2/config\0" + canonical(body2), "sha256")
        if not hmac.compare_digest(mac.digest(), b64u(cfg["mac"])):
            raise Invalid("config MAC does not verify")
        return keys
    if current is not None:
        raise Invalid("a revision-1 config over a revision-2 payload (§7.2)")
    body = {k: cfg[k] for k in ("cryptfs", "volume_id", "chunk_log2", "names", "suite")}
    for optional in ("dek", "sse"):
        if optional in cfg:
            body[optional] = cfg[optional]
    mac = hmac.new(keys.purpose("config"), b"cryptfs/v1/config\0" + canonical(body), "sha256")
    if not hmac.compare_digest(mac.digest(), b64u(cfg["mac"])):
        raise Invalid("config MAC does not verify")
    return keys


def _payload(data: bytes) -> tuple[bytes, dict[str, bytes], str | None]:
    if len(data) == 32:
        return data, {}, None
    if data[0] not in (1, 2):
        raise Invalid("payload version")
    vmk, mks, i = data[1:33], {}, 33
    current = None
    if data[0] == 2:  # §7.1: u8 len(cur) ‖ cur before the keys
        n = data[i]
        current = data[i + 1 : i + 1 + n].decode()
        i += 1 + n
    while i < len(data):
        n = data[i]
        kid = data[i + 1 : i + 1 + n].decode()
        mks[kid] = data[i + 1 + n : i + 1 + n + 32]
        i += 1 + n + 32
    return vmk, mks, current


def once_open(key: bytes, info: bytes, blob: bytes, aad: bytes) -> bytes:
    """§7.3: ``r (32) ‖ AES-256-GCM(HKDF(key, salt=r, info), nonce=0^12, …)``."""
    try:
        return AESGCM(hkdf(key, blob[:32], info)).decrypt(bytes(12), blob[32:], aad)
    except Exception as e:
        raise Invalid(f"AES-GCM: {type(e).__name__}") from None


def unwrap_dek(keys: Keys, md: dict[str, str]) -> bytes:
    if md["cfs-w"] != "gcm":
        raise Invalid(f"wrapping {md['cfs-w']!r} needs AWS KMS")
    kid = md["cfs-kid"]
    file_id = b64u(md["cfs-f"])
    if kid == "vmk":
        kek = hkdf(keys.master("vmk"), keys.volume_id, b"cryptfs/v1/kek")
    else:
        kek = hkdf(keys.master(kid), keys.volume_id, b"cryptfs/v1/mk-kek\0" + kid.encode())
    if md["cfs"] in ("2", "3"):  # §7.4: one key per wrap
        aad = b"cryptfs/v2/wrap\0" + keys.volume_id + file_id + kid.encode()
        return once_open(kek, b"cryptfs/v2/wrap", b64u(md["cfs-k"]), aad)
    aad = b"cryptfs/v1/wrap\0" + keys.volume_id + file_id + kid.encode()
    return gcm_open(kek, b64u(md["cfs-k"]), aad)


# -- §2 body -----------------------------------------------------------------------------------


def body_keys(dek: bytes, salt: bytes, chunk_log2: int, file_id: bytes) -> tuple[bytes, bytes]:
    """(K_content, commitment) of one body generation (§2)."""
    prk = hmac.new(salt, dek, "sha256").digest()
    info_base = b"cryptfs/v1" + bytes([1, chunk_log2]) + file_id
    k_content = HKDFExpand(hashes.SHA256(), 32, info_base + b"/content").derive(prk)
    commit = HKDFExpand(hashes.SHA256(), 32, info_base + b"/commit").derive(prk)
    return k_content, commit


def decrypt_body(body: bytes, dek: bytes, chunk_log2: int) -> tuple[bytes, bytes, bytes]:
    """(plaintext, file_id, salt) of a whole body."""
    header = body[:92]
    if header[:7] != b"CRYPTFS" or header[7] != 1 or header[8] != 1 or header[10:12] != b"\0\0":
        raise Invalid("header")
    if header[9] != chunk_log2:
        raise Invalid("chunk size differs from the volume's")
    file_id, salt, commitment = header[12:28], header[28:60], header[60:92]
    k_content, commit = body_keys(dek, salt, chunk_log2, file_id)
    if not hmac.compare_digest(commit, commitment):
        raise Invalid("key commitment")
    c = 1 << chunk_log2
    rest = body[92:]
    if len(rest) < 16 or (len(rest) != 16 and len(rest) % (c + 16) in range(1, 17)):
        raise Invalid("body length")
    n = max(1, -(-len(rest) // (c + 16)))
    out = bytearray()
    for i in range(n):
        piece = rest[i * (c + 16) : (i + 1) * (c + 16)]
        nonce = i.to_bytes(11, "big") + (b"\x01" if i == n - 1 else b"\x00")
        try:
            out += AESGCM(k_content).decrypt(nonce, piece, header)
        except Exception:
            raise Invalid(f"chunk {i}") from None
    return bytes(out), file_id, salt


# -- §3 metadata, §4 names ---------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def decrypt_attrs(keys: Keys, md: dict[str, str], path: bytes, key: str) -> dict[str, Any]:
    rev = {"1": 1, "2": 2, "3": 3}.get(md.get("cfs", ""))
    if rev is None or rev not in keys.objects:
        raise Invalid("not a cryptfs object of a revision this volume accepts")
    if rev >= 2:  # §7.3: bound to the object key and every field that decrypts the body
        mkid = md["cfs-m"]
        k_meta = hkdf(keys.master(mkid), keys.volume_id, b"cryptfs/v2/meta\0" + mkid.encode())
        label = b"cryptfs/v%d/attrs" % rev  # (§8: revision 3 under labels of its own)
        aad = b"".join(
            [
                label + b"\0",
                keys.volume_id,
                b64u(md["cfs-f"]),
                _lp(key.encode()),
                _lp(md["cfs-w"].encode()),
                _lp(md["cfs-kid"].encode()),
                _lp(b64u(md["cfs-k"]) if "cfs-k" in md else b""),
                _lp(mkid.encode()),
                _lp(md.get("cfs-n", "").encode()),
            ]
        )
        attrs2: dict[str, Any] = json.loads(once_open(k_meta, label, b64u(md["cfs-a"]), aad))
        if "b" in attrs2 and (rev != 3 or attrs2["b"] != 3):
            raise Invalid("a body revision in metadata that may not name one")
        return attrs2
    file_id = b64u(md["cfs-f"])
    aad = b"cryptfs/v1/attrs\0" + keys.volume_id + file_id + path
    result: dict[str, Any] = json.loads(gcm_open(keys.attrs, b64u(md["cfs-a"]), aad))
    return result


def decrypt_name(keys: Keys, parent: bytes, component: str, long_name: str | None) -> bytes:
    if not keys.encrypt_names:
        return component.encode()
    encoding = component
    if component.startswith("~"):
        if (
            long_name is None
            or base64.urlsafe_b64encode(hashlib.sha256(long_name.encode()).digest())
            .rstrip(b"=")
            .decode()
            != component[1:]
        ):
            raise Invalid("long name does not match its hash")
        encoding = long_name
    try:
        padded = AESSIV(keys.names).decrypt(
            b64u(encoding), [b"cryptfs/v1/name", keys.volume_id, parent]
        )
    except Exception:
        raise Invalid("name does not authenticate") from None
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise Invalid("name padding")
    return padded[:-pad]


def _join(parent: bytes, name: bytes) -> bytes:
    return (parent.rstrip(b"/") + b"/" + name) if parent != b"/" else b"/" + name


def decrypt_volume(
    objects: dict[str, tuple[bytes, dict[str, str]]], keyfile: bytes
) -> dict[bytes, dict[str, Any]]:
    """Every file, symlink and directory of a volume: path -> {attrs, data}."""
    keys = unlock_with_keyfile(objects[".cryptfs.json"][0], keyfile)
    marker = ".cryptfs.dir"
    out: dict[bytes, dict[str, Any]] = {}

    def path_of(prefix_parts: list[str]) -> bytes:
        path = b"/"
        for depth, comp in enumerate(prefix_parts):
            marker_md = objects["/".join(prefix_parts[: depth + 1]) + "/" + marker][1]
            path = _join(path, decrypt_name(keys, path, comp, marker_md.get("cfs-n")))
        return path

    for key, (body, md) in sorted(objects.items()):
        if key == ".cryptfs.json":
            continue
        parts = key.split("/")
        if parts[-1] == marker:
            path = path_of(parts[:-1])
        else:
            parent = path_of(parts[:-1])
            path = _join(parent, decrypt_name(keys, parent, parts[-1], md.get("cfs-n")))
        attrs = decrypt_attrs(keys, md, path, key)
        entry: dict[str, Any] = {"attrs": attrs}
        if attrs.get("b", 1) == 3:  # §8.5: a regular file's body of revision 3
            if attrs["t"] != "f" or keys.segment_log2 is None:
                raise Invalid("a revision-3 body where none may be")
            pin = b64u(attrs["bp"]) if "bp" in attrs else None
            data, _mtime = decrypt_body3(body, unwrap_dek(keys, md), keys.volume_id,
                                         b64u(md["cfs-f"]), b64u(attrs["gen"]),
                                         1 << keys.segment_log2, 1 << keys.chunk_log2,
                                         pin)  # fmt: skip
            if len(data) != attrs["sz"]:
                raise Invalid("size")
            entry["data"] = data
        elif attrs["t"] != "d":
            if "b" in attrs:
                raise Invalid("body revision 1 is never written out")
            data, file_id, salt = decrypt_body(body, unwrap_dek(keys, md), keys.chunk_log2)
            if file_id != b64u(md["cfs-f"]) or salt != b64u(attrs["gen"]):
                raise Invalid("body does not belong to this metadata")
            if len(data) != attrs["sz"]:
                raise Invalid("size")
            entry["data"] = data
        types = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO,
                 "c": stat.S_IFCHR, "b": stat.S_IFBLK, "s": stat.S_IFSOCK}  # fmt: skip
        if attrs["t"] not in types:
            raise Invalid("unknown object kind")
        entry["mode"] = types[attrs["t"]] | attrs["m"]
        # §7.9: a device carries its number ("rd"), no other object does; special files
        # have an empty body
        if ("rd" in attrs) != (attrs["t"] in ("c", "b")):
            raise Invalid("device number on the wrong kind")
        if attrs["t"] in ("p", "c", "b", "s") and entry["data"] != b"":
            raise Invalid("special file with a body")
        entry["rdev"] = attrs.get("rd", 0)
        out[path] = entry
    return out


def decrypt_body3(
    body: bytes,
    dek: bytes,
    volume_id: bytes,
    file_id: bytes,
    gen: bytes,
    seg: int,
    chunk: int,
    pin: bytes | None = None,
) -> tuple[bytes, int]:
    """A revision-3 body (FORMAT.md §8.5): (plaintext, the manifest's mtime ns).  Written
    from the document alone."""
    end_len, magic = int.from_bytes(body[-8:-4], "big"), body[-4:]
    if magic != b"CFT3" or end_len > len(body):
        raise Invalid("no trailer")
    t = body[len(body) - end_len :]
    r, sealed, commit = t[:32], t[32:-40], t[-40:-8]
    prk = hmac.new(r, dek, hashlib.sha256).digest()
    k_man = HKDFExpand(hashes.SHA256(), 32, b"cryptfs/v3/manifest/key").derive(prk)
    c_man = HKDFExpand(hashes.SHA256(), 32, b"cryptfs/v3/manifest/commit").derive(prk)
    if not hmac.compare_digest(c_man, commit):
        raise Invalid("manifest commitment")
    aad = b"cryptfs/v3/manifest\0" + volume_id + file_id + gen
    try:
        manifest = AESGCM(k_man).decrypt(bytes(12), sealed, aad)
    except InvalidTag:
        raise Invalid("manifest does not authenticate") from None
    size = int.from_bytes(manifest[0:8], "big")
    mtime = int.from_bytes(manifest[8:16], "big", signed=True)
    n = int.from_bytes(manifest[16:20], "big")
    entries = [manifest[20 + 96 * j : 20 + 96 * (j + 1)] for j in range(n)]
    pinned = hashlib.sha256(b"cryptfs/v3/trailer-pin\0" + t).digest()
    if pin is not None and pinned != pin:  # "Pinned bodies": the trailer's hash
        raise Invalid("the body is not the one its metadata pins")
    out, pos = [], 0
    for j, e in enumerate(entries):
        pk, salt, table_hash = e[:32], e[32:64], e[64:96]
        b = min(seg, size - j * seg)
        k = max(1, -(-b // chunk))
        header = body[pos : pos + 88]
        table = body[pos + 88 : pos + 88 + 32 * k]
        if hashlib.sha256(header + table).digest() != table_hash:
            raise Invalid("segment not pinned by the manifest")
        if header[:4] != b"CFS3" or int.from_bytes(header[4:8], "big") != j:
            raise Invalid("segment header")
        if header[8:24] != file_id or header[24:56] != salt:
            raise Invalid("segment of another file")
        sprk = hmac.new(salt, pk, hashlib.sha256).digest()
        key = HKDFExpand(hashes.SHA256(), 32, b"cryptfs/v3/seg").derive(sprk)
        if HKDFExpand(hashes.SHA256(), 32, b"cryptfs/v3/commit").derive(sprk) != header[56:88]:
            raise Invalid("segment commitment")
        pos += 88 + 32 * k
        for i in range(k):
            ln = min(chunk, b - i * chunk) + 16 if b else 16
            c = body[pos : pos + ln]
            if hashlib.sha256(c).digest() != table[32 * i : 32 * (i + 1)]:
                raise Invalid("chunk not in its table")
            nonce = i.to_bytes(11, "big") + (b"\x01" if i == k - 1 else b"\x00")
            out.append(AESGCM(key).decrypt(nonce, c, header + k.to_bytes(4, "big")))
            pos += ln
    if pos != len(body) - end_len or end_len != 108 + 96 * n:
        raise Invalid("length is not the manifest's")
    return b"".join(out), mtime
