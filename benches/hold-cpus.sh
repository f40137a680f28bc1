#!/usr/bin/env bash
# Runs a command with every CPU kept busy by a SCHED_IDLE spinner, which any other runnable
# task preempts at once:
#
#   benches/hold-cpus.sh python3 benches/mirror-vs-qemu.py --part 2
#
# Why: on a virtual machine whose host is busy, a vCPU that goes idle halts, and waking it
# again (an interrupt for a socket or a disk) waits until the host runs it, tens to hundreds of
# microseconds, counted as steal time. Microsecond-scale request latencies then measure the
# host, not the software. Kept busy, the vCPUs never halt: a wakeup inside the VM is a
# reschedule on a running vCPU, as on a dedicated host or one with KVM halt polling. Measured
# on this machine kind with a busy host (fio, 4 KiB random writes, QD1, into `tapmirror
# serve`): 8 500 IOPS and 38% steal without, 52 000 IOPS and 7% steal with. The spinners take
# almost no CPU time from real work (SCHED_IDLE weighs 3 against a normal task's 1024), and
# every case in a run gets the same treatment.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
command -v chrt >/dev/null || { echo "missing chrt (util-linux)" >&2; exit 2; }
SPINNERS=()
cleanup() { [ ${#SPINNERS[@]} -eq 0 ] || kill "${SPINNERS[@]}" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq "$(nproc)"); do
    chrt --idle 0 sh -c 'while :; do :; done' &
    SPINNERS+=($!)
done
"$@"
