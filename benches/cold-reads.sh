#!/usr/bin/env bash
# Random 4 KiB reads the page cache does not hold, through `tapmirror serve` and `qemu-nbd`
# side by side in one run: a raw file on a disk file system, its cached pages dropped before
# each job (`dd iflag=nocache`, no root needed), fio over NBD at queue depth 1 and 8. Such
# reads complete through io_uring's task_work, which no eventfd announces; before the reaper
# waited on the ring's own fd they waited for its timed sweep (34 reads/s at QD1 here). Prints
# each figure and the ratio tapmirror/qemu-nbd, and each server's context switches per read
# (every thread's, from /proc), a count a noisy host does not move as it moves times.
#
#   benches/cold-reads.sh [SIZE_MIB] [SECONDS_PER_JOB] [ROUNDS]
#
# Put TMPDIR on a disk file system (not tmpfs, whose pages cannot be dropped); /var/tmp is the
# default. Needs: cargo, fio, qemu-nbd, python3, GNU dd. Builds tapmirror in release mode.
set -euo pipefail

SIZE_MIB=${1:-512}
SECS=${2:-4}
ROUNDS=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
TM="$ROOT/target/release/tapmirror"

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/sxm-cold.XXXXXX")
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
if [ "$(stat -f -c %T "$WORK")" = tmpfs ]; then
    echo "$WORK is on tmpfs: its pages cannot be dropped; set TMPDIR to a disk file system" >&2
    exit 2
fi
IMG="$WORK/disk.raw"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$IMG"
sync

start() { # $1 = tapmirror | qemu-nbd
    rm -f "$WORK/nbd.sock"
    if [ "$1" = tapmirror ]; then
        "$TM" serve "$IMG" --socket "$WORK/nbd.sock" >/dev/null 2>&1 &
    else
        qemu-nbd -f raw -t -e 8 --cache=writeback --aio=io_uring -k "$WORK/nbd.sock" "$IMG" 2>/dev/null &
    fi
    PID=$!
    for _ in $(seq 100); do [ -S "$WORK/nbd.sock" ] && return; sleep 0.05; done
    echo "$1 did not start" >&2; exit 1
}
stop() { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=""; }
switches() { cat /proc/"$PID"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }

job() { # $1 = iodepth; prints IOPS, mean latency (us) and the server's context switches per read
    dd if="$IMG" iflag=nocache count=0 status=none
    local before out
    before=$(switches)
    out=$(fio --name=cold --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/nbd.sock" --rw=randread --bs=4k \
        --randrepeat=0 --size="${SIZE_MIB}M" --time_based --runtime="$SECS" --iodepth="$1" --output-format=json 2>/dev/null \
        | sed -n '/^{/,$p')
    python3 -c '
import json, sys
r = json.loads(sys.argv[3])["jobs"][0]["read"]
print("%.0f %.1f %.2f" % (r["iops"], r["clat_ns"]["mean"] / 1000, (int(sys.argv[2]) - int(sys.argv[1])) / max(r["total_ios"], 1)))' \
        "$before" "$(switches)" "$out"
}

for qd in 1 8; do
    for round in $(seq "$ROUNDS"); do
        declare -A iops=() mean=() csw=()
        order="tapmirror qemu-nbd"
        [ $((round % 2)) = 0 ] && order="qemu-nbd tapmirror"
        for server in $order; do
            start "$server"
            read -r iops[$server] mean[$server] csw[$server] < <(job "$qd")
            stop
        done
        python3 -c "import sys; t, q = float(sys.argv[1]), float(sys.argv[2]); print('QD%s round %s: tapmirror %.0f IOPS (mean %s us, %s switches/read), qemu-nbd %.0f IOPS (mean %s us, %s switches/read), ratio %.2f' % (sys.argv[3], sys.argv[4], t, sys.argv[5], sys.argv[7], q, sys.argv[6], sys.argv[8], t / q if q else 0))" \
            "${iops[tapmirror]}" "${iops[qemu-nbd]}" "$qd" "$round" "${mean[tapmirror]}" "${mean[qemu-nbd]}" "${csw[tapmirror]}" "${csw[qemu-nbd]}"
    done
done
