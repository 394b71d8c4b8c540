"""``mount.cryptfs`` and ``umount.fuse.cryptfs``: what mount(8), umount(8) and /etc/fstab call.

    mount -t cryptfs s3://bucket/prefix /mnt -o keyfile=/etc/cryptfs/k,endpoint=URL,_netdev
    s3://bucket/prefix  /mnt  cryptfs  keyfile=/etc/cryptfs/k,_netdev,nofail  0 0   (fstab)

Options named as a setting of a mount (``cryptfs.config.OPTIONS``: ``key_file=…``,
``metadata_ttl=…``, a bare ``show_s3ec``…, and the aliases ``keyfile``, ``endpoint``,
``kms_endpoint``) become cryptfs flags; fstab/systemd bookkeeping options are dropped;
everything else goes to FUSE (``-o``).  The helper returns once the mount answers
(the daemon keeps running).  umount(8) runs ``umount.fuse.cryptfs MOUNTPOINT`` for our
mounts, which waits until every pending upload is in S3, like ``cryptfs umount``.
"""

from __future__ import annotations

import sys

from cryptfs import cli
from cryptfs.config import NOT_MOUNT_OPTIONS, OPTIONS, takes

# mount option -> cryptfs flag: every setting of a mount (the option table), and aliases for
# fstab brevity
_OURS = {
    o.name: o.flag
    for o in OPTIONS
    if takes("mount", o) and o.name not in NOT_MOUNT_OPTIONS and o.kind is not bool
}
_OURS |= {"keyfile": "--key-file", "endpoint": "--endpoint-url", "config": "--config",
          "kms_endpoint": "--kms-endpoint-url"}  # fmt: skip
_SWITCHES = {o.name: o.flag for o in OPTIONS if takes("mount", o) and o.kind is bool}
_DROPPED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "rw", "nouser"}
_DROPPED_PREFIX = ("x-systemd.", "x-", "comment=")


def translate(source: str, target: str, options: str) -> list[str]:
    argv = ["mount", source, target]
    fuse: list[str] = []
    for opt in (o.strip() for o in options.split(",")):
        if not opt or opt in _DROPPED or opt.startswith(_DROPPED_PREFIX):
            continue
        name, eq, value = opt.partition("=")
        if name in _SWITCHES and not eq:
            argv.append(_SWITCHES[name])
        elif name in _OURS:
            if not eq or not value:
                raise SystemExit(f"mount.cryptfs: option {name} needs a value")
            argv += [_OURS[name], value]
        else:
            fuse.append(opt)
    if fuse:
        argv += ["-o", ",".join(fuse)]
    return argv


def mount_main(argv: list[str] | None = None) -> int:
    """``mount.cryptfs SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE] [-N NS]`` (mount(8) ABI)."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options, verbose, fake = "", 0, False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            options = ",".join(filter(None, (options, args[i + 1])))
            i += 2
            continue
        if a in ("-t", "-N") and i + 1 < len(args):
            i += 2
            continue
        if a.startswith("-") and len(a) > 1:
            verbose += a.count("v")
            fake = fake or "f" in a
            i += 1
            continue
        positional.append(a)
        i += 1
    if len(positional) != 2:
        print("usage: mount.cryptfs s3://BUCKET[/PREFIX] MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 1
    cmd = translate(positional[0], positional[1], options) + ["-v"] * verbose
    if fake:  # mount -f: do everything but the mount
        return 0
    return cli.main(cmd)


def umount_main(argv: list[str] | None = None) -> int:
    """``umount.fuse.cryptfs DIR [-flnrv]``: unmount and wait for the uploads."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if len(args) != 1:
        print("usage: umount.fuse.cryptfs MOUNTPOINT", file=sys.stderr)
        return 1
    return cli.main(["umount", args[0]])
