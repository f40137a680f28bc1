#!/usr/bin/env bash
# Serve one raw file with `tapmirror serve` and with `qemu-nbd`, drive both the same way in one
# run, and print each figure with the ratio tapmirror / qemu-nbd (higher is better for every
# figure printed).
#
#   benches/nbd-vs-qemu-nbd.sh [SIZE_MIB] [SECONDS_PER_JOB] [ROUNDS]
#
# Needs: cargo, fio (nbd engine), nbdcopy, qemu-nbd, python3. Builds tapmirror in release mode.
# Rounds alternate the two servers (A B A B ...) and each figure is the median over rounds, so
# slow drift of the machine hits both sides alike.
set -euo pipefail

SIZE_MIB=${1:-1024}
SECS=${2:-5}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

for tool in fio nbdcopy qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
TAPMIRROR="$ROOT/target/release/tapmirror"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sxm-bench.XXXXXX")
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

IMG="$WORK/disk.raw"
SOCK="$WORK/nbd.sock"
URI="nbd+unix:///?socket=$SOCK"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$IMG"
sync

start_server() {
    rm -f "$SOCK"
    case "$1" in
    tapmirror) "$TAPMIRROR" serve "$IMG" --socket "$SOCK" >/dev/null 2>"$WORK/server.log" & ;;
    # -e 8: allow several connections (nbdcopy uses 4); writeback cache and discard like ours.
    qemu-nbd) qemu-nbd -f raw -t -e 8 --cache=writeback --discard=unmap -k "$SOCK" "$IMG" 2>"$WORK/server.log" & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && return; sleep 0.05; done
    echo "$1 did not start" >&2; cat "$WORK/server.log" >&2; exit 1
}

stop_server() {
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
}

# fio JOB-NAME RW BS IODEPTH -> prints "iops bw_bytes p99_us" of the job's main direction.
fio_job() {
    local rw=$2 bs=$3 qd=$4
    fio --name="$1" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size="${SIZE_MIB}M" --time_based --runtime="$SECS" --ramp_time=1 \
        --output-format=json 2>/dev/null | python3 -c '
import json, sys
raw = sys.stdin.read()
j = json.loads(raw[raw.index("{"):])["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
p99 = d.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
print("%.0f %.0f %.0f" % (d["iops"], d["bw_bytes"], p99))'
}

nbdcopy_out() {
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "$URI" null:
    t1=$(date +%s.%N)
    python3 -c "print(f'{($SIZE_MIB << 20) / ($t1 - $t0):.0f}')"
}

RESULTS="$WORK/results.txt"
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
    for server in tapmirror qemu-nbd; do
        start_server "$server"
        read -r iops _ p99 < <(fio_job qd1 randwrite 4k 1);   echo "$server randwrite-4k-qd1-iops $iops" >>"$RESULTS"
        echo "$server randwrite-4k-qd1-p99-inverse $(python3 -c "print(1e6/max($p99,1))")" >>"$RESULTS"
        read -r iops _ _ < <(fio_job qd16 randwrite 4k 16);   echo "$server randwrite-4k-qd16-iops $iops" >>"$RESULTS"
        read -r iops _ _ < <(fio_job rr randread 4k 16);      echo "$server randread-4k-qd16-iops $iops" >>"$RESULTS"
        read -r _ bw _ < <(fio_job sr read 1M 8);             echo "$server seqread-1m-qd8-Bps $bw" >>"$RESULTS"
        read -r _ bw _ < <(fio_job sw write 1M 8);            echo "$server seqwrite-1m-qd8-Bps $bw" >>"$RESULTS"
        echo "$server nbdcopy-out-Bps $(nbdcopy_out)" >>"$RESULTS"
        stop_server
        echo "round $round: $server done" >&2
    done
done

python3 - "$RESULTS" "$SIZE_MIB" "$SECS" "$ROUNDS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
figs = {}
for server, name, value in rows:
    figs.setdefault(name, {}).setdefault(server, []).append(float(value))
print(f"image {sys.argv[2]} MiB, {sys.argv[3]} s per fio job, median of {sys.argv[4]} alternating rounds")
print(f"{'figure':34} {'tapmirror':>14} {'qemu-nbd':>14} {'ratio':>7}")
worst = None
for name, by in figs.items():
    a, b = statistics.median(by["tapmirror"]), statistics.median(by["qemu-nbd"])
    ratio = a / b if b else float("nan")
    worst = ratio if worst is None else min(worst, ratio)
    if name.endswith("Bps"):
        label, a, b = name.replace("-Bps", " (MB/s)"), a / 1e6, b / 1e6
    elif "inverse" in name:
        # Reported as 1/p99 so that higher is better like every other figure.
        label = "randwrite-4k-qd1 1/p99 (1/ms)"
    else:
        label = name
    print(f"{label:34} {a:>14.1f} {b:>14.1f} {ratio:>7.2f}")
print(f"lowest ratio: {worst:.2f}")
EOF
