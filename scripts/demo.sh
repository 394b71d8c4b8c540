#!/usr/bin/env bash
# Start a local SeaweedFS (loopback only), create an encrypted volume, mount it at .demo/mnt.
set -euo pipefail
cd "$(dirname "$0")/.."
D="$PWD/.demo"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret-key
S3PORT=${CRYPTFS_DEMO_PORT:-18333}
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3PORT"

stop() {
  if mountpoint -q "$D/mnt" 2>/dev/null; then cryptfs umount "$D/mnt" || fusermount3 -uz "$D/mnt"; fi
  if [ -f "$D/weed.pid" ]; then
    pid=$(cat "$D/weed.pid")
    kill "$pid" 2>/dev/null || true
    # weed mini can take a while to stop; do not leave it behind
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$D/weed.pid"
  fi
  echo "demo stopped (data kept in $D; rm -rf $D to forget it)"
}

start() {
  mkdir -p "$D/weed" "$D/mnt"
  if ! [ -f "$D/weed.pid" ] || ! kill -0 "$(cat "$D/weed.pid")" 2>/dev/null; then
    p=$S3PORT
    weed mini -dir="$D/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port=$p \
      -s3.port.grpc=$((p+1)) -master.port=$((p+2)) -master.port.grpc=$((p+3)) \
      -filer.port=$((p+4)) -filer.port.grpc=$((p+5)) -volume.port=$((p+6)) \
      -volume.port.grpc=$((p+7)) -admin.port=$((p+8)) -admin.port.grpc=$((p+9)) \
      -debug.port=$((p+10)) -admin.ui=false -webdav=false -master.telemetry=false \
      -bucket=demo >"$D/weed.log" 2>&1 &
    echo $! >"$D/weed.pid"
    for _ in $(seq 1 100); do
      python3 -c "import socket; socket.create_connection(('127.0.0.1', $p), 1)" 2>/dev/null && break
      sleep 0.3
    done
    sleep 2
  fi
  if ! [ -f "$D/volume.key" ]; then
    for _ in $(seq 1 20); do
      cryptfs init s3://demo/vol --key-file "$D/volume.key" && break
      rm -f "$D/volume.key"; sleep 1
    done
  fi
  mountpoint -q "$D/mnt" || cryptfs mount s3://demo/vol "$D/mnt" --key-file "$D/volume.key" --cache-dir "$D/cache"
  cat <<MSG

cryptfs demo is running.
  mount point : $D/mnt      (try: cp -a /etc $D/mnt/ && ls -l $D/mnt/etc)
  key file    : $D/volume.key (mode 0600)
  S3 endpoint : $AWS_ENDPOINT_URL (bucket 'demo', SeaweedFS log $D/weed.log)
  daemon log  : $D/cache/cryptfs.log
Stop with: make demo-stop
MSG
}

"${1:-start}"
