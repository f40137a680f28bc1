#!/usr/bin/env python3
"""Load on one host's RPC path: N clients call SR.scan and VDI.stat concurrently over
JSON-RPC 2.0 on TCP (keep-alive connections, the host secret as a bearer token). Prints calls
per second and p50/p99 latency per client count, one JSON line each, then a table.

Usage: benches/rpc-load.py [--vdis 100] [--seconds 5] [--clients 1,4,16,64]
Builds nothing: run `cargo build --release` first (uses target/release/sxm and tapmirror).
"""
import argparse, http.client, json, os, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SXM = os.path.join(ROOT, "target", "release", "sxm")


def start_host(root):
    proc = subprocess.Popen([SXM, "serve", "--root", root, "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, RUST_LOG="warn"))
    line = proc.stdout.readline()
    tcp = next(w[4:] for w in line.split() if w.startswith("tcp="))
    host, port = tcp.replace("http://", "").rsplit(":", 1)
    secret = open(os.path.join(root, "secret")).read().strip()
    return proc, host, int(port), secret


class Client:
    def __init__(self, host, port, secret):
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.headers = {"Content-Type": "application/json", "Authorization": "Bearer " + secret}
        self.id = 0

    def call(self, method, **params):
        self.id += 1
        params.setdefault("dbg", "load")
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": [params], "id": self.id})
        self.conn.request("POST", "/jsonrpc", body, self.headers)
        reply = json.loads(self.conn.getresponse().read())
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]


def run(host, port, secret, sr, vdis, clients, seconds):
    latencies, errors = [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(n):
        c = Client(host, port, secret)
        mine, i = [], n
        try:
            while time.monotonic() < stop:
                t = time.perf_counter()
                if i % 2 == 0:
                    c.call("SR.scan", sr=sr)
                else:
                    c.call("VDI.stat", sr=sr, vdi=vdis[i % len(vdis)])
                mine.append(time.perf_counter() - t)
                i += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return {"clients": clients, "calls": len(latencies), "calls_per_s": round(len(latencies) / wall),
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2), "errors": errors[:3]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vdis", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--clients", default="1,4,16,64")
    a = ap.parse_args()
    if not os.path.exists(SXM):
        sys.exit(f"{SXM} missing: run `cargo build --release` first")
    with tempfile.TemporaryDirectory() as root:
        proc, host, port, secret = start_host(root)
        try:
            c = Client(host, port, secret)
            sr = "load-sr"
            c.call("SR.create", sr=sr, name_label="load", name_description="", device_config={"type": "ext"}, physical_size=0)
            c.call("SR.attach", sr=sr, device_config={})
            vdis = [c.call("VDI.create", sr=sr, vdi_info={"vdi": "", "name_label": f"d{i}", "virtual_size": 1 << 20})["vdi"]
                    for i in range(a.vdis)]
            results = []
            for n in [int(x) for x in a.clients.split(",")]:
                r = run(host, port, secret, sr, vdis, n, a.seconds)
                print(json.dumps(r), flush=True)
                results.append(r)
            print(f"\n{a.vdis} VDIs in the SR; SR.scan and VDI.stat alternating, {a.seconds} s per row")
            print(f"{'clients':>8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} errors")
            for r in results:
                print(f"{r['clients']:>8} {r['calls_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} {len(r['errors'])}")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
