#!/usr/bin/env bash
# Is this machine quiet enough to benchmark? fio writes 4 KiB at random places, one at a time,
# for 3 s into a `tapmirror serve` of a file on tmpfs, and the script prints the mean and p99
# latency and a verdict. On this machine kind a quiet host gives about 10 µs mean and 70 000+
# IOPS; a busy one 70-300 µs (see benches/README.md, "When the machine is noisy"). Exits 0
# when quiet (mean under 25 µs), 1 when not. Needs cargo, fio, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v fio >/dev/null || { echo "missing fio" >&2; exit 2; }
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
DIR=$(mktemp -d "${SHM:-/dev/shm}/sxm-quiet.XXXXXX")
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
truncate -s 256M "$DIR/disk.raw"
"$ROOT/target/release/tapmirror" serve "$DIR/disk.raw" --socket "$DIR/nbd.sock" >/dev/null 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$DIR/nbd.sock" ] && break; sleep 0.05; done
fio --name=probe --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/nbd.sock" --rw=randwrite --bs=4k \
    --size=256M --time_based --runtime=3 --iodepth=1 --output-format=json 2>/dev/null \
    | sed -n '/^{/,$p' | python3 -c '
import json, sys
w = json.load(sys.stdin)["jobs"][0]["write"]
mean, p99 = w["clat_ns"]["mean"] / 1000, w["clat_ns"]["percentile"]["99.000000"] / 1000
quiet = mean < 25
verdict = "quiet" if quiet else "busy host, timing figures will not mean much"
print("QD1 4 KiB writes into tapmirror serve: %.0f IOPS, mean %.1f us, p99 %.1f us: %s" % (w["iops"], mean, p99, verdict))
sys.exit(0 if quiet else 1)'
