#!/usr/bin/env bash
# Memory of a served snapshot chain, by depth: `tapmirror serve` on a chain of empty 2040 GiB
# VHDs (the format's largest), and on a chain of empty 2 TiB qcow2 images beside `qemu-nbd` on
# the same qcow2 chain, each read once at both ends of the disk. Prints each server's resident
# memory at depths 1, 5 and 10, and what a layer costs (the slope from 1 to 10). A 30-deep
# chain is what sxm allows; users run hundreds of such disks on one host.
#
#   benches/chain-memory.sh
#
# Needs: cargo, qemu-img, qemu-io, qemu-nbd. Builds tapmirror in release mode.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-io qemu-nbd; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
TM="$ROOT/target/release/tapmirror"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sxm-chain.XXXXXX")
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

"$TM" image create vhd "$WORK/v0.vhd" 2040G
qemu-img create -q -f qcow2 "$WORK/q0.qcow2" 2T
for i in $(seq 1 9); do
    "$TM" image create vhd "$WORK/v$i.vhd" --parent "$WORK/v$((i - 1)).vhd"
    qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/q$((i - 1)).qcow2" "$WORK/q$i.qcow2"
done

# rss SERVER TOP: starts the server on TOP, reads 1 MiB at the start and near the end, prints
# its resident memory in KiB.
rss() {
    local sock="$WORK/s.sock"
    rm -f "$sock"
    case $1 in
        tapmirror) "$TM" serve "$2" --read-only --socket "$sock" >/dev/null 2>&1 & ;;
        qemu-nbd) qemu-nbd --read-only --persistent --shared=4 --socket "$sock" "$2" >/dev/null 2>&1 & ;;
    esac
    PID=$!
    for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.05; done
    qemu-io -r -f raw -c "read 0 1M" -c "read 1T 1M" "nbd+unix:///?socket=$sock" >/dev/null
    awk '/VmRSS/ {print $2}' "/proc/$PID/status"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
}

printf '%-28s %10s %10s %10s %14s\n' server "depth 1" "depth 5" "depth 10" "per layer"
row() {
    local name=$1 server=$2 prefix=$3 ext=$4
    local a b c
    a=$(rss "$server" "$WORK/${prefix}0.$ext")
    b=$(rss "$server" "$WORK/${prefix}4.$ext")
    c=$(rss "$server" "$WORK/${prefix}9.$ext")
    printf '%-28s %8s MB %8s MB %8s MB %11s MB\n' "$name" $((a / 1024)) $((b / 1024)) $((c / 1024)) \
        "$(awk -v a="$a" -v c="$c" 'BEGIN { printf "%.1f", (c - a) / 9 / 1024 }')"
}
row "tapmirror, VHD 2040 GiB" tapmirror v vhd
row "tapmirror, qcow2 2 TiB" tapmirror q qcow2
row "qemu-nbd, qcow2 2 TiB" qemu-nbd q qcow2
