"""Settings: one table of every option, resolved as command line > environment > TOML file >
default (docs/CONFIGURATION.md is generated from ``OPTIONS`` and checked by a test).

The table is the one source of an option: the command line's flags (``cli.options``), the
argv a mount hands its daemon (``daemon_argv``) and the file system's ``Options``
(``Opt.fs``) are all made from it.

A config file is ``/etc/cryptfs/NAME.toml`` (``--config NAME``) or any path (``--config
PATH``).  Unknown keys and wrongly typed values are refused with the key's name.  Relative
paths in a file are relative to the file.  Secrets are never values here: only paths to files
(mode 0600), or systemd credentials (``$CREDENTIALS_DIRECTORY/key``, ``…/passphrase``,
``…/sse-c-key``) when no path is given.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptfs.errors import UsageError

CONFIG_DIR = Path("/etc/cryptfs")


# which commands take an option's flag
VOLUME = "volume"  # every command that opens a volume (init, mount, ls, key, fsck, …)
KEYS = "keys"  # every command that opens an existing volume (not init: it makes the key)
MOUNT = "mount"  # mount only


@dataclass(frozen=True)
class Opt:
    name: str  # key in the file; --name-with-dashes on the command line; CRYPTFS_NAME in env
    kind: type  # str, Path, float, int, bool, list
    default: Any
    help: str
    on: str = MOUNT  # VOLUME, KEYS or MOUNT: the commands whose command line has it
    size: bool = False  # a number of bytes: "64K", "2G" on the command line
    fs: str | None = None  # the field of ``cryptfs.fs.model.Options`` it sets

    @property
    def env(self) -> str:
        return "CRYPTFS_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """Its flags on a command line (none: a positional argument)."""
        if self.name in POSITIONAL:
            return ()
        return SPECIAL_FLAGS.get(self.name, (self.flag,))


# the options that are not a plain --flag VALUE: positional arguments, and flags of their own
POSITIONAL = frozenset({"location", "mountpoint"})
SPECIAL_FLAGS = {"options": ("-o",), "verbose": ("-v", "--verbose")}
# what a mount(8) option (fstab's -o) cannot set: the two places, the -o list itself, -v
NOT_MOUNT_OPTIONS = POSITIONAL | set(SPECIAL_FLAGS)


OPTIONS: list[Opt] = [
    Opt("location", str, None, "the volume, s3://BUCKET[/PREFIX]", VOLUME),
    Opt("mountpoint", Path, None, "where to mount (mount only)"),
    Opt("key_file", Path, None, "key file that opens the volume (mode 0600)", KEYS),
    Opt("passphrase_file", Path, None, "file holding a passphrase (mode 0600)", KEYS),
    Opt("endpoint_url", str, None, "S3 endpoint; default AWS_ENDPOINT_URL, else AWS", VOLUME),
    Opt("region", str, None, "S3/KMS region; default from the AWS config, else us-east-1", VOLUME),
    Opt("ca_bundle", Path, None, "CA bundle for private TLS endpoints (S3 and KMS)", VOLUME),
    Opt(
        "kms_endpoint_url",
        str,
        None,
        "AWS KMS endpoint; default AWS_ENDPOINT_URL_KMS, else AWS",
        VOLUME,
    ),
    Opt(
        "sse_c_key_file", Path, None, "SSE-C customer key file (volumes made with --sse c)", VOLUME
    ),
    Opt(
        "addressing_style",
        str,
        "auto",
        "how requests name the bucket: path, virtual (bucket.host) or auto (virtual on AWS)",
        VOLUME,
    ),
    Opt("s3_attempts", int, 5, "attempts per S3 request (exponential backoff with jitter)", VOLUME),
    Opt(
        "s3_timeout", float, 60.0, "seconds to wait for an S3 answer (connect: at most 10)", VOLUME
    ),
    Opt("s3ec_key_file", Path, None, "raw AES key (key-file format) of S3EC objects", VOLUME),
    Opt(
        "s3ec_max_size",
        int,
        256 << 20,
        "largest S3EC object a mount reads (bytes, read whole)",
        size=True,
        fs="foreign_max_bytes",
    ),
    Opt(
        "show_s3ec",
        bool,
        False,
        "show AWS S3 Encryption Client objects (read-only)",
        fs="show_foreign",
    ),
    Opt("s3ec_kms_key_id", list, [], "KMS keys S3EC objects' data keys may be under", VOLUME),
    Opt(
        "kms_key_id",
        str,
        None,
        "the KMS key whose keyslot opens the volume (or, init: wraps)",
        KEYS,
    ),
    Opt("cache_dir", Path, None, "staging/cache directory; default /var/cache/cryptfs (root)"),
    Opt("log_file", Path, None, "daemon log; default CACHE_DIR/cryptfs.log when daemonised"),
    Opt(
        "writeback_delay",
        float,
        2.0,
        "seconds a closed file waits before its upload",
        fs="writeback_delay",
    ),
    Opt(
        "metadata_ttl",
        float,
        10.0,
        "seconds attributes and listings are trusted (kernel too)",
        fs="metadata_ttl",
    ),
    Opt("options", list, [], 'FUSE mount options, e.g. ["allow_other"] (-o on the CLI)'),
    Opt("metrics_address", str, None, "serve Prometheus metrics on HOST:PORT"),
    Opt(
        "writeback_cache",
        bool,
        False,
        "kernel batches small writes (much faster); single-host volumes only",
    ),
    Opt(
        "cache_size",
        int,
        2 << 30,
        "encrypted chunks kept on the cache disk, bytes (0: none)",
        size=True,
    ),
    Opt("read_ahead_kb", int, 4096, "kernel read-ahead of the mount, KiB (0: the kernel's 128)"),
    Opt(
        "read_ahead_files",
        int,
        8,
        "small files fetched ahead of a reader going in name order",
        fs="sibling_readahead",
    ),
    Opt("verbose", int, 0, "log detail: 0 warnings, 1 info, 2 debug (-v, -vv)", VOLUME),
    Opt(
        "log_names", bool, False, "logs show paths and names (default: object keys, inodes)", VOLUME
    ),
]
BY_NAME = {o.name: o for o in OPTIONS}


def config_path(name_or_path: str) -> Path:
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        return Path(name_or_path)
    return CONFIG_DIR / f"{name_or_path}.toml"


def _convert(opt: Opt, value: Any, origin: str, base: Path | None) -> Any:
    where = f"{origin}: {opt.name}"
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise UsageError(f"{where} must be true or false")
    if opt.kind is list:
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UsageError(f"{where} must be a list of strings")
    if opt.kind in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"{where} must be a number")
        try:
            v = opt.kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a number, not {value!r}") from None
        if v < 0:
            raise UsageError(f"{where} must not be negative")
        return v
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where} must be a non-empty string")
    if opt.kind is Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or base is None else base / p
    return value


def load_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path}: {e}") from None
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        raise UsageError(
            f"config file {path}: unknown key(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(BY_NAME))})"
        )
    base = path.parent.absolute()
    return {k: _convert(BY_NAME[k], v, str(path), base) for k, v in data.items()}


def resolve(
    cli: dict[str, Any], config: str | None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every option's value: ``cli`` (None = not given) > CRYPTFS_* > file > default."""
    env = dict(os.environ) if env is None else env
    from_file = load_file(config_path(config)) if config else {}
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        value = cli.get(opt.name)
        # (-v counts from 0: zero means "not given" there)
        if value is not None and value != [] and not (opt.name == "verbose" and value == 0):
            out[opt.name] = value
        elif env.get(opt.env):
            out[opt.name] = _convert(opt, env[opt.env], opt.env, None)
        elif opt.name in from_file:
            out[opt.name] = from_file[opt.name]
        else:
            out[opt.name] = opt.default
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and out["key_file"] is None and out["passphrase_file"] is None:
        for name, key in (("key", "key_file"), ("passphrase", "passphrase_file")):
            if (Path(creds) / name).exists():
                out[key] = Path(creds) / name
    if creds and out["sse_c_key_file"] is None and (Path(creds) / "sse-c-key").exists():
        out["sse_c_key_file"] = Path(creds) / "sse-c-key"
    return out


def parse_size(text: str) -> int:
    """``64K``, ``2G``, ``1MiB``, ``4096``: a number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise UsageError(f"not a size: {text!r}") from None


def takes(command: str, opt: Opt) -> bool:
    """Does ``command``'s command line have ``opt``'s flag?"""
    if opt.on == VOLUME:
        return command not in ("umount", "stats")
    if opt.on == KEYS:
        return command not in ("umount", "stats", "init")
    return command == "mount"


# set by the daemon's own argv (its places, cache and log paths, -o, -v), not copied into it
_NOT_HANDED_ON = NOT_MOUNT_OPTIONS | {"cache_dir", "log_file"}


def daemon_argv(values: dict[str, Any]) -> list[str]:
    """The flags that hand ``values`` (every option of a mount, resolved) to its daemon:
    each option the table has, whatever the command line, the environment or a file said,
    so that the daemon reads no file and no environment of its own for them."""
    argv: list[str] = []
    for opt in OPTIONS:
        value = values.get(opt.name)
        if opt.name in _NOT_HANDED_ON or not takes("mount", opt):
            continue
        if value is None or value is False or value == []:  # (0 is a value: no disk cache)
            continue
        if opt.kind is bool:
            argv.append(opt.flag)
        elif opt.kind is list:
            for v in value:
                argv += [opt.flag, str(v)]
        elif opt.kind is Path:
            argv += [opt.flag, str(Path(value).absolute())]
        else:
            argv += [opt.flag, str(value)]
    return argv


def fs_options(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cryptfs.fs.model.Options`` the table's options set."""
    return {o.fs: values[o.name] for o in OPTIONS if o.fs is not None}


def markdown_table() -> str:
    rows = [
        "| key (file) | command line | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        default = "—" if o.default in (None, []) else f"`{o.default}`"
        flag = f"`{o.flags[0]}`" if o.flags else "positional"
        rows.append(f"| `{o.name}` | {flag} | `{o.env}` | {default} | {o.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # regenerate the table in docs/CONFIGURATION.md
    print(markdown_table(), end="")
