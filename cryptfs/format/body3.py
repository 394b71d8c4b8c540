"""Object body revision 3: segments, each under a key of its own and pinned by a hash table,
then a sealed manifest trailer (docs/FORMAT.md §8.5).

Written for regular files on volumes whose config names a segment size; this module is the
byte layout, its arithmetic and its checks, pure and synchronous, with golden vectors and
tamper tests (tests/unit/test_body3.py); ``Body3`` is what the read path holds of a version.

Owns: the segment header, the per-segment hash table, the segment key schedule, the manifest
and its trailer, and the offset and size arithmetic between plaintext and object bytes.
Must not import: store, fs, fuse, cache.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptfs.crypto import Aead, Secret, constant_time_eq, hkdf_expand, hkdf_extract, sha256
from cryptfs.crypto import random_bytes as _random
from cryptfs.errors import IntegrityError

SEG_MAGIC = b"CFS3"
TRAILER_MAGIC = b"CFT3"
SEG_HEADER_SIZE = 88
# SHA-256 of a chunk's ciphertext, whole, in the hash table: the author of a segment a later
# version copies holds its key, and a cut hash would leave them a 2^64 collision search
HASH_SIZE = 32
TAG_SIZE = 16
KEY_SIZE = 32
ENTRY_SIZE = 96  # PK_j (32) ‖ s_j (32) ‖ T_j (32)
_SEG_HEADER = struct.Struct(">4sI16s32s32s")
_TRAILER_END = struct.Struct(">I4s")
_MANIFEST_HEAD = struct.Struct(">QqI")
assert _SEG_HEADER.size == SEG_HEADER_SIZE


def chunks_in(b: int, chunk: int) -> int:
    """Chunks of a segment of ``b`` plaintext bytes (an empty one has one empty chunk)."""
    return max(1, -(-b // chunk))


def small_head(body: bytes | memoryview) -> bytes:
    """What a block cache keeps of a body of one chunk beside that chunk: its segment's
    header and hash table, and its trailer (``SMALL_HEAD`` bytes)."""
    return bytes(body[: SEG_HEADER_SIZE + HASH_SIZE]) + bytes(body[len(body) - trailer_size(1) :])


def segment_size(b: int, chunk: int) -> int:
    """Bytes of a segment holding ``b`` plaintext bytes: header, hash table, chunks."""
    k = chunks_in(b, chunk)
    return SEG_HEADER_SIZE + HASH_SIZE * k + b + TAG_SIZE * k


def trailer_size(n: int) -> int:
    """Bytes of the trailer of a body of ``n`` segments."""
    return KEY_SIZE + (_MANIFEST_HEAD.size + ENTRY_SIZE * n) + TAG_SIZE + KEY_SIZE + 8


def segments_of(size: int, seg: int) -> int:
    """Segments of a body of ``size`` plaintext bytes (an empty file has one)."""
    return max(1, -(-size // seg))


def body_size(size: int, seg: int, chunk: int) -> int:
    """Object length of a body of ``size`` plaintext bytes."""
    n = segments_of(size, seg)
    last = size - (n - 1) * seg
    return (n - 1) * segment_size(seg, chunk) + segment_size(last, chunk) + trailer_size(n)


def plain_size(length: int, seg: int, chunk: int) -> tuple[int, int]:
    """(segments, plaintext size) of the body whose object length is ``length``; a length
    no body has is a cut or extended object.  Unique: the length grows strictly with the
    last segment's size, and jumps from n segments to n + 1 (FORMAT.md §8.5)."""
    full = segment_size(seg, chunk)
    n = max(1, length // (full + ENTRY_SIZE))
    for cand in (n - 1, n, n + 1):
        if cand < 1:
            continue
        rest = length - (cand - 1) * full - trailer_size(cand)  # the last segment's bytes
        b = _last_segment_plain(rest, seg, chunk)
        if b is not None and (b > 0 or cand == 1):  # (only an empty file ends empty)
            return cand, (cand - 1) * seg + b
    raise IntegrityError(f"object length {length} is no revision-3 body length")


def _last_segment_plain(rest: int, seg: int, chunk: int) -> int | None:
    """The b with ``segment_size(b) == rest``, 1 <= b <= seg (0 for the one empty segment)."""
    body = rest - SEG_HEADER_SIZE
    per = chunk + HASH_SIZE + TAG_SIZE  # one full chunk with its hash and tag
    if body == HASH_SIZE + TAG_SIZE:
        return 0
    if body <= HASH_SIZE + TAG_SIZE:
        return None
    k = -(-body // per)
    b = body - (HASH_SIZE + TAG_SIZE) * k
    if b < 1 or b > seg or chunks_in(b, chunk) != k:
        return None
    return b


def segment_offset(j: int, seg: int, chunk: int) -> int:
    """Where segment ``j`` starts in the object (every segment before it is full)."""
    return j * segment_size(seg, chunk)


def chunk_offset(i: int, k: int, chunk: int) -> int:
    """Where chunk ``i`` of a segment of ``k`` chunks starts, from the segment's start."""
    return SEG_HEADER_SIZE + HASH_SIZE * k + i * (chunk + TAG_SIZE)


@dataclass(frozen=True)
class Entry:
    """A segment as a manifest names it: its key, its salt, the hash of its header and
    hash table (``T_j``: the exact bytes of the segment, pinned)."""

    key: Secret
    salt: bytes
    table_hash: bytes

    def pack(self) -> bytes:
        return self.key.reveal() + self.salt + self.table_hash


def _segment_keys(pk: Secret, salt: bytes) -> tuple[Secret, bytes]:
    prk = hkdf_extract(salt, pk)
    return hkdf_expand(prk, b"cryptfs/v3/seg"), hkdf_expand(prk, b"cryptfs/v3/commit").reveal()


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal_segment(
    file_id: bytes, j: int, plaintext: bytes | memoryview, chunk: int, pk: Secret | None = None
) -> tuple[bytes, Entry]:
    """Segment ``j`` of file ``file_id`` holding ``plaintext`` (a full segment, or the last),
    under a fresh key unless ``pk`` is given (golden vectors); its bytes and its entry."""
    out = bytearray(segment_size(len(plaintext), chunk))
    entry = seal_segment_into(file_id, j, plaintext, chunk, memoryview(out), pk)
    return bytes(out), entry


def seal_segment_into(
    file_id: bytes,
    j: int,
    plaintext: bytes | memoryview,
    chunk: int,
    out: memoryview,
    pk: Secret | None = None,
) -> Entry:
    """``seal_segment`` into ``out`` (exactly ``segment_size(len(plaintext))`` bytes): no
    copy of the segment is made on the way (uploads seal straight into a part's buffer)."""
    if len(file_id) != 16:
        raise ValueError("file ids are 16 bytes")
    b = len(plaintext)
    if len(out) != segment_size(b, chunk):
        raise ValueError("the buffer is not the segment's size")
    pk = pk or Secret(_random(KEY_SIZE))
    salt = _random(32)
    key, commit = _segment_keys(pk, salt)
    header = _SEG_HEADER.pack(SEG_MAGIC, j, file_id, salt, commit)
    k = chunks_in(b, chunk)
    aad = header + k.to_bytes(4, "big")
    aead = Aead(key)
    view = memoryview(plaintext)
    out[:SEG_HEADER_SIZE] = header
    o = SEG_HEADER_SIZE + HASH_SIZE * k
    for i in range(k):
        pt = view[i * chunk : (i + 1) * chunk]
        ct = out[o : o + len(pt) + TAG_SIZE]
        aead.seal_into(_nonce(i, i == k - 1), pt, aad, ct)
        t = SEG_HEADER_SIZE + HASH_SIZE * i
        out[t : t + HASH_SIZE] = sha256(ct)
        o += len(ct)
    return Entry(pk, salt, sha256(out[: SEG_HEADER_SIZE + HASH_SIZE * k]))


class SegmentReader:
    """Opens the chunks of one segment, once its header and hash table match the manifest's
    entry (the bytes the version that wrote the manifest pinned)."""

    def __init__(
        self, file_id: bytes, j: int, entry: Entry, head: bytes | memoryview, k: int
    ) -> None:
        head = bytes(head[: SEG_HEADER_SIZE + HASH_SIZE * k])
        if len(head) != SEG_HEADER_SIZE + HASH_SIZE * k:
            raise IntegrityError(f"segment {j}: header and hash table cut short")
        if not constant_time_eq(sha256(head), entry.table_hash):
            raise IntegrityError(f"segment {j}: not the segment this version's manifest names")
        magic, index, fid, salt, commit = _SEG_HEADER.unpack(head[:SEG_HEADER_SIZE])
        key, expect = _segment_keys(entry.key, salt)
        if magic != SEG_MAGIC or index != j or fid != file_id or salt != entry.salt:
            raise IntegrityError(f"segment {j}: header of another segment or file")
        if not constant_time_eq(commit, expect):
            raise IntegrityError(f"segment {j}: key commitment mismatch")
        self.j = j
        self.k = k
        self._aad = head[:SEG_HEADER_SIZE] + k.to_bytes(4, "big")
        self._table = head[SEG_HEADER_SIZE:]
        self._aead = Aead(key)

    def open_chunk(self, i: int, ciphertext: bytes | memoryview) -> bytes:
        if not 0 <= i < self.k:
            raise IntegrityError(f"segment {self.j}: no chunk {i}")
        want = self._table[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        if not constant_time_eq(sha256(ciphertext), want):
            raise IntegrityError(f"segment {self.j}: chunk {i} is not the one its table names")
        try:
            return self._aead.open(_nonce(i, i == self.k - 1), ciphertext, self._aad)
        except IntegrityError:
            raise IntegrityError(f"segment {self.j}: chunk {i} failed authentication") from None


@dataclass(frozen=True)
class Manifest:
    size: int
    mtime_ns: int
    entries: tuple[Entry, ...]

    def pin(self) -> bytes:
        """What pins the body's bytes without a key (FORMAT.md §8.5, "Pinned bodies"):
        SHA-256 of a label, the size, the mtime and every segment's ``T_j`` (its header,
        which commits to its key, and its hash table, which holds every chunk's hash)."""
        parts = [
            PIN_LABEL,
            self.size.to_bytes(8, "big"),
            self.mtime_ns.to_bytes(8, "big", signed=True),
        ]
        return sha256(b"".join(parts + [e.table_hash for e in self.entries]))


PIN_LABEL = b"cryptfs/v3/pin\0"
TRAILER_PIN_LABEL = b"cryptfs/v3/trailer-pin\0"


def trailer_pin(tail: bytes | memoryview, size: int, seg: int, chunk: int) -> bytes:
    """A revision-3 body's pin as its metadata names it (FORMAT.md §8.5, "Pinned bodies"):
    SHA-256 of a label and its trailer's bytes as stored (``tail`` ends with them), which
    hold its manifest, so every ``T_j``; computed without the data key."""
    t = trailer_span(size, seg, chunk)[1]
    return sha256(TRAILER_PIN_LABEL + bytes(tail[len(tail) - t :]))


def _manifest_keys(dek: Secret, r: bytes) -> tuple[Secret, bytes]:
    prk = hkdf_extract(r, dek)
    key = hkdf_expand(prk, b"cryptfs/v3/manifest/key")
    return key, hkdf_expand(prk, b"cryptfs/v3/manifest/commit").reveal()


def _manifest_aad(volume_id: bytes, file_id: bytes, gen: bytes) -> bytes:
    # (fixed widths: the concatenation must be one way to read)
    if (len(volume_id), len(file_id), len(gen)) != (16, 16, 32):
        raise ValueError("volume id, file id and gen are 16, 16 and 32 bytes")
    return b"cryptfs/v3/manifest\0" + volume_id + file_id + gen


def seal_trailer(
    dek: Secret, volume_id: bytes, file_id: bytes, gen: bytes, manifest: Manifest
) -> bytes:
    """The trailer that ends a body: the manifest sealed under a key of its own (r)."""
    r = _random(KEY_SIZE)
    key, commit = _manifest_keys(dek, r)
    plain = _MANIFEST_HEAD.pack(manifest.size, manifest.mtime_ns, len(manifest.entries))
    plain += b"".join(e.pack() for e in manifest.entries)
    sealed = Aead(key).seal(bytes(12), plain, _manifest_aad(volume_id, file_id, gen))
    body = r + sealed + commit
    return body + _TRAILER_END.pack(len(body) + _TRAILER_END.size, TRAILER_MAGIC)


def trailer_length(tail: bytes | memoryview) -> int:
    """The trailer's length, from the last 8 bytes of an object (a suffix GET)."""
    if len(tail) < _TRAILER_END.size:
        raise IntegrityError("object shorter than a trailer")
    length, magic = _TRAILER_END.unpack(bytes(tail[-_TRAILER_END.size :]))
    if magic != TRAILER_MAGIC or length < trailer_size(1):
        raise IntegrityError("no revision-3 trailer at the end of the object")
    return int(length)


def open_trailer(
    dek: Secret,
    volume_id: bytes,
    file_id: bytes,
    gen: bytes,
    tail: bytes | memoryview,
    object_length: int,
    seg: int,
    chunk: int,
) -> Manifest:
    """The manifest of the trailer at the end of ``tail`` (the object's last bytes, at least
    ``trailer_length`` of them), checked against the object's whole length: a body cut or
    extended anywhere, the trailer kept, is refused here, not only by a reader of it all."""
    length = trailer_length(tail)
    if len(tail) < length:  # (a planted length field: the bytes a reader has are not it)
        raise IntegrityError(f"the trailer says it is {length} bytes, {len(tail)} are there")
    t = bytes(tail[len(tail) - length :])
    r, sealed, commit = t[:KEY_SIZE], t[KEY_SIZE : -KEY_SIZE - 8], t[-KEY_SIZE - 8 : -8]
    key, expect = _manifest_keys(dek, r)
    if not constant_time_eq(commit, expect):
        raise IntegrityError("manifest key commitment mismatch (wrong data key?)")
    try:
        plain = Aead(key).open(bytes(12), sealed, _manifest_aad(volume_id, file_id, gen))
    except IntegrityError:
        raise IntegrityError("manifest does not authenticate for this version") from None
    size, mtime, n = _MANIFEST_HEAD.unpack(plain[: _MANIFEST_HEAD.size])
    rest = plain[_MANIFEST_HEAD.size :]
    if n < 1 or len(rest) != ENTRY_SIZE * n or length != trailer_size(n):
        raise IntegrityError("malformed manifest")
    if plain_size(object_length, seg, chunk) != (n, size):
        raise IntegrityError("the manifest's size is not the one the object's length gives")
    entries = tuple(
        Entry(Secret(rest[o : o + 32]), rest[o + 32 : o + 64], rest[o + 64 : o + 96])
        for o in range(0, len(rest), ENTRY_SIZE)
    )
    return Manifest(size, mtime, entries)


def seal_body(
    dek: Secret,
    volume_id: bytes,
    file_id: bytes,
    gen: bytes,
    plaintext: bytes,
    mtime_ns: int,
    seg: int,
    chunk: int,
    keys: Sequence[Secret] | None = None,
) -> bytes:
    """A whole body held in memory (small files, golden vectors); ``keys``: the segment keys
    to use (golden vectors), else fresh ones."""
    n = segments_of(len(plaintext), seg)
    parts, entries = [], []
    for j in range(n):
        data, entry = seal_segment(
            file_id, j, plaintext[j * seg : (j + 1) * seg], chunk, keys[j] if keys else None
        )
        parts.append(data)
        entries.append(entry)
    manifest = Manifest(len(plaintext), mtime_ns, tuple(entries))
    return b"".join(parts) + seal_trailer(dek, volume_id, file_id, gen, manifest)


def open_body(
    dek: Secret, volume_id: bytes, file_id: bytes, gen: bytes, body: bytes, seg: int, chunk: int
) -> tuple[bytes, Manifest]:
    """Every byte of a body held in memory, checked as a reader of any range checks it."""
    size = plain_size(len(body), seg, chunk)[1]
    manifest = open_trailer(dek, volume_id, file_id, gen, body, len(body), seg, chunk)
    out = []
    for j, entry in enumerate(manifest.entries):
        b = min(seg, size - j * seg)
        k = chunks_in(b, chunk)
        start = segment_offset(j, seg, chunk)
        head = body[start : start + SEG_HEADER_SIZE + HASH_SIZE * k]
        reader = SegmentReader(file_id, j, entry, head, k)
        for i in range(k):
            off = start + chunk_offset(i, k, chunk)
            ln = min(chunk, b - i * chunk) + TAG_SIZE if b else TAG_SIZE
            out.append(reader.open_chunk(i, body[off : off + ln]))
    return b"".join(out), manifest


def trailer_span(size: int, seg: int, chunk: int) -> tuple[int, int]:
    """(offset, length) of the trailer of a body of ``size`` plaintext bytes."""
    t = trailer_size(segments_of(size, seg))
    return body_size(size, seg, chunk) - t, t


class Body3:
    """What a reader holds of one version's revision-3 body: its manifest (authenticated,
    and of the size the metadata says) and the segments whose header and hash table it has
    checked so far.  Answers what ``BodyCipher`` answers for a revision-1 body (``gen``,
    ``span``, ``open_at``), plus which segment heads a run of chunks still needs."""

    def __init__(
        self, file_id: bytes, gen: bytes, size: int, seg: int, chunk: int, manifest: Manifest
    ) -> None:
        if manifest.size != size or len(manifest.entries) != segments_of(size, seg):
            raise IntegrityError("the manifest's size is not the metadata's")
        self.file_id = file_id
        self.gen = gen
        self.size = size
        self.seg = seg
        self.chunk = chunk
        self.per = seg // chunk  # chunks of a full segment
        self.manifest = manifest
        self.readers: dict[int, SegmentReader] = {}

    @classmethod
    def open(
        cls,
        dek: Secret,
        volume_id: bytes,
        file_id: bytes,
        gen: bytes,
        size: int,
        seg: int,
        chunk: int,
        tail: bytes | memoryview,
    ) -> Body3:
        """From the object's last bytes (its trailer at least); its length is the one
        ``size`` gives (the metadata's, authenticated)."""
        length = body_size(size, seg, chunk)
        want = trailer_span(size, seg, chunk)[1]
        if len(tail) < want or trailer_length(tail) != want:
            raise IntegrityError("the trailer is not the one the metadata's size gives")
        manifest = open_trailer(dek, volume_id, file_id, gen, tail, length, seg, chunk)
        return cls(file_id, gen, size, seg, chunk, manifest)

    def segment_bytes(self, j: int) -> int:
        return min(self.seg, self.size - j * self.seg)

    def head_span(self, j: int) -> tuple[int, int]:
        """(offset, length) of segment ``j``'s header and hash table in the object."""
        k = chunks_in(self.segment_bytes(j), self.chunk)
        return segment_offset(j, self.seg, self.chunk), SEG_HEADER_SIZE + HASH_SIZE * k

    def span(self, i: int, plain: int | None = None) -> tuple[int, int]:
        """(offset, length) of file chunk ``i``'s ciphertext in the object."""
        j, li = divmod(i, self.per)
        b = self.segment_bytes(j)
        k = chunks_in(b, self.chunk)
        if not 0 <= j < len(self.manifest.entries) or li >= k:
            raise ValueError(f"chunk {i} outside the body")
        ln = (min(self.chunk, b - li * self.chunk) if b else 0) + TAG_SIZE
        return segment_offset(j, self.seg, self.chunk) + chunk_offset(li, k, self.chunk), ln

    def heads_missing(self, first: int, last: int) -> list[int]:
        """Segments of chunks [first, last] whose head is not checked yet."""
        return [j for j in range(first // self.per, last // self.per + 1)
                if j not in self.readers]  # fmt: skip

    def add_head(self, j: int, head: bytes | memoryview) -> None:
        """Segment ``j``'s header and hash table, checked against the manifest."""
        k = chunks_in(self.segment_bytes(j), self.chunk)
        self.readers[j] = SegmentReader(self.file_id, j, self.manifest.entries[j], head, k)

    def open_at(self, i: int, count: int, ciphertext: bytes | memoryview) -> bytes:
        """File chunk ``i`` (``count``: unused, the segment knows its last chunk)."""
        j, li = divmod(i, self.per)
        reader = self.readers.get(j)
        if reader is None:
            raise ValueError(f"segment {j}'s head was not read before its chunks")
        return reader.open_chunk(li, ciphertext)


SMALL_HEAD = SEG_HEADER_SIZE + HASH_SIZE + trailer_size(1)
