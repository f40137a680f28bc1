//! Crash consistency: `tapmirror serve` killed with SIGKILL in the middle of allocating writes.
//!
//! Each round serves the image, keeps many disjoint writes in flight from our client (every
//! sector of a write filled with one byte value that names the write), flushes now and then,
//! and kills the server at a random moment. Afterwards the image must pass
//! `tapmirror image check` (and `qemu-img check` for qcow2, which must find no corruption), and
//! every 512-byte sector must read as either its old content or the content of the write that
//! covered it, with nothing torn in between; a write acknowledged before a completed FLUSH must
//! be there. Rounds reuse the image, so later rounds crash on top of earlier crashes.

use std::collections::HashMap;
use std::process::Command;

use tapmirror::nbd::{ClientOptions, NbdClient};

use crate::harness::{run, serve_file, spawn_server, tapmirror};

const SIZE: u64 = 64 << 20;
const SECTOR: u64 = 512;
const ROUNDS: u64 = 6;

/// A small deterministic generator: the test must be reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Write {
    offset: u64,
    sectors: u64,
    value: u8,
}

/// Disjoint writes for one round: 1 to 64 sectors each, at random sector offsets, so most of
/// them land in blocks or clusters that are not allocated yet.
fn plan(rng: &mut Rng, round: u64) -> Vec<Write> {
    let mut taken = vec![false; (SIZE / SECTOR) as usize];
    let mut out = Vec::new();
    for i in 0..400u64 {
        let sectors = 1 + rng.below(64);
        let start = rng.below(SIZE / SECTOR - sectors);
        let range = start as usize..(start + sectors) as usize;
        if taken[range.clone()].iter().any(|&t| t) {
            continue;
        }
        taken[range].iter_mut().for_each(|t| *t = true);
        // Values 1..=250 name (round, write); 0 is the never-written content.
        let value = ((round * 400 + i) % 250 + 1) as u8;
        out.push(Write { offset: start * SECTOR, sectors, value });
    }
    out
}

fn crash_rounds(format: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join(format!("disk.{format}"));
    run(Command::new(tapmirror()).args(["image", "create", format]).arg(&image).arg(SIZE.to_string()));
    // What each sector holds for sure (value byte), as far as the test knows.
    let mut model = vec![0u8; (SIZE / SECTOR) as usize];
    let mut rng = Rng(0x5eed ^ format.len() as u64);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut dir = Some(dir);

    for round in 0..ROUNDS {
        let served = serve_file(dir.take().expect("dir"), image.clone(), &["--format", format]);
        let writes = plan(&mut rng, round);
        // Kill after a random number of completions, so the crash always lands mid-stream
        // (with up to 32 writes in flight) however fast the writes are.
        let kill_at = 1 + rng.below(writes.len() as u64 / 2) as usize;
        let pid = nix::unistd::Pid::from_raw(served.proc.0.as_ref().expect("server").id() as i32);

        // Run writes until the server dies; learn which completed and which were flushed.
        let (completed, durable) = rt.block_on(async {
            let client = NbdClient::connect_unix(&served.socket, ClientOptions::default()).await.expect("connect");
            let mut completed = Vec::new();
            let mut durable = 0usize;
            let mut killed = false;
            let mut set = tokio::task::JoinSet::new();
            for (i, w) in writes.iter().enumerate() {
                let c = client.clone();
                let data = vec![w.value; (w.sectors * SECTOR) as usize];
                let offset = w.offset;
                set.spawn(async move { c.write(offset, data, false).await.map(|_| i) });
                if set.len() >= 32
                    && let Some(Ok(Ok(i))) = set.join_next().await {
                        completed.push(i);
                    }
                if !killed && completed.len() >= kill_at {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    killed = true;
                }
                if !killed && i % 50 == 49 {
                    // Everything completed before a successful flush must survive the crash.
                    let before = completed.len();
                    if client.flush().await.is_ok() {
                        durable = before;
                    }
                }
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Ok(i)) = r {
                    completed.push(i);
                }
            }
            (completed, durable)
        });
        let mut served = served;
        if let Some(mut child) = served.proc.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }

        // The file must be sound, by our checker and (qcow2) by qemu's. A crash may leak
        // clusters (exit 3, as qemu-img's): wasted space, never damage.
        let checked = Command::new(tapmirror()).args(["image", "check"]).arg(&image).output().expect("image check");
        assert!(matches!(checked.status.code(), Some(0 | 3)), "round {round}: {checked:?}");
        if format == "qcow2" && crate::harness::require_tool("qemu-img") {
            let out = Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(&image).output().expect("qemu-img check");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img check json");
            assert_eq!(report["corruptions"].as_u64().unwrap_or(0), 0, "round {round}: qemu-img check: {report}");
            assert!(report.get("check-errors").and_then(|v| v.as_u64()).unwrap_or(0) == 0, "round {round}: {report}");
        }

        // Every sector: old or new, never torn; flushed writes are new.
        let contents = read_all(&rt, &image, format);
        let flushed: std::collections::HashSet<usize> = completed[..durable.min(completed.len())].iter().copied().collect();
        let mut by_sector: HashMap<u64, (u8, bool)> = HashMap::new();
        for (i, w) in writes.iter().enumerate() {
            for s in 0..w.sectors {
                by_sector.insert(w.offset / SECTOR + s, (w.value, flushed.contains(&i)));
            }
        }
        for (s, old) in model.iter_mut().enumerate() {
            let sector = &contents[s * SECTOR as usize..(s + 1) * SECTOR as usize];
            let first = sector[0];
            assert!(sector.iter().all(|&b| b == first), "round {round}: sector {s} is torn");
            match by_sector.get(&(s as u64)) {
                Some(&(new, must)) => {
                    assert!(first == new || (!must && first == *old), "round {round}: sector {s} = {first}, old {old}, new {new}, flushed {must}");
                }
                None => assert_eq!(first, *old, "round {round}: sector {s} changed without a write"),
            }
            *old = first;
        }
        dir = Some(served.dir);
    }
}

/// The image's content as served by a fresh `tapmirror serve` (which also proves it opens).
fn read_all(rt: &tokio::runtime::Runtime, image: &std::path::Path, format: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("read.sock");
    let _reader = spawn_server(
        Command::new(tapmirror()).args(["serve", "--read-only", "--format", format]).arg(image).arg("--socket").arg(&socket),
        &socket,
    );
    rt.block_on(async {
        let c = NbdClient::connect_unix(&socket, ClientOptions::default()).await.expect("connect reader");
        let mut out = Vec::with_capacity(SIZE as usize);
        let mut at = 0;
        while at < SIZE {
            out.extend(c.read(at, 4 << 20).await.expect("read"));
            at += 4 << 20;
        }
        out
    })
}

#[test]
fn vhd_survives_sigkill_during_allocating_writes() {
    crash_rounds("vhd");
}

#[test]
fn qcow2_survives_sigkill_during_allocating_writes() {
    crash_rounds("qcow2");
}

/// A VHD's bitmaps and BAT entries wait in memory until a sync point, but `tapmirror serve`
/// writes them out every second: a crash a few seconds after unflushed writes still finds them.
#[test]
fn unflushed_vhd_writes_reach_the_file_within_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.vhd");
    run(Command::new(tapmirror()).args(["image", "create", "vhd"]).arg(&image).arg(SIZE.to_string()));
    let served = serve_file(dir, image.clone(), &["--format", "vhd"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // Fresh blocks and fresh sectors of allocated ones, never flushed.
    let writes: Vec<(u64, u8)> = (0..24u64).map(|i| ((i * 2_654_435_761 % (SIZE / SECTOR - 16)) * SECTOR, (i + 1) as u8)).collect();
    rt.block_on(async {
        let c = NbdClient::connect_unix(&served.socket, ClientOptions::default()).await.expect("connect");
        for &(off, v) in &writes {
            c.write(off, vec![v; 4096], false).await.expect("write");
        }
    });
    // The metadata goes out once a second, after the data's sync: on a busy disk that sync
    // alone can take longer than a fixed wait. Wait until a reader of the file (a second,
    // read-only server) finds every write there, however long that takes, up to a bound that
    // still says "within seconds".
    let mut model = vec![0u8; SIZE as usize];
    for &(off, v) in &writes {
        model[off as usize..off as usize + 4096].fill(v);
    }
    let started = std::time::Instant::now();
    while read_all(&rt, &image, "vhd") != model {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "unflushed writes not in the file after {:?}", started.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut served = served;
    let mut child = served.proc.0.take().expect("server");
    let _ = child.kill(); // SIGKILL: no flush, no close
    let _ = child.wait();
    run(Command::new(tapmirror()).args(["image", "check"]).arg(&image));
    let contents = read_all(&rt, &image, "vhd");
    let lost = writes.iter().filter(|&&(off, v)| contents[off as usize..off as usize + 4096].iter().any(|&b| b != v)).count();
    assert_eq!(lost, 0, "{lost} of {} unflushed writes never reached the file", writes.len());
    assert!(contents == model, "bytes outside the writes changed");
    drop(served);
}
