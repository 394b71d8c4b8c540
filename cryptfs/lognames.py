"""What a log line may say about a file (docs/SECURITY.md, "Local secrets").

Logs (the daemon's file in the cache directory, journald, a command's stderr through
``logging``) name an object by its object key when that key is made of encrypted names, else
by its inode or file id.  A path, a name, a symlink target, or a key that is a name (volumes
made with ``--plaintext-names``, S3 Encryption Client objects) appears only with
``--log-names`` (``show_names``, set once per process with the logging).

Exception messages may hold names: a log line shows ``scrub(e)``, from which the names and
object keys the exception declares (``CryptfsError.names`` / ``.object_keys``) are cut, and
only the errno of an ``OSError`` (its file name is dropped) or the type of anything else.
Must not import: any cryptfs module but errors.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from cryptfs.errors import CryptfsError

HIDDEN = "…"  # what stands for a name cut out of a message

_show = False


def show_names(on: bool) -> None:
    """``--log-names``: log lines may name files by their paths (and keys that are names)."""
    global _show
    _show = on


def names_shown() -> bool:
    return _show


def _text(path: bytes | str) -> str:
    return path.decode(errors="backslashreplace") if isinstance(path, bytes) else path


def name(n: bytes | str) -> str:
    """A name (or path) for a log line: itself with ``--log-names``, else ``HIDDEN``."""
    return repr(_text(n)) if _show else HIDDEN


def ident(
    key: str | None,
    *,
    opaque: bool,
    path: bytes | str | None = None,
    ino: int | None = None,
    fid: bytes | None = None,
) -> str:
    """How a log line names one object: ``object KEY (inode N)`` when the key reveals no name
    (``opaque``: it is made of encrypted names), else ``inode N (file FID)``; with
    ``--log-names`` the key whatever it is, and the path as well."""
    extra = [f"inode {ino}"] if ino is not None else []
    if key is not None and (opaque or _show):
        head = f"object {key}"
    else:
        if fid is not None:
            extra.append(f"file {fid.hex()}")
        head = extra.pop(0) if extra else f"object {HIDDEN}"
    if _show and path is not None:
        extra.append(f"path {_text(path)}")
    return head + (f" ({', '.join(extra)})" if extra else "")


def scrub(e: BaseException, opaque: Callable[[str], bool] | None = None) -> str:
    """``str(e)`` for a log line: without the names it holds, unless ``--log-names``.

    ``opaque`` tells which object keys reveal no name (``NameCodec.opaque``); without it,
    every key the exception declares is cut."""
    if _show:
        return str(e)
    if isinstance(e, CryptfsError):
        text = str(e)
        hide = set(e.names) | {k for k in e.object_keys if opaque is None or not opaque(k)}
        for s in sorted(hide, key=len, reverse=True):
            if s:
                text = text.replace(s, HIDDEN)
        return text
    if isinstance(e, OSError):  # (its filename may be a path with names)
        if e.errno is not None and e.strerror:
            return f"[Errno {e.errno}] {e.strerror}"
        return type(e).__name__
    return type(e).__name__  # a message of unknown make: it may hold anything


def traceback_text(e: BaseException, opaque: Callable[[str], bool] | None = None) -> str:
    """The traceback of an unexpected error for a log line: its frames (code, no values) and
    each exception's type with ``scrub``'s text of it; all of it with ``--log-names``."""
    if _show:
        return "".join(traceback.format_exception(e)).rstrip("\n")
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and all(cur is not c for c in chain):
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    out: list[str] = []
    for x in reversed(chain):
        if out:
            out.append("\nwhich led to:\n")
        out.append("Traceback (most recent call last):\n")
        out += traceback.format_tb(x.__traceback__)
        what, text = f"{type(x).__module__}.{type(x).__qualname__}", scrub(x, opaque)
        out.append(f"{what}\n" if text == type(x).__name__ else f"{what}: {text}\n")
    return "".join(out).rstrip("\n")


class BytesArgs(logging.Filter):
    """For libraries' log records (pyfuse3 names the entry an invalidation failed for): their
    ``bytes`` arguments, which are file names, are hidden unless ``--log-names``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _show and isinstance(record.args, tuple):
            record.args = tuple(HIDDEN if isinstance(a, bytes) else a for a in record.args)
        return True
