"""Where a node lives in S3: its path, its object key and its directory's key prefix.

Owns: the mapping path -> object key (names encrypted by ``Volume.names``, bound to their
directory's path), the memo of keys per node (valid for one names generation: a moved
directory makes every memoised key below it stale), S3's key budget, and how log lines
name nodes and keys (``cryptfs.lognames``: no name unless ``--log-names``).
Must not import: other parts of ``cryptfs.fs`` but ``model``; ``cryptfs.store``.
"""

from __future__ import annotations

from cryptfs import lognames
from cryptfs.errors import CryptfsError, NameTooLong
from cryptfs.format.meta import KIND_DIR
from cryptfs.fs.model import MAX_KEY, Node, join
from cryptfs.volume import MARKER, Volume


class Paths:
    def __init__(self, volume: Volume, key_prefix: str = "") -> None:
        self.vol = volume
        self.names = volume.names
        # bytes of key left below the volume's prefix (S3 allows 1,024 in all)
        self.budget = MAX_KEY - len(key_prefix.encode())
        self.gen = 0  # names generation: bumped when a directory moves

    def moved_dir(self) -> None:
        """A directory moved: every key memoised below it is stale."""
        self.gen += 1

    def path(self, node: Node) -> bytes:
        parts = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return b"/" + b"/".join(reversed(parts))

    def child_path(self, parent: Node, name: bytes) -> bytes:
        return join(self.path(parent), name)

    def component(self, parent: Node, name: bytes) -> tuple[str, str | None]:
        """The key component of entry ``name`` of ``parent`` (and its long name, if any)."""
        return self.names.encode(self.path(parent), name)

    def dir_prefix(self, node: Node) -> str:
        if node.raw_prefix is not None:
            return node.raw_prefix
        if node.parent is None:
            return ""
        memo = node.prefix_memo
        if memo is not None and memo[0] == self.gen:
            return memo[1]
        prefix = self.prefix_for(node.parent, node.name)
        node.prefix_memo = (self.gen, prefix)
        return prefix

    def prefix_for(self, parent: Node, name: bytes) -> str:
        """The key prefix of a directory ``name`` of ``parent`` (existing or not)."""
        comp, _ = self.component(parent, name)
        return self.dir_prefix(parent) + comp + "/"

    def key_for(self, parent: Node, name: bytes, kind: str) -> tuple[str, str | None]:
        """The object key of an entry ``name`` of ``kind`` in ``parent``, and its long name;
        NameTooLong if that key would be over S3's limit."""
        if parent.raw_prefix is not None:  # inside a directory of S3EC objects: raw names
            comp = name.decode(errors="surrogateescape")
            return parent.raw_prefix + comp + ("/" + MARKER if kind == KIND_DIR else ""), None
        comp, long_name = self.component(parent, name)
        key = self.dir_prefix(parent) + comp + ("/" + MARKER if kind == KIND_DIR else "")
        self.check_budget(key)
        return key, long_name

    def check_budget(self, key: str, what: str = "path") -> None:
        if len(key.encode()) > self.budget:
            raise NameTooLong(f"{what} too long for an S3 key once encrypted")

    def object_key(self, node: Node) -> tuple[str, str | None]:
        if node.foreign_key is not None:
            return node.foreign_key, None
        if node.parent is None:
            return MARKER, None
        memo = node.key_memo
        if memo is not None and memo[0] == self.gen and memo[1] == node.kind:
            return memo[2], memo[3]
        key, long_name = self.key_for(node.parent, node.name, node.kind)
        node.key_memo = (self.gen, node.kind, key, long_name)
        return key, long_name

    def remember(self, node: Node, key: str, gen: int) -> None:
        """``key`` was listed as ``node``'s object as of names generation ``gen``: memoise it
        (no name encryption when the file is opened)."""
        if (
            node.key_memo is None
            and self.gen == gen
            and node.foreign_key is None
            and node.raw_prefix is None
            and key.endswith("/" + MARKER) == node.is_dir
        ):
            node.key_memo = (gen, node.kind, key, None)
            if node.is_dir and node.prefix_memo is None:
                node.prefix_memo = (gen, key[: -len(MARKER)])

    # ------------------------------------------------------------------ log lines

    def ident(self, node: Node) -> str:
        """How a log line names ``node``: its object key if that reveals no name, and its
        inode; its path only with ``--log-names`` (``cryptfs.lognames``)."""
        try:
            key: str | None = self.object_key(node)[0]
        except CryptfsError:  # (a path too long for a key)
            key = None
        return lognames.ident(
            key,
            opaque=key is not None and self.names.opaque(key),
            path=self.path(node),
            ino=node.ino,
            fid=node.file_id,
        )

    def key_ident(self, key: str, path: bytes | None = None) -> str:
        """How a log line names the object ``key`` (no node of it at hand)."""
        return self.vol.key_ident(key, path)

    def scrub(self, e: BaseException) -> str:
        """``e``'s message for a log line: names cut out, keys only if they reveal none."""
        return self.vol.scrub(e)
