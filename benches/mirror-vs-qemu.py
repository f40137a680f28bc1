#!/usr/bin/env python3
"""Live mirroring, side by side in one run: tapmirror against qemu-storage-daemon.

1. Guest 4 KiB random writes at queue depth 1 (fio, nbd engine): no mirror, tapmirror's sync
   mirror, qemu-storage-daemon without a mirror and with blockdev-mirror in write-blocking mode
   (after READY). Every mirror target is a qemu-nbd export of a raw file.
2. Full mirror under a steady guest (fio: 4 KiB random writes at a fixed rate): time to ready
   and bytes sent, for tapmirror's full mirror and QEMU's background and write-blocking modes,
   plus the guest's p99 write latency during the copy against its unmirrored p99.

    benches/mirror-vs-qemu.py [--size-mib N] [--seconds S]

Needs cargo, fio, qemu-nbd, qemu-storage-daemon. Prints each figure and the ratios.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time

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
        end = time.time() + timeout
        self.s.settimeout(1)
        while time.time() < end:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            try:
                m = self._read()
            except (socket.timeout, json.JSONDecodeError):
                continue
            if "event" in m:
                self.events.append(m)
        raise RuntimeError(f"no {name} event")


def fio(uri, seconds, rate_iops=None, bs="4k"):
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", f"--bs={bs}",
            "--iodepth=1", "--time_based", f"--runtime={seconds}", "--size=100%",
            "--output-format=json"]
    if rate_iops:
        args.append(f"--rate_iops={rate_iops}")
    out = sh(*args).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    pct = j["clat_ns"]["percentile"]
    return {"iops": j["iops"], "mean_us": j["clat_ns"]["mean"] / 1000, "p99_us": pct["99.000000"] / 1000}


class Bench:
    def __init__(self, size_mib, seconds):
        self.size = size_mib << 20
        self.seconds = seconds
        self.dir = tempfile.mkdtemp(prefix="sxm-mirror.")
        self.procs = []
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

    def stop_all(self):
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []

    def fresh(self, name, copy_src):
        p = self.path(name)
        if copy_src:
            sh("cp", "--sparse=always", self.src, p)  # shutil.copyfile would fill the holes
        else:
            with open(p, "wb") as f:
                f.truncate(self.size)
        return p

    def target(self, name):
        sock = self.path(name + ".sock")
        self.spawn(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "--cache=writeback", "--discard=unmap",
                    "-k", sock, self.fresh(name + ".raw", False)], sock)
        return sock

    def tapmirror(self, name):
        sock, ctl = self.path(name + ".sock"), self.path(name + ".ctl")
        self.spawn([self.tm, "serve", self.fresh(name + ".raw", True), "--socket", sock, "--control", ctl], sock)
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
    def qd1_latency(self):
        out = {}
        uri, _ = self.tapmirror("tm-off")
        out["tapmirror, no mirror"] = fio(uri, self.seconds)
        self.stop_all()

        tgt = self.target("tm-tgt")
        uri, ctl = self.tapmirror("tm-sync")
        self.ctl(ctl, "mirror-attach", "--target", f"nbd+unix:///?socket={tgt}")
        out["tapmirror, sync mirror"] = fio(uri, self.seconds)
        assert self.ctl(ctl, "stats")["mirror"]["state"] == "ready"
        self.stop_all()

        uri, _ = self.qsd("qsd-off")
        out["qemu-storage-daemon, no mirror"] = fio(uri, self.seconds)
        self.stop_all()

        tgt = self.target("qsd-tgt")
        uri, q = self.qsd("qsd-wb", tgt)
        q.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                    "copy-mode": "write-blocking"})
        q.wait_event("BLOCK_JOB_READY")
        out["qemu-storage-daemon, write-blocking mirror"] = fio(uri, self.seconds)
        self.stop_all()
        return out

    # Part 2 -----------------------------------------------------------------------------
    def convergence(self, rate_iops):
        out = {}
        guest_secs = max(self.seconds, 10)

        uri, _ = self.tapmirror("conv-off")
        out["unmirrored guest"] = (fio(uri, guest_secs, rate_iops), None, None)
        self.stop_all()

        tgt = self.target("conv-tm-tgt")
        uri, ctl = self.tapmirror("conv-tm")
        guest = subprocess.Popen(["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                                  "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={guest_secs}",
                                  f"--rate_iops={rate_iops}", "--size=100%", "--output-format=json"],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        t0 = time.time()
        self.ctl(ctl, "mirror-attach", "--mode", "full", "--target-is-zero", "--target", f"nbd+unix:///?socket={tgt}")
        while self.ctl(ctl, "stats")["mirror"]["state"] == "syncing":
            time.sleep(0.05)
        ready = time.time() - t0
        stats = self.ctl(ctl, "stats")["mirror"]
        sent = stats["progress"]["bytes_sent"] + stats["counters"]["bytes"]
        o = guest.communicate()[0]
        g = json.loads(o[o.index("{"):])["jobs"][0]["write"]
        out["tapmirror full mirror"] = ({"p99_us": g["clat_ns"]["percentile"]["99.000000"] / 1000,
                                         "mean_us": g["clat_ns"]["mean"] / 1000, "iops": g["iops"]}, ready, sent)
        self.stop_all()

        for mode in ("background", "write-blocking"):
            tgt = self.target(f"conv-{mode}-tgt")
            uri, q = self.qsd(f"conv-{mode}", tgt)
            guest = subprocess.Popen(["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                                      "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={guest_secs}",
                                      f"--rate_iops={rate_iops}", "--size=100%", "--output-format=json"],
                                     stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            t0 = time.time()
            q.cmd("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                        "copy-mode": mode})
            e = q.wait_event("BLOCK_JOB_READY")
            ready = time.time() - t0
            sent = e["data"]["offset"]
            o = guest.communicate()[0]
            g = json.loads(o[o.index("{"):])["jobs"][0]["write"]
            out[f"qemu {mode} mirror"] = ({"p99_us": g["clat_ns"]["percentile"]["99.000000"] / 1000,
                                          "mean_us": g["clat_ns"]["mean"] / 1000, "iops": g["iops"]}, ready, sent)
            self.stop_all()
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rate-iops", type=int, default=2000)
    a = ap.parse_args()
    b = Bench(a.size_mib, a.seconds)
    try:
        lat = b.qd1_latency()
        print(f"guest 4 KiB random writes, QD1, {a.seconds} s each; image {a.size_mib} MiB")
        print(f"{'case':45} {'IOPS':>8} {'mean us':>8} {'p99 us':>8}")
        for n, r in lat.items():
            print(f"{n:45} {r['iops']:8.0f} {r['mean_us']:8.1f} {r['p99_us']:8.1f}")
        ours, off, qemu = lat["tapmirror, sync mirror"], lat["tapmirror, no mirror"], lat["qemu-storage-daemon, write-blocking mirror"]
        print(f"sync mirror vs qemu write-blocking: mean {ours['mean_us'] / qemu['mean_us']:.2f}x, p99 {ours['p99_us'] / qemu['p99_us']:.2f}x  (bar: < 1)")
        print(f"sync mirror vs unmirrored:          mean {ours['mean_us'] / off['mean_us']:.2f}x, p99 {ours['p99_us'] / off['p99_us']:.2f}x  (bar: <= 1.5)")

        conv = b.convergence(a.rate_iops)
        print(f"\nfull mirror under a steady guest ({a.rate_iops} x 4 KiB writes/s)")
        print(f"{'case':32} {'ready s':>8} {'sent MB':>9} {'guest p99 us':>13} {'guest mean us':>14}")
        for n, (g, ready, sent) in conv.items():
            print(f"{n:32} {ready if ready is not None else float('nan'):8.2f} {(sent or 0) / 1e6:9.1f} {g['p99_us']:13.1f} {g['mean_us']:14.1f}")
        base = conv["unmirrored guest"][0]["p99_us"]
        print(f"tapmirror full mirror guest p99 vs unmirrored: {conv['tapmirror full mirror'][0]['p99_us'] / base:.2f}x  (bar: <= 2)")
    finally:
        b.stop_all()
        shutil.rmtree(b.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
