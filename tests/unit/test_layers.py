"""Third-party libraries stay confined to their layer, and imports point down: between the
package's layers, and between the parts of ``cryptfs/fs`` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "cryptfs"

ALLOWED = {
    "cryptography": {"crypto/__init__.py"},
    "pyfuse3": {"fuse/ops.py"},
    "aiobotocore": {"store/s3.py", "store/kms.py"},
    "botocore": {"store/s3.py", "store/kms.py", "store/lean.py", "store/classify.py"},
    "aiohttp": {"store/lean.py", "store/classify.py"},
    # the bridge owns the loop thread; the lean S3 path runs on it (its retry backoff sleeps)
    "asyncio": {"store/bridge.py", "store/lean.py"},
    "prometheus_client": {"metrics.py"},
    "rich": {"cli/common.py"},
}
# lower layers must not import upper ones
FORBIDDEN = {
    "crypto": {"cryptfs.format", "cryptfs.store", "cryptfs.fs", "cryptfs.fuse", "cryptfs.cache"},
    "format": {"cryptfs.store", "cryptfs.fs", "cryptfs.fuse", "cryptfs.cache"},
    "store": {"cryptfs.format", "cryptfs.fs", "cryptfs.fuse", "cryptfs.cache", "cryptfs.keys"},
    "keys": {"cryptfs.fs", "cryptfs.fuse", "cryptfs.cache", "cryptfs.daemon", "cryptfs.cli"},
    "cache": {"cryptfs.store", "cryptfs.fs", "cryptfs.fuse"},
    "fs": {"cryptfs.fuse", "cryptfs.daemon", "cryptfs.cli"},
    # (a module of the package's top level: the opened volume sits below the file system)
    "volume.py": {"cryptfs.fs", "cryptfs.fuse", "cryptfs.daemon", "cryptfs.cli"},
}


def _imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    return mods


def test_third_party_confined() -> None:
    files = list(PKG.rglob("*.py"))
    assert len(files) > 10
    bad = []
    for f in files:
        rel = str(f.relative_to(PKG))
        for mod in _imports(f):
            top = mod.split(".")[0]
            if top in ALLOWED and rel not in ALLOWED[top]:
                bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_layers_point_down() -> None:
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        files = [PKG / layer] if layer.endswith(".py") else (PKG / layer).rglob("*.py")
        for f in files:
            for mod in _imports(f):
                if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                    bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not bad, bad


# inside fs/: each part imports only parts listed before it (``filesystem`` is the facade the
# FUSE layer and the tools use; ``unmounted`` builds one for the tools); a new module goes
# into this order or the test fails
FS_ORDER = [
    "locks",
    "model",
    "paths",
    "remote",
    "namespace",
    "foreign",
    "listing",
    "lookup",
    "fetch",
    "staged",
    "upload",
    "entries",
    "writeback",
    "rename",
    "recovery",
    "files",
    "filesystem",
    "unmounted",
]


def test_fs_parts_point_down() -> None:
    present = {f.stem for f in (PKG / "fs").glob("*.py")} - {"__init__"}
    assert present == set(FS_ORDER), f"fs/ modules not in FS_ORDER: {present ^ set(FS_ORDER)}"
    bad = []
    for i, part in enumerate(FS_ORDER):
        for mod in _imports(PKG / "fs" / f"{part}.py"):
            if mod.startswith("cryptfs.fs."):
                other = mod.split(".")[2]
                if other not in FS_ORDER[:i]:
                    bad.append(f"fs/{part}.py imports {mod}")
    assert not bad, bad
