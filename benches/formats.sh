#!/usr/bin/env bash
# Image formats side by side, in one run:
#   1. raw, VHD (dynamic) and qcow2 holding the same data, each served by `tapmirror serve` and
#      by `qemu-nbd` (which reads all three), driven the same way with fio; and QD1 random
#      writes into fresh images of each, and into a fresh VHD differencing leaf;
#   2. read cost against chain depth (1, 4, 16): VHD differencing chains (tapmirror only: qemu
#      cannot open differencing VHDs) and qcow2 overlay chains (both servers).
# Prints each figure and the ratios tapmirror/qemu-nbd and format/raw.
#
#   benches/formats.sh [SIZE_MIB] [SECONDS_PER_JOB] [ROUNDS]
#
# Needs: cargo, fio, qemu-img, qemu-nbd, python3. Builds tapmirror in release mode.
set -euo pipefail

SIZE_MIB=${1:-512}
SECS=${2:-4}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in fio qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
TM="$ROOT/target/release/tapmirror"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sxm-formats.XXXXXX")
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
SOCK="$WORK/nbd.sock"
URI="nbd+unix:///?socket=$SOCK"
RESULTS="$WORK/results.txt"
: >"$RESULTS"

# The base content: random data in every other 2 MiB block (half allocated, like a used disk).
python3 - "$WORK/base.raw" "$SIZE_MIB" <<'EOF'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for block in range(0, mib // 2, 2):
        f.seek(block << 21)
        f.write(os.urandom(2 << 20))
EOF

serve() { # SERVER FILE QEMU_FORMAT
    rm -f "$SOCK"
    case "$1" in
    tapmirror) "$TM" serve "$2" --socket "$SOCK" >/dev/null 2>>"$WORK/server.log" & ;;
    qemu-nbd) qemu-nbd -f "$3" -t -e 8 --cache=writeback --discard=unmap -k "$SOCK" "$2" 2>>"$WORK/server.log" & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && return; sleep 0.05; done
    echo "$1 did not start on $2" >&2; cat "$WORK/server.log" >&2; exit 1
}
unserve() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

fio_job() { # RW BS QD -> "iops bw_bytes"
    fio --name=job --ioengine=nbd --uri="$URI" --rw="$1" --bs="$2" --iodepth="$3" \
        --size="${SIZE_MIB}M" --time_based --runtime="$SECS" --ramp_time=1 \
        --output-format=json 2>/dev/null | python3 -c '
import json, sys
raw = sys.stdin.read()
j = json.loads(raw[raw.index("{"):])["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
print("%.0f %.0f" % (d["iops"], d["bw_bytes"]))'
}

record() { echo "$1 $2 $3" >>"$RESULTS"; }

# Part 1: one image per format, each server in turn on a fresh copy (writes change it).
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$WORK/base.raw" "$WORK/base.vhd"
qemu-img convert -f raw -O qcow2 "$WORK/base.raw" "$WORK/base.qcow2"
# Rounds alternate the servers; each figure is the median over rounds. Writes into sparse
# regions vary a lot on a small VM (writeback of the copy competes), hence the sync and rounds.
for _ in $(seq "$ROUNDS"); do
for fmt in raw vhd qcow2; do
    qfmt=$fmt; [ "$fmt" = vhd ] && qfmt=vpc
    for server in tapmirror qemu-nbd; do
        cp --sparse=always "$WORK/base.$fmt" "$WORK/run.$fmt"
        sync
        serve "$server" "$WORK/run.$fmt" "$qfmt"
        read -r iops _ < <(fio_job randread 4k 16);  record "$server" "$fmt-randread-4k-qd16-iops" "$iops"
        read -r _ bw < <(fio_job read 1M 8);          record "$server" "$fmt-seqread-1m-Bps" "$bw"
        read -r iops _ < <(fio_job randwrite 4k 16); record "$server" "$fmt-randwrite-4k-qd16-iops" "$iops"
        read -r _ bw < <(fio_job write 1M 8);         record "$server" "$fmt-seqwrite-1m-Bps" "$bw"
        unserve
        echo "$fmt: $server done" >&2
    done
done
done

# Part 1b: QD1 4 KiB random writes into a fresh image, where every write lands in sectors the
# image does not hold yet and its metadata must change: an empty image of each format, and a VHD
# differencing leaf on the base (a VDI's new leaf right after a snapshot; tapmirror only, as
# qemu cannot open differencing VHDs).
for _ in $(seq "$ROUNDS"); do
for fmt in raw vhd qcow2 vhdleaf; do
    qfmt=$fmt; [ "$fmt" = vhd ] && qfmt=vpc
    servers=(tapmirror); [ "$fmt" != vhdleaf ] && servers+=(qemu-nbd)
    for server in "${servers[@]}"; do
        rm -f "$WORK/fresh.img"
        if [ "$fmt" = vhdleaf ]; then
            "$TM" image create vhd "$WORK/fresh.img" --parent "$WORK/base.vhd" 2>>"$WORK/server.log"
        else
            "$TM" image create "$fmt" "$WORK/fresh.img" "${SIZE_MIB}M" 2>>"$WORK/server.log"
        fi
        serve "$server" "$WORK/fresh.img" "$qfmt"
        read -r iops _ < <(fio_job randwrite 4k 1); record "$server" "$fmt-fresh-randwrite-4k-qd1-iops" "$iops"
        unserve
    done
done
echo "fresh images done" >&2
done

# Part 2: chains. Layer i (i = 1..depth) holds 1 MiB of new data every 16 MiB, at an offset that
# moves with i, so reads are spread over every layer.
write_layer() { # FILE QEMU_FORMAT LAYER (through tapmirror for VHD, qemu-io for qcow2)
    local cmds=() off
    for ((off = $3 << 20; off < SIZE_MIB << 20; off += 16 << 20)); do
        cmds+=(-c "write -P $(($3 % 250 + 1)) $off 1M")
    done
    if [ "$2" = vpc ]; then
        serve tapmirror "$1" vpc
        qemu-io -f raw "${cmds[@]}" "$URI" >/dev/null
        unserve
    else
        qemu-io -f qcow2 "${cmds[@]}" "$1" >/dev/null
    fi
}
for depth in 1 4 16; do
    for fmt in vhd qcow2; do
        qfmt=$fmt; [ "$fmt" = vhd ] && qfmt=vpc
        top="$WORK/base.$fmt"
        cp --sparse=always "$top" "$WORK/chain0.$fmt"; top="$WORK/chain0.$fmt"
        for ((i = 1; i <= depth; i++)); do
            "$TM" image create "$fmt" "$WORK/chain$i.$fmt" --parent "$top" 2>>"$WORK/server.log"
            top="$WORK/chain$i.$fmt"
            write_layer "$top" "$qfmt" "$i"
        done
        servers=(tapmirror); [ "$fmt" = qcow2 ] && servers+=(qemu-nbd)
        for server in "${servers[@]}"; do
            serve "$server" "$top" "$qfmt"
            read -r iops _ < <(fio_job randread 4k 16); record "$server" "$fmt-depth$depth-randread-4k-qd16-iops" "$iops"
            read -r _ bw < <(fio_job read 1M 8);         record "$server" "$fmt-depth$depth-seqread-1m-Bps" "$bw"
            unserve
        done
        rm -f "$WORK"/chain*."$fmt"
        echo "chain depth $depth ($fmt) done" >&2
    done
done

python3 - "$RESULTS" "$SIZE_MIB" "$SECS" <<'EOF'
import sys
import statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
samples = {}
for s, n, x in rows:
    samples.setdefault((s, n), []).append(float(x))
v = {k: statistics.median(xs) for k, xs in samples.items()}
names = []
for _, n, _ in rows:
    if n not in names:
        names.append(n)
def show(n, x):
    return f"{x / 1e6:12.1f}" if n.endswith("Bps") else f"{x:12.0f}"
print(f"image {sys.argv[2]} MiB (half allocated), {sys.argv[3]} s per fio job; MB/s or IOPS; medians")
print(f"{'figure':36} {'tapmirror':>12} {'qemu-nbd':>12} {'tm/qemu':>8} {'tm/tm-raw':>9}")
for n in names:
    a, b = v.get(("tapmirror", n)), v.get(("qemu-nbd", n))
    fmt, rest = n.split("-", 1)
    if rest.startswith("depth"):
        rest = rest.split("-", 1)[1]
    raw = v.get(("tapmirror", "raw-" + rest))
    cols = [show(n, a) if a else f"{'-':>12}", show(n, b) if b else f"{'-':>12}",
            f"{a / b:8.2f}" if a and b else f"{'-':>8}", f"{a / raw:9.2f}" if a and raw else f"{'-':>9}"]
    print(f"{n:36} " + " ".join(cols))
EOF
