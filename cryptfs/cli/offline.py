"""``cryptfs ls`` and ``decrypt``: a volume's names and files, read without a mount."""

from __future__ import annotations

import sys
from typing import Any

import trio

from cryptfs.cli.common import Progress, key_source, remote_of


def cmd_offline(args: Any) -> int:
    from cryptfs.offline import decrypt_tree, list_entries, open_offline

    source = key_source(args)
    remote = remote_of(args)

    async def main() -> None:
        async with open_offline(args.location, source, remote) as (fs, node):
            if args.cmd == "ls":
                for line in await list_entries(fs, node, args.long):
                    print(line)
                return
            dest = args.dest
            if node.is_dir or not dest.is_dir():
                target = dest
            else:
                target = dest / node.name.decode(errors="surrogateescape")
            size = fs.stat(node).size if not node.is_dir else 0
            bar = Progress("decrypting", unit="bytes")
            done = 0

            def tick(n: int) -> None:
                nonlocal done
                done += n
                bar.update(done, max(size, done))

            try:
                files, total = await decrypt_tree(fs, node, target, tick)
            finally:
                bar.close()
            print(f"decrypted {files} file(s), {total} bytes, to {target}", file=sys.stderr)

    trio.run(main)
    return 0
