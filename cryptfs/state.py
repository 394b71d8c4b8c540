"""What this machine remembers of each volume it opened (docs/FORMAT.md §7.5).

Owns: ``<state dir>/<volume_id hex>.json`` = ``{"epoch": N, "kms_slot_keys": [ARN, …]}``:
the highest config epoch seen authenticated here, and the KMS keys whose keyslots opened the
volume here.  A config with a lower epoch is a replay (refused); a KMS keyslot under a key not
listed (and not named by the user) is not tried.

The state dir is ``$CRYPTFS_STATE_DIR``, else ``/var/lib/cryptfs`` for root, else
``$XDG_STATE_HOME/cryptfs`` (``~/.local/state/cryptfs``).  Directory 0700, files 0600,
written atomically (temporary file, fsync, rename).  It holds no secret.
Must not import: fs, fuse.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptfs.errors import UsageError


def state_dir() -> Path:
    env = os.environ.get("CRYPTFS_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cryptfs")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "cryptfs"


@dataclass
class VolumeState:
    volume_id: bytes
    epoch: int = 0
    kms_slot_keys: list[str] = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def load(cls, volume_id: bytes, directory: Path | None = None) -> VolumeState:
        d = directory or state_dir()
        path = d / f"{volume_id.hex()}.json"
        st = cls(volume_id, path=path)
        try:
            raw = json.loads(path.read_bytes()[: 1 << 16])
            st.epoch = int(raw.get("epoch", 0))
            st.kms_slot_keys = [str(k) for k in raw.get("kms_slot_keys", [])][:64]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UsageError(
                f"machine state {path} is unreadable ({e}); remove it to reset"
            ) from None
        return st

    def save(self) -> None:
        """Write atomically; a machine that cannot remember is refused (it would forget)."""
        assert self.path is not None
        d = self.path.parent
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = json.dumps(
                {"epoch": self.epoch, "kms_slot_keys": sorted(set(self.kms_slot_keys))}
            ).encode()
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".state-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise UsageError(
                f"cannot record this volume's config epoch in {d} ({e.strerror}); set "
                "CRYPTFS_STATE_DIR to a writable directory"
            ) from None

    def see(self, epoch: int, kms_key: str | None = None) -> None:
        """Remember ``epoch`` (and the KMS key whose slot opened the volume) if new."""
        changed = False
        if epoch > self.epoch:
            self.epoch = epoch
            changed = True
        if kms_key is not None and kms_key not in self.kms_slot_keys:
            self.kms_slot_keys.append(kms_key)
            changed = True
        if changed:
            self.save()
