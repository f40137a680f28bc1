//! Live migration between two hosts on loopback: a guest writes through the whole migration,
//! then the source datapath is finalized and the destination VDI must read exactly what the
//! guest wrote. Failures are injected at each stage; both hosts must end as they began.

use std::process::Command;

use serde_json::json;

use crate::require;
use crate::support::*;

const MIB: u64 = 1 << 20;

/// Two hosts, an `ext` SR on each.
struct Pair {
    _dir: tempfile::TempDir,
    src: Host,
    dst: Host,
    src_sr: String,
    dst_sr: String,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Host::start(&dir.path().join("a"));
        let dst = Host::start(&dir.path().join("b"));
        let src_sr = src.cli(&["sr", "create", "--name", "source"]);
        let dst_sr = dst.cli(&["sr", "create", "--name", "destination"]);
        Pair { _dir: dir, src, dst, src_sr, dst_sr }
    }

    fn dest_url(&self) -> String {
        format!("{}?session_id={}", self.dst.tcp, self.dst.secret)
    }

    /// A VDI on the source holding `data`, attached as a guest's disk; answers (vdi, uri).
    fn guest_disk(&self, data: &[u8]) -> (String, String) {
        let file = self._dir.path().join(format!("seed-{}.raw", data.len()));
        std::fs::write(&file, data).expect("seed");
        let vdi = self.src.cli_json(&["vdi", "import", "--sr", &self.src_sr, "--name", "disk", file.to_str().expect("path")])["vdi"].as_str().expect("vdi").to_owned();
        let uri = self.src.cli(&["vdi", "attach", "--sr", &self.src_sr, "--vdi", &vdi]);
        (vdi, uri)
    }

    fn start_mirror(&self, vdi: &str) -> String {
        self.src.cli(&["mirror", "start", "--sr", &self.src_sr, "--vdi", vdi, "--dest", &self.dest_url(), "--dest-sr", &self.dst_sr, "--wait"])
    }

    /// Every VDI of the destination SR (id, name), sorted.
    fn dst_vdis(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .dst
            .call("SR.scan", json!({"sr": self.dst_sr, "dbg": "t"}))
            .as_array()
            .expect("list")
            .iter()
            .map(|v| (v["vdi"].as_str().expect("id").to_owned(), v["name_label"].as_str().expect("name").to_owned()))
            .collect();
        v.sort();
        v
    }

    fn export(&self, host: &Host, sr: &str, vdi: &str) -> Vec<u8> {
        let out = self._dir.path().join(format!("export-{vdi}.raw"));
        let _ = std::fs::remove_file(&out);
        host.cli(&["vdi", "export", "--sr", sr, "--vdi", vdi, out.to_str().expect("path")]);
        let data = std::fs::read(&out).expect("export");
        std::fs::remove_file(&out).expect("remove");
        data
    }
}

#[test]
fn a_vdi_moves_live_and_the_destination_reads_what_the_guest_wrote() {
    require!("nbdcopy");
    let p = Pair::new();
    let size = 32 * MIB;
    let mut seed = pattern(size as usize, 11);
    // Holes and zero runs as well as data.
    seed[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
    let (vdi, uri) = p.guest_disk(&seed);
    let before_dst = p.dst_vdis();

    let guest = Guest::start(uri.clone(), size, 21);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let id = p.start_mirror(&vdi);
    assert_eq!(id, format!("{}/{vdi}", p.src_sr));
    let stat = p.src.call("DATA.MIRROR.stat", json!({"id": id, "dbg": "t"}));
    assert_eq!(stat["failed"], false, "{stat}");
    assert_eq!(stat["state"], json!(["Sending"]));
    let dest_vdi = stat["dest_vdi"].as_str().expect("dest vdi").to_owned();
    let recv = p.dst.call("DATA.MIRROR.stat", json!({"id": id, "dbg": "t"}));
    assert_eq!(recv["state"], json!(["Receiving"]), "{recv}");
    // The guest goes on writing while the mirror runs.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (model, writes) = guest.stop();
    assert!(writes > 20, "the guest hardly wrote ({writes})");

    // Switch-over: the source datapath goes, which finalizes the destination.
    p.src.cli(&["vdi", "detach", "--sr", &p.src_sr, "--vdi", &vdi]);
    let list = p.src.call("DATA.MIRROR.list", json!({"dbg": "t"}));
    assert_eq!(list, json!({}), "the send is over");
    assert_eq!(p.dst.call("DATA.MIRROR.list", json!({"dbg": "t"})), json!({}), "the receive is over");

    let moved = p.export(&p.dst, &p.dst_sr, &dest_vdi);
    assert_matches_guest(&moved, &model, &seed, "the destination VDI");
    // Exactly one new VDI on the destination, and nothing marked as a migration's.
    let after: Vec<(String, String)> = p.dst_vdis().into_iter().filter(|v| !before_dst.contains(v)).collect();
    assert_eq!(after.len(), 1, "{after:?}");
    let info = p.dst.call("VDI.stat", json!({"sr": p.dst_sr, "vdi": dest_vdi, "dbg": "t"}));
    assert!(info["sm_config"].get("base_mirror").is_none(), "{info}");
    // The source keeps its VDI (the caller destroys it once the VM runs there) and no snapshot.
    let src_vdis = p.src.call("SR.scan", json!({"sr": p.src_sr, "dbg": "t"}));
    assert_eq!(src_vdis.as_array().expect("list").len(), 1, "{src_vdis}");
}

#[test]
fn only_differences_travel_when_the_destination_has_a_similar_vdi() {
    require!("nbdcopy");
    let p = Pair::new();
    let size = 32 * MIB;
    let seed = pattern(size as usize, 5);
    let (vdi, uri) = p.guest_disk(&seed);
    p.src.cli(&["vdi", "detach", "--sr", &p.src_sr, "--vdi", &vdi]);
    // A snapshot of the disk as it is now, copied to the destination ahead of time.
    let snap = p.src.cli_json(&["vdi", "snapshot", "--sr", &p.src_sr, "--vdi", &vdi, "--name", "golden"])["vdi"].as_str().expect("snap").to_owned();
    let copied = p.src.cli(&[
        "copy", "--sr", &p.src_sr, "--vdi", &snap, "--dest", &p.dest_url(), "--dest-sr", &p.dst_sr, "--wait",
    ]);
    let golden = p.export(&p.dst, &p.dst_sr, &copied);
    assert!(golden == seed, "DATA.copy did not copy the snapshot exactly");

    // The guest changes 2 MiB, then the disk moves.
    let uri2 = p.src.cli(&["vdi", "attach", "--sr", &p.src_sr, "--vdi", &vdi]);
    assert_eq!(uri, uri2);
    let mut expected = seed.clone();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 4194304 2097152", &uri]));
    expected[(4 * MIB) as usize..(6 * MIB) as usize].fill(0x42);
    let id = p.start_mirror(&vdi);
    let tasks = p.src.call("TASK.list", json!({"dbg": "t"}));
    let task = tasks.as_array().expect("tasks").iter().find(|t| t["debug_info"]["mirror"] == json!(id)).expect("the mirror's task").clone();
    let copied_bytes: u64 = task["debug_info"]["copied_bytes"].as_str().expect("copied_bytes").parse().expect("number");
    assert!(copied_bytes <= 4 * MIB, "{copied_bytes} bytes were copied for a 2 MiB difference");
    let dest_vdi = p.src.call("DATA.MIRROR.stat", json!({"id": id, "dbg": "t"}))["dest_vdi"].as_str().expect("dest").to_owned();
    p.src.cli(&["vdi", "detach", "--sr", &p.src_sr, "--vdi", &vdi]);
    assert!(p.export(&p.dst, &p.dst_sr, &dest_vdi) == expected, "the destination differs from the source");
}

#[test]
fn stop_undoes_a_running_mirror_on_both_hosts() {
    let p = Pair::new();
    let (vdi, _uri) = p.guest_disk(&pattern((8 * MIB) as usize, 2));
    let before_src = p.src.files();
    let before_dst = p.dst_vdis();
    let id = p.start_mirror(&vdi);
    assert_ne!(p.dst_vdis(), before_dst, "the destination prepared nothing");
    p.src.cli(&["mirror", "stop", &id]);
    assert_eq!(p.dst_vdis(), before_dst, "the destination kept something");
    assert_eq!(p.src.call("DATA.MIRROR.list", json!({"dbg": "t"})), json!({}));
    assert_eq!(p.dst.call("DATA.MIRROR.list", json!({"dbg": "t"})), json!({}));
    let names = |v: Vec<(String, u64)>| v.into_iter().map(|(n, _)| n).filter(|n| !n.ends_with(".vhd")).collect::<Vec<_>>();
    assert_eq!(names(p.src.files()), names(before_src), "files changed on the source");
    // And it can be done again.
    let again = p.start_mirror(&vdi);
    assert_eq!(again, id);
}

#[test]
fn a_failed_prepare_leaves_both_hosts_as_they_were_and_says_so() {
    let p = Pair::new();
    let (vdi, _uri) = p.guest_disk(&pattern((4 * MIB) as usize, 3));
    let before_dst = p.dst_vdis();
    // A destination SR that does not exist: the destination refuses to prepare.
    let out = p.src.cli_raw(&["mirror", "start", "--sr", &p.src_sr, "--vdi", &vdi, "--dest", &p.dest_url(), "--dest-sr", "no-such-sr", "--wait"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prepare") && err.to_lowercase().contains("preparation"), "{err}");
    assert_eq!(p.dst_vdis(), before_dst);
    assert_eq!(p.src.call("DATA.MIRROR.list", json!({"dbg": "t"})), json!({}));
    // A wrong secret for the destination: refused, nothing made.
    let bad = format!("{}?session_id=wrong", p.dst.tcp);
    let out = p.src.cli_raw(&["mirror", "start", "--sr", &p.src_sr, "--vdi", &vdi, "--dest", &bad, "--dest-sr", &p.dst_sr, "--wait"]);
    assert!(!out.status.success());
    assert_eq!(p.dst_vdis(), before_dst);
    // Then a good one succeeds.
    p.start_mirror(&vdi);
}
