#!/usr/bin/env python3
"""One VDI migrated live between two hosts on this machine while a guest writes.

A 4 GiB VDI (50% random data, 10% zero blocks, 40% holes) on host A is attached as a guest's
disk; fio (nbd engine) writes 4 KiB randomly at a steady rate. First a baseline of the guest's
write latency with no migration, then the same guest while `sxm mirror start --wait` moves the
VDI to host B, then the guest stops (the VM pauses) and the source datapath is detached, which
finalizes the destination. Prints the wall times, the bytes the copy sent, and the guest's
latency, one JSON line, then a table.

Each pairing of SR types (`ext` is SMAPIv1 / VHD: snapshot, copy, compose; `qcow2` is SMAPIv3:
one full mirror) runs in turn, with the same image and guest load. With `--transports
http,https` each pairing runs over both, in the same run, host B then listening on TLS too (a
CA and a certificate made with openssl, host A trusting that CA): the cost of xapi's default
https, whose NBD connections host A and host B relay, and the ratio of the two.

Usage: benches/migrate-live.py [--size-mib 4096] [--iops 2000] [--baseline-s 10]
                               [--pairings ext:ext,ext:qcow2,qcow2:ext,qcow2:qcow2]
                               [--transports http|https|http,https]
Needs target/release/{sxm,tapmirror} (`cargo build --release`), fio, python3 (openssl for https).
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SXM = os.path.join(ROOT, "target", "release", "sxm")
TAPMIRROR = os.path.join(ROOT, "target", "release", "tapmirror")


def make_image(path, mib):
    allocated = 0
    with open(path, "wb") as f:
        f.truncate(mib << 20)
        for block in range(mib // 2):
            kind = block % 10
            if kind >= 6:
                continue  # 40% holes
            f.seek(block << 21)
            f.write(os.urandom(2 << 20) if kind < 5 else bytes(2 << 20))  # 50% data, 10% zeroes
            allocated += 2 << 20
    return allocated


def make_certificate(work):
    """A CA, and a certificate for 127.0.0.1 it signs: (ca, cert, key) paths."""
    ca, ca_key, cert, key, csr, ext = (os.path.join(work, n) for n in ("ca.pem", "ca.key", "host.pem", "host.key", "host.csr", "host.ext"))
    quiet = dict(check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA", "-keyout", ca_key, "-out", ca], **quiet)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr], **quiet)
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "x509", "-req", "-days", "2", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-extfile", ext, "-out", cert], **quiet)
    return ca, cert, key


def start_host(root, extra=()):
    os.makedirs(root, exist_ok=True)
    p = subprocess.Popen([SXM, "serve", "--root", root, "--listen", "127.0.0.1:0", "--tapmirror", TAPMIRROR, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, RUST_LOG="warn"))
    line = p.stdout.readline()
    words = dict(w.split("=", 1) for w in line.split() if "=" in w)
    # Over https when the host listens on TLS.
    url = words["tls"] if words.get("tls", "-") != "-" else words["tcp"]
    return p, url, os.path.join(root, "sxm.sock"), open(os.path.join(root, "secret")).read().strip()


def cli(sock, *args):
    out = subprocess.run([SXM, "--host", sock, *args], capture_output=True, text=True, env=dict(os.environ, SXM_TAPMIRROR=TAPMIRROR))
    if out.returncode != 0:
        sys.exit(f"sxm {' '.join(args)}: {out.stderr}")
    return out.stdout.strip()


def fio(uri, iops, runtime=None):
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--size=4G",
            "--iodepth=1", f"--rate_iops={iops}", "--time_based", f"--runtime={runtime or 3600}",
            "--output-format=json", "--lat_percentiles=1", "--percentile_list=50:99:99.9"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def latency(fio_proc):
    out, err = fio_proc.communicate()
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    lat = job["lat_ns"]
    p = lat.get("percentile", {})
    return {"writes": job["total_ios"], "mean_us": round(lat["mean"] / 1000, 1),
            "p50_us": round(p.get("50.000000", 0) / 1000, 1), "p99_us": round(p.get("99.000000", 0) / 1000, 1),
            "p999_us": round(p.get("99.900000", 0) / 1000, 1)}


def run_pairing(a, work, src_type, dst_type, transport):
    image = os.path.join(work, "disk.raw")
    allocated = make_image(image, a.size_mib)
    if transport == "https":
        ca, cert, key = make_certificate(work)
        extra = {"a": ["--tls-ca", ca], "b": ["--listen-tls", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key]}
    else:
        extra = {}
    hosts = [start_host(os.path.join(work, n), extra.get(n, ())) for n in ("a", "b")]
    (pa, tcp_a, sock_a, _), (pb, tcp_b, sock_b, secret_b) = hosts
    try:
        sr_a = cli(sock_a, "sr", "create", "--type", src_type, "--name", "a")
        sr_b = cli(sock_b, "sr", "create", "--type", dst_type, "--name", "b")
        vdi = json.loads(cli(sock_a, "--json", "vdi", "import", "--sr", sr_a, image))["vdi"]
        os.remove(image)
        subprocess.run(["sync"])
        uri = cli(sock_a, "vdi", "attach", "--sr", sr_a, "--vdi", vdi)

        baseline = latency(fio(uri, a.iops, a.baseline_s))

        guest = fio(uri, a.iops)
        time.sleep(2)
        t0 = time.monotonic()
        mirror = cli(sock_a, "mirror", "start", "--sr", sr_a, "--vdi", vdi, "--dest", f"{tcp_b}?session_id={secret_b}",
                     "--dest-sr", sr_b, "--wait")
        t1 = time.monotonic()
        tasks = json.loads(cli(sock_a, "--json", "task", "list"))
        task = next(t for t in tasks if t["debug_info"].get("mirror") == mirror)
        time.sleep(2)  # mirrored writes only, for a while
        guest.send_signal(signal.SIGINT)  # the VM pauses
        during = latency(guest)
        t2 = time.monotonic()
        dest_vdi = json.loads(cli(sock_a, "--json", "mirror", "stat", mirror))["dest_vdi"]
        cli(sock_a, "vdi", "detach", "--sr", sr_a, "--vdi", vdi)  # drain, finalize on B
        t3 = time.monotonic()
        info = json.loads(cli(sock_b, "--json", "vdi", "list", "--sr", sr_b))
        assert any(v["vdi"] == dest_vdi for v in info), "the destination VDI is missing"
        copied = task["debug_info"].get("copied_bytes")
        return {
            "pairing": f"{src_type}->{dst_type}", "transport": transport, "size_mib": a.size_mib, "allocated_mib": allocated >> 20,
            "guest_iops": a.iops, "start_to_mirroring_s": round(t1 - t0, 2), "finalize_s": round(t3 - t2, 2),
            "copied_mib": round(int(copied) / (1 << 20), 1) if copied else None,
            "baseline": baseline, "during": during,
        }
    finally:
        for p, *_ in hosts:
            p.terminate()
            p.wait()
        # Datapaths outlive their host by design: stop the ones this run made.
        subprocess.run(["pkill", "-f", f"{work}/"], check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--iops", type=int, default=2000)
    ap.add_argument("--baseline-s", type=int, default=10)
    ap.add_argument("--pairings", default="ext:ext,ext:qcow2,qcow2:ext,qcow2:qcow2")
    ap.add_argument("--transports", default="http")
    a = ap.parse_args()
    for exe in (SXM, TAPMIRROR):
        if not os.path.exists(exe):
            sys.exit(f"{exe} missing: run `cargo build --release` first")
    results = []
    for pairing in a.pairings.split(","):
        src_type, dst_type = pairing.split(":")
        for transport in a.transports.split(","):
            with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
                r = run_pairing(a, work, src_type, dst_type, transport)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(f"\n{a.size_mib} MiB VDI ({results[0]['allocated_mib']} MiB allocated), guest 4 KiB random writes at {a.iops}/s, QD1")
    print(f"{'pairing':<14}{'over':<7}{'to mirroring s':>15}{'finalize s':>11}{'copy MiB':>9}   guest p99 us: alone / during (mean alone / during)")
    for r in results:
        copied = "-" if r["copied_mib"] is None else r["copied_mib"]
        b, d = r["baseline"], r["during"]
        print(f"{r['pairing']:<14}{r['transport']:<7}{r['start_to_mirroring_s']:>15}{r['finalize_s']:>11}{copied:>9}   {b['p99_us']} / {d['p99_us']} ({b['mean_us']} / {d['mean_us']})")
    # https against http, pairing by pairing, from the same run.
    for pairing in dict.fromkeys(r["pairing"] for r in results):
        by = {r["transport"]: r for r in results if r["pairing"] == pairing}
        if "http" in by and "https" in by:
            h, s = by["http"], by["https"]
            print(f"{pairing}: https / http to mirroring {s['start_to_mirroring_s'] / max(h['start_to_mirroring_s'], 0.01):.2f}x, "
                  f"guest p99 during {s['during']['p99_us'] / max(h['during']['p99_us'], 0.1):.2f}x")


if __name__ == "__main__":
    main()
