#!/usr/bin/env python3
"""A VM of four disks moved live as one job (`sxm migrate`), with --parallel 1, 2 and 4.

Two hosts on this machine (`ext` SRs), four 1 GiB VDIs (50% random data, 10% zero blocks, 40%
holes each), each attached as a guest's disk; a guest (fio, nbd engine) writes 4 KiB randomly
at 500/s on each disk throughout. For each --parallel: the job's wall time from start to done
(in sync, switched over, attached on the destination) and the data bytes per second it moved.
Prints one JSON line per run, then a table.

Usage: benches/migrate-job.py [--disk-mib 1024] [--disks 4] [--parallel 1,2,4]
Needs target/release/{sxm,tapmirror} (`cargo build --release`), fio, python3.
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from importlib import import_module  # noqa: E402

live = import_module("migrate-live")


def run(a, work, parallel):
    hosts = [live.start_host(os.path.join(work, n)) for n in ("a", "b")]
    (_, _, sock_a, _), (_, tcp_b, sock_b, secret_b) = hosts
    guests = []
    try:
        sr_a = live.cli(sock_a, "sr", "create", "--type", "ext", "--name", "a")
        sr_b = live.cli(sock_b, "sr", "create", "--type", "ext", "--name", "b")
        vdis, allocated = [], 0
        for i in range(a.disks):
            image = os.path.join(work, f"disk{i}.raw")
            allocated += live.make_image(image, a.disk_mib)
            vdis.append(json.loads(live.cli(sock_a, "--json", "vdi", "import", "--sr", sr_a, image))["vdi"])
            os.remove(image)
        subprocess.run(["sync"])
        for i, vdi in enumerate(vdis):
            uri = live.cli(sock_a, "vdi", "attach", "--sr", sr_a, "--vdi", vdi)
            guests.append(live.fio(uri, 500))
        time.sleep(1)
        args = ["migrate", "--sr", sr_a, "--dest", f"{tcp_b}?session_id={secret_b}", "--dest-sr", sr_b,
                "--parallel", str(parallel), "--hold"]
        for v in vdis:
            args += ["--vdi", v]
        t0 = time.monotonic()
        job = live.cli(sock_a, *args)
        while True:
            t = json.loads(live.cli(sock_a, "--json", "task", "stat", job))
            if t["debug_info"].get("stage") == "holding":
                break
            if t["state"][0] != "Pending":
                sys.exit(f"the job ended early: {t}")
            time.sleep(0.05)
        t1 = time.monotonic()
        for g in guests:  # the VM pauses
            g.send_signal(signal.SIGINT)
            g.communicate()
        live.cli(sock_a, "migrate", "cutover", job)
        while json.loads(live.cli(sock_a, "--json", "task", "stat", job))["state"][0] == "Pending":
            time.sleep(0.05)
        t2 = time.monotonic()
        t = json.loads(live.cli(sock_a, "--json", "task", "stat", job))
        assert t["state"][0] == "Completed", t
        return {"parallel": parallel, "disks": a.disks, "disk_mib": a.disk_mib, "allocated_mib": allocated >> 20,
                "to_in_sync_s": round(t1 - t0, 2), "cutover_s": round(t2 - t1, 2),
                "mib_per_s": round((allocated >> 20) / (t1 - t0), 1)}
    finally:
        for g in guests:
            if g.poll() is None:
                g.kill()
        for p, *_ in hosts:
            p.terminate()
            p.wait()
        subprocess.run(["pkill", "-f", f"{work}/"], check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--parallel", default="1,2,4")
    a = ap.parse_args()
    results = []
    for n in [int(x) for x in a.parallel.split(",")]:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
            r = run(a, work, n)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(f"\n{a.disks} disks of {a.disk_mib} MiB ({results[0]['allocated_mib']} MiB allocated in all), guests writing 4 KiB at 500/s each")
    print(f"{'parallel':>8} {'start to in sync (s)':>21} {'cutover (s)':>12} {'MiB/s':>8}")
    for r in results:
        print(f"{r['parallel']:>8} {r['to_in_sync_s']:>21} {r['cutover_s']:>12} {r['mib_per_s']:>8}")


if __name__ == "__main__":
    main()
