#!/usr/bin/env python3
"""Live mirroring, side by side in one run: tapmirror against qemu-storage-daemon.

1. Guest 4 KiB random writes at queue depth 1 (fio, nbd engine): no mirror, tapmirror's sync
   mirror, qemu-storage-daemon without a mirror and with blockdev-mirror in write-blocking mode
   (after READY). Every mirror target is a qemu-nbd export of a raw file; tapmirror's sync
   mirror also runs into a `tapmirror serve` target, the one sxm's destination host runs.
   Besides latency, each case prints the CPU time and context switches per write of the guest
   and of every server in it: counts, which a noisy host moves far less than times.
2. Full mirror under a steady guest (fio: 2000 4 KiB and 200 64 KiB random writes per second):
   time to ready and bytes sent, for tapmirror's full mirror (into qemu-nbd, into a zeroed
   `tapmirror serve`, and into qemu-nbd unpaced while the guest writes, `--busy-rate 0`) and
   QEMU's background and write-blocking modes. Also the guest's p99 write latency over the
   writes completed while the copy ran, against its own p99 in the seconds before the mirror
   started and after it was gone, pooled (the same fio process, so that drift between cases,
   and within one, stays out of the ratio); the worst guest write in the mirror's first
   200 ms and in its last 200 ms before ready (the switch-over); and the p99 ratio over the
   copy's first three quarters and over its last quarter apart. A control row runs the same
   guest over the same windows with no mirror, so the host's and the kernel's own share of a
   ratio shows.

    benches/mirror-vs-qemu.py [--size-mib N] [--seconds S] [--part 1|2|all] [--rounds N]

With --rounds N, part 1 runs its five cases N times, every other round in reverse order, and
prints the median (and range) of the ratios taken within each round: on a host whose speed
drifts, cases a few seconds apart compare better than one case against another run's.

Needs cargo, fio, qemu-nbd, qemu-storage-daemon. Prints each figure and the ratios.
"""
import argparse, json, os, resource, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def wait_socket(path, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path}")


class Qmp:
    def __init__(self, path):
        wait_socket(path)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.events = []
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        return json.loads(self.f.readline())

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            return m["return"]

    def wait_event(self, name, timeout=600):
        # Blocking reads: a read that timed out would leave the socket's file unusable. The job
        # emits status events as it goes, so the deadline is still checked now and then.
        end = time.time() + timeout
        while time.time() < end:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            m = self._read()
            if "event" in m:
                self.events.append(m)
        raise RuntimeError(f"no {name} event")


TICK = os.sysconf("SC_CLK_TCK")


def server_counts(pids):
    """CPU seconds (user + system, every thread, exited ones included) and context switches
    (the live threads') of the processes `pids` so far."""
    cpu, switches = 0.0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu, switches


def fio(uri, seconds, rate_iops=None, bs="4k", servers=()):
    """fio at queue depth 1 against `uri`. With `servers` (pids), also what the servers and fio
    spent per write, CPU and context switches: counts, which a noisy host does not move as it
    moves times."""
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", f"--bs={bs}",
            "--iodepth=1", "--time_based", f"--runtime={seconds}", "--size=100%",
            "--output-format=json"]
    if rate_iops:
        args.append(f"--rate_iops={rate_iops}")
    cpu0, sw0 = server_counts(servers)
    me0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = sh(*args).stdout
    me1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, sw1 = server_counts(servers)
    j = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    pct = j["clat_ns"]["percentile"]
    writes = max(j["total_ios"], 1)
    fio_cpu = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    fio_sw = (me1.ru_nvcsw + me1.ru_nivcsw) - (me0.ru_nvcsw + me0.ru_nivcsw)
    return {"iops": j["iops"], "mean_us": j["clat_ns"]["mean"] / 1000, "p99_us": pct["99.000000"] / 1000,
            "cpu_us": (cpu1 - cpu0 + fio_cpu) * 1e6 / writes, "switches": (sw1 - sw0 + fio_sw) / writes}


def steady_guest(uri, seconds, rate_iops, logs):
    """Starts the steady guest: `rate_iops` 4 KiB and a tenth as many 64 KiB random writes per
    second, at queue depth 1 each, logging every write's completion latency under `logs`.
    `finish(*windows)` waits for it and returns, for each window (wall-clock seconds, start and
    end), each job's figures over the writes completed within it."""
    args = ["fio", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--iodepth=1", "--time_based",
            f"--runtime={seconds}", "--size=100%", "--log_avg_msec=0", "--log_unix_epoch=1",
            "--output-format=json"]
    for job, bs, rate in (("small", "4k", rate_iops), ("large", "64k", max(rate_iops // 10, 1))):
        args += [f"--name={job}", f"--bs={bs}", f"--rate_iops={rate}", f"--write_lat_log={logs}-{job}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)

    def figures(logged, window):
        # A window is one (start, end) pair or a list of them, pooled.
        spans = window if isinstance(window, list) else [window]
        lat = sorted(ns / 1000 for t, ns in logged if any(a <= t <= b for a, b in spans))
        return {"p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
                "mean_us": sum(lat) / len(lat) if lat else float("nan"), "writes": len(lat),
                "max_us": lat[-1] if lat else float("nan")}

    def finish(*windows):
        p.terminate()  # fio writes its logs on the way out; nothing after the windows counts
        p.communicate()
        logged = {}
        for n, job in enumerate(("small", "large"), 1):
            logged[job] = [(int(t_ms) / 1000, int(ns)) for t_ms, ns in
                           (line.split(",")[:2] for line in open(f"{logs}-{job}_clat.{n}.log"))]
        return [{job: figures(logged[job], w) for job in logged} for w in windows]
    return finish


class Bench:
    def __init__(self, size_mib, seconds):
        self.size = size_mib << 20
        self.seconds = seconds
        self.dir = tempfile.mkdtemp(prefix="sxm-mirror.")
        self.procs = []
        self.files = []
        sh("cargo", "build", "--release", "-q", "-p", "tapmirror", "--manifest-path", f"{ROOT}/Cargo.toml")
        self.tm = f"{ROOT}/target/release/tapmirror"
        self.src = self.path("src.raw")
        with open(self.src, "wb") as f:  # half data, half holes
            f.truncate(self.size)
            for mib in range(0, size_mib, 2):
                f.seek(mib << 20)
                f.write(os.urandom(1 << 20))

    def path(self, name):
        return os.path.join(self.dir, name)

    def spawn(self, args, sock):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_socket(sock)
        return p

    def pids(self):
        return [p.pid for p in self.procs]

    def stop_all(self):
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        # Each case's images go with it: left behind, a few 4 GiB copies fill the page cache
        # and later cases measure memory reclaim instead of the data path.
        for f in self.files:
            os.remove(f)
        self.files = []

    def fresh(self, name, copy_src):
        p = self.path(name)
        self.files.append(p)
        if copy_src:
            sh("cp", "--sparse=always", self.src, p)  # shutil.copyfile would fill the holes
            os.sync()  # the copy's writeback must not land in the next measurement
        else:
            with open(p, "wb") as f:
                f.truncate(self.size)
        return p

    def target(self, name):
        sock = self.path(name + ".sock")
        self.spawn(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "--cache=writeback", "--discard=unmap",
                    "-k", sock, self.fresh(name + ".raw", False)], sock)
        return sock

    def tapmirror(self, name, copy_src=True):
        sock, ctl = self.path(name + ".sock"), self.path(name + ".ctl")
        self.spawn([self.tm, "serve", self.fresh(name + ".raw", copy_src), "--socket", sock, "--control", ctl], sock)
        wait_socket(ctl)
        return f"nbd+unix:///?socket={sock}", ctl

    def ctl(self, ctl, *args):
        return json.loads(sh(self.tm, "ctl", ctl, *args).stdout)

    def qsd(self, name, target_sock=None):
        qmp, sock = self.path(name + ".qmp"), self.path(name + ".sock")
        self.spawn(["qemu-storage-daemon",
                    "--blockdev", f"file,node-name=file0,filename={self.fresh(name + '.raw', True)},aio=threads,cache.direct=off",
                    "--blockdev", "raw,node-name=src,file=file0",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}",
                    "--export", "nbd,id=e0,node-name=src,writable=on",
                    "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
                    "--monitor", "chardev=qmp0"], sock)
        q = Qmp(qmp)
        if target_sock:
            q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
                  server={"type": "unix", "path": target_sock}, export="")
        return f"nbd+unix:///src?socket={sock}", q

    # Part 1 -----------------------------------------------------------------------------
    def qd1_latency(self, reverse=False):
        """One round of the five cases; `reverse` runs them in the opposite order, so that a
        host that drifts over a run of rounds biases no case."""
        def no_mirror():
            uri, _ = self.tapmirror("tm-off")
            return fio(uri, self.seconds, servers=self.pids())

        def sync_into_qemu_nbd():
            tgt = self.target("tm-tgt")
            uri, ctl = self.tapmirror("tm-sync")
            self.ctl(ctl, "mirror-attach", "--target", f"nbd+unix:///?socket={tgt}")
            r = fio(uri, self.seconds, servers=self.pids())
            assert self.ctl(ctl, "stats")["mirror"]["state"] == "ready"
            return r

        def sync_into_tapmirror():
            tgt_uri, _ = self.tapmirror("tm-tgt2")
            uri, ctl = self.tapmirror("tm-sync2")
            self.ctl(ctl, "mirror-attach", "--target", tgt_uri)
            r = fio(uri, self.seconds, servers=self.pids())
            assert self.ctl(ctl, "stats")["mirror"]["state"] == "ready"
            return r

        def qsd_no_mirror():
            uri, _ = self.qsd("qsd-off")
            return fio(uri, self.seconds, servers=self.pids())

        def qsd_write_blocking():
            tgt = self.target("qsd-tgt")
            uri, q = self.qsd("qsd-wb", tgt)
            q.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                        "copy-mode": "write-blocking"})
            q.wait_event("BLOCK_JOB_READY")
            return fio(uri, self.seconds, servers=self.pids())

        cases = [("tapmirror, no mirror", no_mirror), ("tapmirror, sync mirror", sync_into_qemu_nbd),
                 ("tapmirror, sync mirror into tapmirror", sync_into_tapmirror),
                 ("qemu-storage-daemon, no mirror", qsd_no_mirror),
                 ("qemu-storage-daemon, write-blocking mirror", qsd_write_blocking)]
        out = {}
        for name, run in (reversed(cases) if reverse else cases):
            try:
                out[name] = run()
            finally:
                self.stop_all()
        return {name: out[name] for name, _ in cases}

    # Part 2 -----------------------------------------------------------------------------
    def convergence(self, rate_iops):
        """Rows of (guest figures per job before the mirror starts, after it is gone, over both
        (the baseline), while it copies, in its first `STALL_WINDOW` seconds and its last, in
        its first three quarters and in its last (`quarters`), seconds to ready, bytes sent).
        Each case's guest runs unmirrored for `self.seconds` before the attach and again once
        the mirror is detached (tapmirror) or its job cancelled (QEMU), in the same fio process:
        a baseline on both sides of the copy it is set against, so that a machine whose speed
        drifts within a case, or from one case to the next (a VM on a busy host), still gives a
        fair ratio. A control row, "no mirror (control)", runs the same guest over the same
        windows without a mirror."""
        out = {}
        # Long enough for any copy to end within it (fio is stopped once the windows are over):
        # only writes completed while the copy ran count.
        guest_secs = self.seconds + 300

        def unmirrored():
            time.sleep(1)  # fio connects, or the mirror's end settles
            start = time.time()
            time.sleep(self.seconds)
            return start, time.time()

        def row(finish, before, t0, t1, after, sent):
            return (*finish(before, after, [before, after], (t0, t1), (t0, t0 + STALL_WINDOW),
                            (t1 - STALL_WINDOW, t1), *quarters(t0, t1)),
                    t1 - t0, sent)

        # Into qemu-nbd as QEMU's mirrors below; into a zeroed `tapmirror serve`, what sxm's
        # destination runs; and into qemu-nbd with the pass unpaced while the guest writes
        # (`--busy-rate 0`), which is what the default pacing saves the guest.
        for target, rate in (("qemu-nbd", None), ("tapmirror", None), ("qemu-nbd", "0")):
            if target == "qemu-nbd":
                tgt = f"nbd+unix:///?socket={self.target('conv-tm-tgt')}"
            else:
                tgt, _ = self.tapmirror("conv-tm-tgt", copy_src=False)
            uri, ctl = self.tapmirror("conv-tm")
            finish = steady_guest(uri, guest_secs, rate_iops, self.path("tm"))
            before = unmirrored()
            t0 = time.time()
            self.ctl(ctl, "mirror-attach", "--mode", "full", "--target-is-zero", "--target", tgt,
                     *(["--busy-rate", rate] if rate else []))
            while self.ctl(ctl, "stats")["mirror"]["state"] == "syncing":
                time.sleep(0.05)
            t1 = time.time()
            stats = self.ctl(ctl, "stats")["mirror"]
            sent = stats["progress"]["bytes_sent"] + stats["counters"]["bytes"]
            self.ctl(ctl, "mirror-detach")
            after = unmirrored()
            name = "tapmirror full mirror" + (" into tapmirror" if target == "tapmirror" else "") + (f", --busy-rate {rate}" if rate else "")
            out[name] = row(finish, before, t0, t1, after, sent)
            self.stop_all()

        # The control: the same guest with no mirror at all, over windows as long as the first
        # copy's. Its ratio is what the host and the kernel do to the guest by themselves, such
        # as the writeback of the guest's own writes once they are 30 s old
        # (`vm.dirty_expire_centisecs`), which a copy's window holds and a short baseline does not.
        span = next(iter(out.values()))[-2]
        uri, _ = self.tapmirror("conv-control")
        finish = steady_guest(uri, guest_secs, rate_iops, self.path("control"))
        before = unmirrored()
        t0 = time.time()
        time.sleep(span)
        t1 = time.time()
        after = unmirrored()
        out["no mirror (control)"] = row(finish, before, t0, t1, after, 0)
        self.stop_all()

        for mode in ("background", "write-blocking"):
            tgt = self.target(f"conv-{mode}-tgt")
            uri, q = self.qsd(f"conv-{mode}", tgt)
            finish = steady_guest(uri, guest_secs, rate_iops, self.path(mode))
            before = unmirrored()
            t0 = time.time()
            q.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                        "copy-mode": mode})
            e = q.wait_event("BLOCK_JOB_READY")
            t1 = time.time()
            # Cancelled once ready, a mirror job ends without switching to the target.
            q.cmd("block-job-cancel", device="m0")
            q.wait_event("BLOCK_JOB_COMPLETED")
            after = unmirrored()
            out[f"qemu {mode} mirror"] = row(finish, before, t0, t1, after, e["data"]["offset"])
            self.stop_all()
        return out


def quarters(t0, t1):
    """The copy's first three quarters and its last: tapmirror's pass spends its last quarter or
    so on the sweeps after the first, which copy the guest's own deferred writes as small
    requests, and ends with the ready flush; the guest's slowest writes have gathered there
    (benches/README.md)."""
    split = t0 + (t1 - t0) * 0.75
    return (t0, split), (split, t1)


# The worst guest write in this long after the mirror starts, and in as long before it is seen
# ready, is reported apart: a stall at the attach or at the switch-over is a few writes, too few
# to move a p99, and the one a user sees.
STALL_WINDOW = 0.2


def report_latency(b, a):
    print(f"guest 4 KiB random writes, QD1, {a.seconds} s each; image {a.size_mib} MiB; {a.rounds} round(s), "
          "every other one in reverse order")
    ratios = {"into qemu-nbd": [], "into tapmirror": []}
    for i in range(a.rounds):
        lat = b.qd1_latency(reverse=i % 2 == 1)
        print(f"{'case' if a.rounds == 1 else f'round {i + 1}':45} {'IOPS':>8} {'mean us':>8} {'p99 us':>8} "
              f"{'CPU us/write':>12} {'switches/write':>14}")
        for n, r in lat.items():
            print(f"{n:45} {r['iops']:8.0f} {r['mean_us']:8.1f} {r['p99_us']:8.1f} {r['cpu_us']:12.1f} {r['switches']:14.2f}")
        off, qemu = lat["tapmirror, no mirror"], lat["qemu-storage-daemon, write-blocking mirror"]
        for name, r in (("into qemu-nbd", lat["tapmirror, sync mirror"]), ("into tapmirror", lat["tapmirror, sync mirror into tapmirror"])):
            ratios[name].append((r["mean_us"] / qemu["mean_us"], r["p99_us"] / qemu["p99_us"],
                                 r["mean_us"] / off["mean_us"], r["p99_us"] / off["p99_us"]))
    for name, rs in ratios.items():
        # Ratios within a round, whose cases ran a few seconds apart; over rounds, the median
        # and the range.
        med = [statistics.median(r[k] for r in rs) for k in range(4)]
        spread = "" if len(rs) == 1 else "  (range: " + ", ".join(
            f"{min(r[k] for r in rs):.2f}-{max(r[k] for r in rs):.2f}" for k in range(4)) + ")"
        print(f"sync mirror {name:15} vs qemu write-blocking: mean {med[0]:.2f}x, p99 {med[1]:.2f}x (bar: < 1);  "
              f"vs unmirrored: mean {med[2]:.2f}x, p99 {med[3]:.2f}x (bar: <= 1.5){spread}")
    if a.rounds > 1:
        print("(each ratio is the median over the rounds of the ratio within a round)")
    print("CPU us/write, switches/write: the guest's (fio's) and every server's of the case, over its writes; counts that")
    print("a noisy host moves far less than times (context switches of server threads that exited meanwhile are not counted)")


def report_convergence(b, a):
    conv = b.convergence(a.rate_iops)
    print(f"\nfull mirror under a steady guest ({a.rate_iops} x 4 KiB + {a.rate_iops // 10} x 64 KiB writes/s)")
    print(f"(p99 of the guest's writes in the {a.seconds} s before the mirror starts and the {a.seconds} s after it is gone, "
          "pooled -> of those completed between its start and ready)")
    print(f"{'case':38} {'ready s':>8} {'sent MB':>9} {'writes':>7} {'p99 4K us':>17} {'p99 64K us':>17} "
          f"{'p99 ratio':>9} {'bytes ratio':>11} {'attach max us':>13} {'ready max us':>12} {'first 3/4':>9} {'last 1/4':>8} "
          f"{'vs before':>9} {'drift':>6}")
    allocated = a.size_mib << 19  # half the image is data
    for name, (before, after, base, during, attach, switch, early, late, ready, sent) in conv.items():
        def ratio_of(w, against=base):
            return max(w[j]["p99_us"] / against[j]["p99_us"] for j in ("small", "large"))
        worst = ratio_of(during)
        # How far the unmirrored guest moved from before the copy to after it, either way.
        drift = max(max(after[j]["p99_us"] / before[j]["p99_us"], before[j]["p99_us"] / after[j]["p99_us"])
                    for j in ("small", "large"))
        # What the guest wrote while the mirror synced, from its own logs; QEMU's "sent" is
        # its job offset, which counts the holes it walks, so no ratio is given for it.
        written = during["small"]["writes"] * 4096 + during["large"]["writes"] * 65536
        ratio = f"{sent / (allocated + written):11.2f}" if name.startswith("tapmirror") else f"{'-':>11}"
        print(f"{name:38} {ready:8.2f} {sent / 1e6:9.1f} {during['small']['writes'] + during['large']['writes']:7} "
              f"{base['small']['p99_us']:8.1f}->{during['small']['p99_us']:7.1f} "
              f"{base['large']['p99_us']:8.1f}->{during['large']['p99_us']:7.1f} {worst:8.2f}x {ratio} "
              f"{max(attach[j]['max_us'] for j in ('small', 'large')):13.0f} "
              f"{max(switch[j]['max_us'] for j in ('small', 'large')):12.0f} {ratio_of(early):8.2f}x {ratio_of(late):7.2f}x "
              f"{ratio_of(during, before):8.2f}x {drift:5.2f}x")
    print("bars for tapmirror: p99 ratio (worse of the two sizes) <= 2; bytes ratio (sent / (allocated + "
          "guest bytes written while syncing)) <= 1.2")
    print(f"attach max, ready max: the worst guest write completed in the first {STALL_WINDOW * 1000:.0f} ms of the mirror, "
          f"and in the last {STALL_WINDOW * 1000:.0f} ms before the bench saw it ready (polled every 50 ms)")
    print("first 3/4, last 1/4: the p99 ratio over the writes completed in the copy's first three quarters, and in its last")
    print("vs before: the p99 ratio against the window before the mirror alone; drift: how far the unmirrored guest's p99 "
          "moved from that window to the one after (the worse size, either way)")
    print("no mirror (control): the same guest and windows with no mirror; its ratio is the host's and the kernel's share of the others'")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rate-iops", type=int, default=2000)
    ap.add_argument("--part", choices=("1", "2", "all"), default="all", help="QD1 latency (1), full mirror (2)")
    ap.add_argument("--rounds", type=int, default=1, help="part 1: rounds of all its cases (medians of the ratios within each)")
    a = ap.parse_args()
    b = Bench(a.size_mib, a.seconds)
    try:
        if a.part in ("1", "all"):
            report_latency(b, a)
        if a.part in ("2", "all"):
            report_convergence(b, a)
    finally:
        b.stop_all()
        shutil.rmtree(b.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
