"""The one exception tree of cryptfs.

Lower layers raise these domain errors, never raw errno values; the FUSE adapter maps each
leaf to exactly one errno (``cryptfs.fuse.ops.ERRNO_OF``, checked exhaustively by a test) and
the CLI turns them into one-line messages.  Messages never contain key material.

::

    CryptfsError
    ├── UsageError                 bad CLI input, missing files, wrong modes
    ├── VolumeError
    │   ├── VolumeNotFound         no volume config at that location
    │   ├── VolumeExists           init over an existing volume
    │   ├── WrongKey               no keyslot opens with the given key / passphrase
    │   └── UnsupportedFormat      a newer or unknown format/suite/flag
    ├── IntegrityError             authentication failed: tampered, truncated, foreign (EIO)
    ├── StoreError                 the object store failed
    │   ├── NotFound               object does not exist
    │   ├── PreconditionFailed     conditional request lost (another writer)
    │   ├── BucketNotFound
    │   ├── AccessDenied           credentials missing or refused
    │   ├── KeyTooLong             the server rejected the object key's length
    │   └── StoreUnavailable       endpoint unreachable / timed out after retries
    └── FsError                    POSIX-level refusals of the filesystem layer
        ├── NoEntry, Exists, NotEmpty, NotDir, IsDir, NameTooLong,
        ├── NotSupported, Invalid, NoSpace, CrossDevice, Busy, NotPermitted, NoAttr
"""

from __future__ import annotations

from collections.abc import Iterable


class CryptfsError(Exception):
    """Base of every error cryptfs raises on purpose.

    ``names``: the file names and paths its message holds; ``object_keys``: the object keys
    it holds (names themselves in a plaintext-name volume).  A log line cuts them out
    (``cryptfs.lognames.scrub``); a command's own error message keeps them.
    """

    def __init__(
        self, *args: object, names: Iterable[str] = (), object_keys: Iterable[str] = ()
    ) -> None:
        super().__init__(*args)
        self.names = tuple(names)
        self.object_keys = tuple(object_keys)


class UsageError(CryptfsError):
    """The user asked for something that cannot be done as asked."""


class VolumeError(CryptfsError):
    pass


class VolumeNotFound(VolumeError):
    pass


class VolumeExists(VolumeError):
    pass


class WrongKey(VolumeError):
    pass


class UnsupportedFormat(VolumeError):
    pass


class NewerFormat(UnsupportedFormat):
    """An object that authenticates but holds what this cryptfs does not know (a kind of
    entry of a later release): never left behind by a rotation, which would strand it."""


class IntegrityError(CryptfsError):
    """Authentication of stored data failed. Final: never retried, never served partially."""


class StoreError(CryptfsError):
    pass


class NotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    pass


class BucketNotFound(StoreError):
    pass


class AccessDenied(StoreError):
    pass


class KeyTooLong(StoreError):
    pass


class StoreUnavailable(StoreError):
    pass


class SseMismatch(StoreError):
    """An object lacks the server-side encryption the volume requires, or the server did
    not apply it to a write."""


class KeyServiceError(CryptfsError):
    """AWS KMS refused or failed a request."""


class KeyAccessDenied(KeyServiceError):
    """Final: access denied, key disabled, pending deletion or not found."""


class KeyServiceUnavailable(KeyServiceError):
    """Transient (throttling, network) after the retries were used up."""


class FsError(CryptfsError):
    pass


class NoEntry(FsError):
    pass


class Exists(FsError):
    pass


class NotEmpty(FsError):
    pass


class NotDir(FsError):
    pass


class IsDir(FsError):
    pass


class NameTooLong(FsError):
    pass


class NotSupported(FsError):
    pass


class Invalid(FsError):
    pass


class NoSpace(FsError):
    pass


class CrossDevice(FsError):
    pass


class Busy(FsError):
    pass


class NotPermitted(FsError):
    """The operation is refused by design (hard links): EPERM."""


class FileTooBig(FsError):
    """An object too large for what the operation must hold in memory."""


class ReadOnly(FsError):
    """The volume cannot take new files now (e.g. its master key was rotated elsewhere)."""


class NoAttr(FsError):
    """No such extended attribute."""
