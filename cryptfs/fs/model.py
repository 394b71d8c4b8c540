"""What the parts of ``cryptfs.fs`` share: the inode (``Node``), an open file (``Handle``),
the attributes handed to the kernel (``Stat``), the mount's tunables (``Options``) and what
the FUSE layer is told back (``KernelCache``).

Owns: data only (no I/O, no S3, no locks but each node's own).
Must not import: any other module of ``cryptfs.fs``, ``cryptfs.fuse``, ``cryptfs.store``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

from cryptfs.cache.staging import StagedFile
from cryptfs.errors import CryptfsError
from cryptfs.format.body import BodyCipher
from cryptfs.format.body3 import Body3
from cryptfs.format.keys import WrappedKey
from cryptfs.format.meta import KIND_DIR, Attrs
from cryptfs.format.s3ec import S3ecObject

ROOT_INO = 1
MAX_KEY = 1024  # bytes of an S3 object key
SYMLINK_MAX = 4095
NAME_MAX = 255


def join(parent: bytes, name: bytes) -> bytes:
    """The path of entry ``name`` of the directory at ``parent``."""
    return (parent if parent != b"/" else b"") + b"/" + name


_E = TypeVar("_E", bound=CryptfsError)


def named(cls: type[_E], name: bytes) -> _E:
    """``cls`` about the entry ``name``, which is its message (cut out of log lines)."""
    text = name.decode(errors="replace")
    return cls(text, names=(text,))


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Options:
    writeback_delay: float = 2.0
    metadata_ttl: float = 10.0
    memory_cache_bytes: int = 64 << 20
    max_readahead: int = 32 << 20  # a sequential reader's window: 4 GETs of a part
    multipart_threshold: int = 16 << 20
    part_size: int = 8 << 20
    # bytes per ranged GET when reading a long run, aligned to multiples of itself: one GET
    # per part of a multipart upload (S3 and SeaweedFS serve a part whole for less work than
    # two ranges that straddle the server's own pieces of it)
    fetch_unit: int = 8 << 20
    small_file_bytes: int = 4 << 20  # files fetched whole at open, and ahead of `cat *`
    offload_bytes: int = 256 << 10  # decrypt runs at least this long in a worker thread
    disk_backlog: int = 8 << 20  # downloads waiting for the block cache, at most (bytes)
    upload_concurrency: int = 4  # large files at once (each with this many parts in flight)
    small_upload_concurrency: int = 32  # files up to small_upload_bytes at once
    small_upload_bytes: int = 1 << 20
    meta_concurrency: int = 32
    list_ahead_max: int = 5000  # list a looked-up directory whole up to this many entries
    prefetch_concurrency: int = 6  # read-ahead GETs in flight, all files together
    # small files read one after another in name order (cat *, cp -r, tar): the next ones
    # are fetched ahead of the reader, this many (0: never)
    sibling_readahead: int = 8
    relist_ahead: int = 8  # background relists of subdirectories ahead of a walk, at once
    relist_ahead_depth: int = 2  # levels below the directory a walk relisted or entered
    relist_ahead_max: int = 4096  # directories looked at for that, per directory entered
    foreign_max_bytes: int = 256 << 20  # largest S3 Encryption Client object read whole
    # show S3 Encryption Client objects (read-only; --show-s3ec): never at a key that is a
    # cryptfs key, so a planted one can never stand in for a file (docs/FORMAT.md §7.7)
    show_foreign: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


class KernelCache(Protocol):
    """What the kernel keeps of entries and attributes (``Stat.ttl``), told when this mount
    finds that another writer changed them, so that it asks again at once."""

    def attrs_changed(self, ino: int) -> None: ...

    def entry_gone(self, parent_ino: int, name: bytes) -> None: ...


@dataclass(frozen=True)
class Stat:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int
    # seconds the kernel may keep this entry and these attributes without asking again
    ttl: float = 0.0
    rdev: int = 0


@dataclass(eq=False)
class Node:
    ino: int
    parent: Node | None
    name: bytes
    attrs: Attrs
    file_id: bytes
    wrapped: WrappedKey | None = None
    remote_etag: str | None = None  # ETag of our object in S3, None if not there (yet)
    # its Last-Modified, valid while ``modified_etag == remote_etag``: a metadata-only change
    # (CopyObject onto itself: chmod, chown, touch) keeps the ETag and changes only this
    remote_modified: float = 0.0
    modified_etag: str | None = None
    children: dict[bytes, Node] | None = None  # directories: known entries
    listed_at: float = -1.0  # trio time when ``children`` was last complete (<0: never)
    refreshed_at: float = 0.0
    lookups: int = 0
    open_count: int = 0
    writers: int = 0
    stage: StagedFile | None = None
    meta_dirty: bool = False
    # directories: the attributes to write are only times its entries changed (merged with
    # another writer's marker, not given up to it, when the write meets one)
    times_only: bool = False
    attrs_sending: int = 0  # copies in place of its attributes in flight (sync_attrs)
    change: int = 0  # bumped on every local modification
    unlinked: bool = False
    cipher: BodyCipher | Body3 | None = None  # its version's body, as far as read
    cipher_etag: str | None = None
    # a rename of this node (or onto it) is moving its objects: what S3 shows meanwhile is
    # the rename's doing, not another writer's (a HEAD 404 of the old key, a LIST without it)
    renaming: int = 0
    evicted: bool = False  # forgotten by the kernel and clean: dropped from the inode table
    # directories: names of entries evicted since the last listing (known to exist: during
    # an outage a lookup of one fails, it is not taken as absent)
    forgotten: set[bytes] | None = None
    # objects of the AWS S3 Encryption Client, shown read-only under their own key names
    foreign: S3ecObject | None = None
    foreign_key: str | None = None  # its object key (relative to the volume's prefix)
    raw_prefix: str | None = None  # a directory of such objects: its key prefix
    plain: bytes | None = None  # a foreign file's authenticated plaintext, while open
    plain_etag: str | None = None
    target: bytes | None = None  # symlinks
    # generations this mount wrote (the last few), with the data key each was sealed under:
    # an upload whose answer was lost may still have landed
    own_salts: dict[bytes, WrappedKey] = field(default_factory=dict)
    journaled: int = -1  # value of ``change`` when the journal was last written
    kernel_etag: str | None = None  # object version whose pages the kernel may cache
    materializing: trio.Event | None = None  # set when a staged file being made is ready
    # keys below this directory in S3 as of ``keyset_at`` (lookups without a full listing)
    keyset: set[str] | None = None
    relisting: trio.Event | None = None  # set when the LIST of this directory in flight ends
    ahead: bool = False  # relisted ahead of a walk that has not entered it yet
    # object key and directory prefix as of a names generation (``Filesystem._names_gen``)
    key_memo: tuple[int, str, str, str | None] | None = None  # (gen, kind, key, long name)
    prefix_memo: tuple[int, str] | None = None
    keyset_at: float = -1e18
    keyset_loading: trio.Event | None = None
    # chunks being fetched by read-ahead: index -> event set when the fetch ended
    inflight: dict[int, trio.Event] = field(default_factory=dict)
    # directories: the name of the child last opened for reading, and the children's names
    # sorted, with what they were sorted from (a hint for read-ahead: a stale list only
    # misses a file or names one that is gone)
    read_last: bytes | None = None
    sorted_names: tuple[int, int, list[bytes]] | None = None  # (id, len of children, names)
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def kind(self) -> str:
        return self.attrs.kind

    @property
    def is_dir(self) -> bool:
        return self.attrs.kind == KIND_DIR

    @property
    def dirty(self) -> bool:
        return self.stage is not None or self.meta_dirty

    @property
    def only_times_pending(self) -> bool:
        """A directory whose one change to write is the times its entries changed: it does
        not keep a directory alive that another writer removed, nor win over their change
        of its attributes (unlike a change made by a chmod, chown or touch of it)."""
        return self.meta_dirty and self.times_only and self.is_dir

    @property
    def nlink(self) -> int:
        """Its link count: a file 1 (0 once unlinked: an open file's ``fstat``); a
        directory 2 and one per subdirectory (its ``..``), as ext4 counts them, once it is
        listed; 1 until then ("not counted", as GNU find and fts read it), since counting
        would cost a LIST per directory ``stat``."""
        if self.unlinked:
            return 0
        if not self.is_dir:
            return 1
        if self.children is None or self.listed_at < 0:
            return 1
        return 2 + sum(1 for c in self.children.values() if c.is_dir and not c.unlinked)


@dataclass
class Handle:
    fh: int
    node: Node
    writable: bool
    keep_cache: bool = False  # the kernel's cached pages of this file are still valid
    # O_APPEND without the kernel's write-back cache: the file system puts each write at
    # the end of the file as this mount knows it (libfuse's rule), not at the offset the
    # kernel sends, which it takes from a size it may have cached before another host's
    # change (``printf >>`` onto a file replaced elsewhere wrote past its end: zeros)
    append: bool = False
    next_offset: int = 0
    window: int = 0
    ra_next: int = 0  # first chunk the read-ahead has not scheduled yet


class Background:
    """Where work behind a request runs (read-ahead, block-cache writes, uploads due, relists
    ahead): the write-back service's nursery while it serves, else None (the work is then
    done in line, or not at all)."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
