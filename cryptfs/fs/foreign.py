"""Objects of the AWS S3 Encryption Client found in the volume's prefix: shown read-only
under their own key names (``--show-foreign``), decrypted whole, held in memory while open.

Owns: when an entry may be such an object, reading their envelopes (from the object or its
instruction file), adopting them into the tree, and the memory their plaintexts hold (at most
``foreign_max_bytes`` in all).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``, ``remote`` and
``namespace``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping

from cryptfs.crypto import sha256
from cryptfs.errors import (
    CryptfsError,
    FileTooBig,
    IntegrityError,
    NotFound,
    StoreError,
    UnsupportedFormat,
)
from cryptfs.format import s3ec
from cryptfs.format.meta import KIND_FILE, Attrs
from cryptfs.format.s3ec import S3ecObject
from cryptfs.fs.model import Node, Options, join
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import PAGE, Remote
from cryptfs.store.base import ObjectInfo, ObjectStore
from cryptfs.volume import MARKER, Volume

log = logging.getLogger(__name__)


async def s3ec_envelope(
    store: ObjectStore, key: str, md: Mapping[str, str], instruction: bool | None
) -> S3ecObject | None:
    """The S3 Encryption Client envelope of object ``key`` (user metadata ``md``), from the
    object itself or from its instruction file; None if it is not such an object.

    ``instruction`` says whether ``key.instruction`` exists (None: not known, ask S3).
    IntegrityError / UnsupportedFormat for an envelope cryptfs must not or cannot use.
    """
    if s3ec.is_s3ec(md) and not s3ec.needs_instruction(md):
        return s3ec.parse(md)
    needed = s3ec.needs_instruction(md)
    if instruction is False and not needed:
        return None
    ikey = key + s3ec.INSTRUCTION_SUFFIX
    try:
        info, body = await store.get(ikey, 0, _INSTRUCTION_MAX)
    except NotFound:
        if needed:
            raise IntegrityError(
                f"S3EC instruction file {ikey} is missing", object_keys=(ikey,)
            ) from None
        return None
    except StoreError as e:
        if type(e) is not StoreError:  # unavailable, denied…: not a verdict on the file
            raise
        raise IntegrityError(
            f"S3EC instruction file {ikey} is unreadable: {e}",
            names=e.names,
            object_keys=(ikey, *e.object_keys),
        ) from None
    if info.size > _INSTRUCTION_MAX:
        raise IntegrityError(f"S3EC instruction file {ikey} is too large", object_keys=(ikey,))
    return dataclasses.replace(s3ec.parse(s3ec.merge_instruction(md, body)), instruction=True)


_INSTRUCTION_MAX = 64 << 10


class Foreign:
    def __init__(
        self, volume: Volume, options: Options, tree: Namespace, paths: Paths, remote: Remote
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.tree = tree
        self.paths = paths
        self.remote = remote
        self.held: OrderedDict[Node, int] = OrderedDict()  # plaintexts in memory, LRU first

    def allowed(self, parent: Node) -> bool:
        """May an entry of ``parent`` named as a cryptfs key be an S3EC object?  Only in a
        directory of them, or where names are not encrypted (there every key is a name)."""
        return self.opt.show_foreign and (
            parent.raw_prefix is not None or not self.vol.config.encrypt_names
        )

    def adopt(
        self, parent: Node, name: bytes, info: ObjectInfo, existing: Node | None, env: S3ecObject
    ) -> Node:
        """An S3 Encryption Client object: read-only, under its own key name."""
        if existing is not None and existing.foreign is not None:
            node = existing
            if node.remote_etag != info.etag:
                node.plain = None
                self.held.pop(node, None)
        else:
            if existing is not None:
                self.tree.gone_elsewhere(existing)
            ns = int(info.modified * 1e9)
            attrs = Attrs(KIND_FILE, 0o444, self.opt.uid, self.opt.gid, ns, ns, ns)
            node = self.tree.new_node(parent, name, attrs, sha256(info.key.encode())[:16])
        node.foreign, node.foreign_key = env, info.key
        node.attrs = node.attrs.with_(size=env.plain_size(info.size))
        return self.tree.seen(parent, name, node, info)

    async def entry(
        self,
        d: Node,
        comp: str,
        key: str,
        etag: str | None,
        old: dict[bytes, Node],
        new: dict[bytes, Node],
        here: set[str],
        info: ObjectInfo | None = None,
    ) -> bool:
        """A listing entry that is not one of ours: an S3 Encryption Client object or a
        prefix of them is shown under its own name (an instruction file beside its object is
        part of that object), if the mount shows them (else it is left out, and is no
        integrity failure); anything else is not ours.  ``here``: the listing's keys."""
        show = self.opt.show_foreign
        name = comp.encode(errors="surrogateescape")
        if etag is not None:
            if s3ec.is_instruction_of_listed(key, here):
                return True
            info = info or await self.remote.head(key)
            if info is None:
                return False
            try:
                env = await s3ec_envelope(
                    self.store, key, info.metadata, s3ec.has_instruction(key, here)
                )
                if env is None:
                    return False
                problem = s3ec.name_problem(name)
                if show and problem is not None:
                    # a bucket writer chose this key: never a '..', a NUL or 256 bytes in readdir
                    log.warning(
                        "S3 Encryption Client object %s not shown: %s",
                        self.paths.key_ident(key),
                        problem,
                    )
                elif show:
                    cur = old.get(name)  # (a native entry of this name is never replaced)
                    mine = cur if cur is not None and cur.foreign is not None else None
                    new[name] = self.adopt(d, name, info, mine, env)
            except (IntegrityError, UnsupportedFormat) as e:
                log.warning(
                    "S3 Encryption Client object %s in %s not shown: %s",
                    self.paths.key_ident(key, join(self.paths.path(d), name)),
                    self.paths.ident(d),
                    self.paths.scrub(e),
                )
            return True
        prefix = key[: -len(MARKER)]
        if not await self.prefix(prefix):
            return False
        if not show:
            return True
        problem = s3ec.name_problem(name)
        if problem is not None:
            log.warning(
                "S3 Encryption Client objects under %s not shown: %s",
                self.paths.key_ident(prefix),
                problem,
            )
            return True
        cur = old.get(name)
        new[name] = (
            cur if cur is not None and cur.raw_prefix == prefix
            else self.tree.synthetic_dir(d, name, raw_prefix=prefix)
        )  # fmt: skip
        return True

    async def prefix(self, prefix: str) -> bool:
        """Does ``prefix`` (whose name is not one of ours) hold S3 Encryption Client objects?"""
        listing = await self.store.list(prefix, delimiter=None, max_keys=PAGE)
        keys = [o.key for o in listing.objects]
        # (a folder placeholder, "X/" or one below, is no object: never the one looked at)
        first = next(
            (k for k in keys if not s3ec.is_instruction_key(k) and not k.endswith("/")), None
        )
        if first is None:
            return False
        info = await self.remote.head(first)
        return info is not None and (
            s3ec.is_s3ec(info.metadata) or s3ec.has_instruction(first, keys)
        )

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        """Whole object, authenticated as a whole, kept while the file is open."""
        assert node.foreign is not None
        assert node.foreign_key is not None
        if node.plain is None or node.plain_etag != node.remote_etag:
            if node.attrs.size > self.opt.foreign_max_bytes:
                raise FileTooBig(
                    f"S3 Encryption Client object of {node.attrs.size} bytes is over the "
                    f"{self.opt.foreign_max_bytes}-byte limit (one GCM tag covers it all: it "
                    "must be read whole); use 'cryptfs import'"
                )
            key = node.foreign_key
            info, body = await self.store.get(key, if_match=node.remote_etag)
            env = node.foreign
            try:
                if env.instruction:  # re-read: its data key may have been re-wrapped since
                    fresh = await s3ec_envelope(self.store, key, info.metadata, True)
                    assert fresh is not None
                    env = fresh
                try:
                    data_key = await self.vol.keyring.unwrap_s3ec(env, key)
                except CryptfsError as e:
                    e.object_keys += (key,)  # (its message names the object by its key)
                    raise
                plain = s3ec.decrypt(env, data_key, body)
            except IntegrityError as e:
                self.tree.integrity(key, e, node)
                raise
            node.plain, node.plain_etag = plain, node.remote_etag
            self.hold(node)
        else:
            self.held.move_to_end(node)
        return node.plain[offset : offset + size]

    def hold(self, node: Node) -> None:
        """Foreign plaintexts held in memory stay within ``foreign_max_bytes`` in total:
        the least recently read are dropped (and downloaded again if read again)."""
        self.held[node] = len(node.plain or b"")
        self.held.move_to_end(node)
        total = sum(self.held.values())
        while total > self.opt.foreign_max_bytes and len(self.held) > 1:
            old, n = self.held.popitem(last=False)
            old.plain = None
            total -= n
