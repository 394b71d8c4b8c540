#!/bin/bash
# Upgrade, then rotate, a revision-1 volume written by an earlier cryptfs, on a local SeaweedFS.
#   bash benchmarks/upgrade_rotate.sh [OLD_COMMIT]      (N=2000 files of 3 KB by default)
# The old commit's own CLI writes the volume through a FUSE mount; this checkout's CLI then
# runs `cryptfs upgrade` and `cryptfs rotate` (--settle 0: nothing else is mounted) and the
# result is compared with `diff -r`. Needs `make install` first; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OLD=${1:-f612c597408dba8ece496fdaf4678c66619c5a58}
N=${N:-2000}
PY=$ROOT/.venv/bin/python
W=$(mktemp -d)
export CRYPTFS_STATE_DIR=$W/state
git worktree add -f "$W/old" "$OLD" >/dev/null 2>&1
cleanup() {
    fusermount3 -u "$W/mnt" 2>/dev/null || true
    if [ -f "$W/pgid" ]; then  # our server's process group (as tests/conftest.py stops it)
        kill -TERM -- "-$(cat "$W/pgid")" 2>/dev/null || true
        sleep 3
        kill -KILL -- "-$(cat "$W/pgid")" 2>/dev/null || true
    fi
    git worktree remove --force "$W/old" 2>/dev/null || true
}
trap cleanup EXIT
EP=$($PY - "$W" <<'PYEOF'
import os, sys
from pathlib import Path
from tests.conftest import start_seaweed
s = start_seaweed(Path(sys.argv[1]) / "s3")
Path(sys.argv[1], "pgid").write_text(str(s.proc.pid))  # (started in a session of its own)
print(s.endpoint)
os._exit(0)
PYEOF
)
eval "$($PY -c 'from tests.conftest import ACCESS_KEY, SECRET_KEY
print(f"export AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY}")')"
$PY -c "import boto3; boto3.client('s3', endpoint_url='$EP', region_name='us-east-1').create_bucket(Bucket='upgrade-bench')"
mkdir -p "$W/src" "$W/mnt"
for i in $(seq 1 "$N"); do head -c 3000 /dev/urandom > "$W/src/f$i"; done
old() { (cd "$W/old" && PYTHONPATH="$W/old" "$PY" -m cryptfs "$@"); }
old init s3://upgrade-bench/v --key-file "$W/k" --endpoint-url "$EP"
old mount s3://upgrade-bench/v "$W/mnt" --key-file "$W/k" --endpoint-url "$EP" --cache-dir "$W/c1"
cp -r "$W/src" "$W/mnt/dir"
old umount "$W/mnt"
echo "revision-1 volume of $N files written by $OLD"
/usr/bin/time -f "upgrade: %e s wall" "$PY" -m cryptfs upgrade s3://upgrade-bench/v \
    --key-file "$W/k" --endpoint-url "$EP" --settle 0
/usr/bin/time -f "rotate: %e s wall" "$PY" -m cryptfs rotate s3://upgrade-bench/v \
    --key-file "$W/k" --to-key-file "$W/k2" --endpoint-url "$EP" --settle 0
"$PY" -m cryptfs mount s3://upgrade-bench/v "$W/mnt" --key-file "$W/k2" --endpoint-url "$EP" \
    --cache-dir "$W/c2"
diff -r "$W/src" "$W/mnt/dir" && echo "diff -r: identical after the upgrade and the rotation"
"$PY" -m cryptfs umount "$W/mnt"
