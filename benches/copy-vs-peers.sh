#!/usr/bin/env bash
# Sparse copy into an NBD target, side by side in one run:
#   tapmirror copy   vs   qemu-img convert -n -W -m 16   vs   nbdcopy
# each into a fresh qemu-nbd target (raw, --discard=unmap), timed until the target is durable
# (nbdcopy gets --flush; the others flush by themselves), with the CPU seconds of the tool and
# of the target server. Then tapmirror copy into a `tapmirror serve` target.
#
#   benches/copy-vs-peers.sh [SIZE_MIB] [ROUNDS]
#
# The image is the peers' test image (../shared/research/peers-measured.md): 2 MiB blocks,
# 50% random data, 10% allocated zeroes, 40% holes. Throughput counts allocated bytes (data
# and allocated zeroes) per second. Needs cargo, qemu-img, qemu-nbd, nbdcopy, python3.
set -euo pipefail

SIZE_MIB=${1:-4096}
ROUNDS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-nbd nbdcopy python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
cargo build --release -q -p tapmirror --manifest-path "$ROOT/Cargo.toml"
TM="$ROOT/target/release/tapmirror"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sxm-copy.XXXXXX")
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
SOCK="$WORK/t.sock"
URI="nbd+unix:///?socket=$SOCK"

ALLOCATED=$(python3 - "$WORK/src.raw" "$SIZE_MIB" <<'EOF'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
allocated = 0
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for block in range(mib // 2):
        kind = block % 10
        if kind >= 6:
            continue                      # 40% holes
        f.seek(block << 21)
        f.write(os.urandom(2 << 20) if kind < 5 else bytes(2 << 20))   # 50% data, 10% zeroes
        allocated += 2 << 20
print(allocated)
EOF
)
sync

cpu_of() { # PID -> user+system seconds so far
    python3 -c "
import os, sys
f = open('/proc/$1/stat').read().rsplit(')', 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))"
}

start_target() { # SERVER
    rm -f "$SOCK" "$WORK/dst.raw"
    truncate -s "${SIZE_MIB}M" "$WORK/dst.raw"
    case "$1" in
    qemu-nbd) qemu-nbd -f raw -t -e 8 --cache=writeback --discard=unmap -k "$SOCK" "$WORK/dst.raw" & ;;
    tapmirror) "$TM" serve "$WORK/dst.raw" --socket "$SOCK" >/dev/null 2>&1 & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && return; sleep 0.05; done
    echo "target did not start" >&2; exit 1
}
stop_target() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

RESULTS="$WORK/results.txt"
: >"$RESULTS"
run() { # NAME TARGET COMMAND...
    local name=$1 target=$2; shift 2
    start_target "$target"
    local s0 t0 t1 s1
    s0=$(cpu_of "$SERVER_PID")
    t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "$WORK/time.txt" "$@" >/dev/null 2>"$WORK/tool.log" || { cat "$WORK/tool.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    s1=$(cpu_of "$SERVER_PID")
    read -r u s <"$WORK/time.txt"
    cmp -s "$WORK/src.raw" "$WORK/dst.raw" || { echo "$name: target differs from source" >&2; exit 1; }
    stop_target
    echo "$name $(python3 -c "print($t1 - $t0, $u + $s, $s1 - $s0)")" >>"$RESULTS"
    echo "$name done" >&2
}

for _ in $(seq "$ROUNDS"); do
    run "tapmirror-copy" qemu-nbd "$TM" copy "$WORK/src.raw" "$URI"
    run "tapmirror-copy--target-is-zero" qemu-nbd "$TM" copy --target-is-zero "$WORK/src.raw" "$URI"
    run "qemu-img-convert-W-m16" qemu-nbd qemu-img convert -n -W -m 16 -f raw -O raw "$WORK/src.raw" "$URI"
    run "qemu-img-convert--target-is-zero" qemu-nbd qemu-img convert -n -W -m 16 --target-is-zero -f raw -O raw "$WORK/src.raw" "$URI"
    run "nbdcopy--flush" qemu-nbd nbdcopy --flush "$WORK/src.raw" "$URI"
    run "nbdcopy--flush--destination-is-zero" qemu-nbd nbdcopy --flush --destination-is-zero "$WORK/src.raw" "$URI"
    run "tapmirror-copy-into-tapmirror-serve" tapmirror "$TM" copy --target-is-zero "$WORK/src.raw" "$URI"
done

python3 - "$RESULTS" "$ALLOCATED" "$SIZE_MIB" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
alloc = int(sys.argv[2])
by = {}
for name, wall, tool, server in rows:
    by.setdefault(name, []).append((float(wall), float(tool), float(server)))
med = {n: tuple(statistics.median(v[i] for v in vs) for i in range(3)) for n, vs in by.items()}
print(f"image {sys.argv[3]} MiB, {alloc / 1e9:.2f} GB allocated; into qemu-nbd unless named; medians")
print(f"{'tool':40} {'wall s':>7} {'GB/s':>6} {'tool CPU s':>10} {'target CPU s':>12}")
for n, (w, t, s) in med.items():
    print(f"{n:40} {w:7.2f} {alloc / w / 1e9:6.2f} {t:10.2f} {s:12.2f}")
peers = [n for n in med if not n.startswith("tapmirror")]
best = min(peers, key=lambda n: med[n][0])
ours = min((n for n in med if n.startswith("tapmirror-copy") and "into" not in n), key=lambda n: med[n][0])
print(f"best peer: {best}; ours: {ours}")
print(f"throughput ratio (ours / best peer): {med[best][0] / med[ours][0]:.2f}   (bar: >= 1.3)")
print(f"tool CPU ratio (ours / best peer):   {med[ours][1] / max(med[best][1], 1e-9):.2f}   (bar: <= 1.0)")
into = med.get("tapmirror-copy-into-tapmirror-serve")
if into:
    print(f"into tapmirror serve: {alloc / into[0] / 1e9:.2f} GB/s   (bar: >= 2)")
EOF
