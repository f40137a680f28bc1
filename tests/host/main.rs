//! End-to-end tests of one host: `sxm serve` started for real, driven over XML-RPC (Python's
//! xmlrpc.client, curl), JSON-RPC 1.0 and 2.0 (curl, the `sxm` CLI), its VDIs read and written
//! through their NBD URIs by qemu-io, nbdcopy and our own guest writer.

mod support;
mod migrate;

use std::process::Command;

use serde_json::json;
use support::*;

const MIB: u64 = 1 << 20;

/// A host with one attached `ext` SR; answers (host, sr).
fn host_with_sr(dir: &tempfile::TempDir) -> (Host, String) {
    let host = Host::start(&dir.path().join("host"));
    let sr = host.cli(&["sr", "create", "--type", "ext", "--name", "local"]);
    assert_eq!(sr.len(), 36, "an SR uuid: {sr}");
    (host, sr)
}

fn vdi_ids(host: &Host, sr: &str) -> Vec<String> {
    let mut ids: Vec<String> = host.call("SR.scan", json!({"sr": sr, "dbg": "t"})).as_array().expect("list").iter().map(|v| v["vdi"].as_str().expect("vdi").to_owned()).collect();
    ids.sort();
    ids
}

#[test]
fn srs_and_vdis_over_xmlrpc_and_both_jsonrpc_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("host")).expect("root");
    let host = Host::start(&dir.path().join("host"));

    // XML-RPC from a client that is not ours, xapi's way: one struct of named args, sizes as
    // untyped strings, the secret as session_id.
    let out = host.python_xmlrpc(
        r#"
r = proxy.SR.create({"dbg": "py", "sr": "sr-xml", "name_label": "from python", "name_description": "", "device_config": {"type": "ext"}, "physical_size": "0"})
assert r["Status"] == "Success", r
r = proxy.SR.attach({"dbg": "py", "sr": "sr-xml", "device_config": {}})
assert r["Status"] == "Success", r
info = {"vdi": "", "name_label": "disk0", "virtual_size": str(64 << 20)}
r = proxy.VDI.create({"dbg": "py", "sr": "sr-xml", "vdi_info": info})
assert r["Status"] == "Success", r
print(json.dumps(r["Value"]))
"#,
    );
    let made: serde_json::Value = serde_json::from_str(&out).expect("python printed the VDI");
    assert_eq!(made["name_label"], "disk0");
    // XML-RPC integers travel untyped, as strings.
    assert_eq!(made["virtual_size"], json!((64 * MIB).to_string()));
    let vdi = made["vdi"].as_str().expect("vdi id").to_owned();

    // The same SR over JSON-RPC 1.0: the reply is 1.0 (`error: null`, no `jsonrpc`).
    let body = json!({"method": "SR.scan", "params": [{"sr": "sr-xml", "dbg": "v1"}], "id": 7}).to_string();
    let (status, reply) = host.post_tcp(&format!("/jsonrpc?session_id={}", host.secret), &body, "application/json");
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["id"], 7);
    assert!(reply.get("jsonrpc").is_none(), "{reply}");
    assert_eq!(reply["error"], serde_json::Value::Null);
    assert_eq!(reply["result"][0]["vdi"], json!(vdi));
    assert_eq!(reply["result"][0]["virtual_size"], json!(64 * MIB));

    // JSON-RPC 2.0 over the Unix socket (no secret needed there), with a bearer-less call.
    let reply = host.jsonrpc("VDI.stat", json!({"sr": "sr-xml", "vdi": vdi, "dbg": "v2"}));
    assert_eq!(reply["jsonrpc"], "2.0");
    assert_eq!(reply["result"]["name_label"], "disk0");

    // A VDI made over JSON-RPC is seen over XML-RPC.
    let made = host.call("VDI.create", json!({"sr": "sr-xml", "dbg": "j", "vdi_info": {"vdi": "", "name_label": "disk1", "virtual_size": 8 * MIB}}));
    let out = host.python_xmlrpc(
        r#"
r = proxy.SR.scan({"dbg": "py", "sr": "sr-xml"})
assert r["Status"] == "Success", r
print(json.dumps(sorted(v["name_label"] for v in r["Value"])))
"#,
    );
    assert_eq!(out, r#"["disk0", "disk1"]"#);
    let stat = host.call("SR.stat", json!({"sr": "sr-xml", "dbg": "j"}));
    assert_eq!(stat["name_label"], "from python");
    assert!(stat["total_space"].as_i64().expect("total") > 0);
    assert!(stat["free_space"].as_i64().expect("free") <= stat["total_space"].as_i64().expect("total"));
    assert_eq!(host.call("SR.list", json!({"dbg": "j"})), json!(["sr-xml"]));

    // Errors come back as xapi's variants in each encoding.
    let reply = host.jsonrpc("VDI.stat", json!({"sr": "sr-xml", "vdi": "no-such-vdi", "dbg": "e"}));
    let err = serde_json::to_string(&reply["error"]).expect("error");
    assert!(err.contains("Vdi_does_not_exist") || err.contains("Does_not_exist"), "{reply}");
    let out = host.python_xmlrpc(
        r#"
r = proxy.VDI.destroy({"dbg": "py", "sr": "sr-xml", "vdi": "no-such-vdi"})
print(json.dumps(r))
"#,
    );
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["Status"], "Failure", "{r}");

    // Destroying a VDI and the SR.
    host.call("VDI.destroy", json!({"sr": "sr-xml", "vdi": made["vdi"], "dbg": "j"}));
    assert_eq!(vdi_ids(&host, "sr-xml"), vec![vdi.clone()]);
    host.call("VDI.destroy", json!({"sr": "sr-xml", "vdi": vdi, "dbg": "j"}));
    host.call("SR.destroy", json!({"sr": "sr-xml", "dbg": "j"}));
    assert_eq!(host.call("SR.list", json!({"dbg": "j"})), json!([]));
    assert!(!host.root.join("sr").join("sr-xml").exists(), "the SR's folder is gone");
}

#[test]
fn the_cli_makes_lists_imports_exports_and_snapshots() {
    require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let listed = host.cli_json(&["sr", "list"]);
    assert!(listed.get(&sr).is_some(), "{listed}");
    let table = host.cli(&["sr", "list"]);
    assert!(table.contains(&sr) && table.contains("local") && table.contains("ext") && table.contains("v1"), "{table}");
    let v3 = host.cli(&["sr", "create", "--type", "qcow2", "--name", "volumes"]);
    let listed = host.cli_json(&["sr", "list"]);
    assert_eq!((listed[&v3]["sr_type"].as_str(), listed[&v3]["smapi_version"].as_i64()), (Some("qcow2"), Some(3)), "{listed}");
    assert_eq!((listed[&sr]["sr_type"].as_str(), listed[&sr]["smapi_version"].as_i64()), (Some("ext"), Some(1)), "{listed}");

    let empty = host.cli(&["vdi", "create", "--sr", &sr, "--size", "16M", "--name", "scratch"]);
    let data = pattern((24 * MIB) as usize, 5);
    let image = dir.path().join("image.raw");
    std::fs::write(&image, &data).expect("write image");
    let imported = host.cli_json(&["vdi", "import", "--sr", &sr, "--name", "imported", image.to_str().expect("path")]);
    let imported_id = imported["vdi"].as_str().expect("vdi").to_owned();
    assert_eq!(imported["virtual_size"], json!(24 * MIB));

    let list = host.cli_json(&["vdi", "list", "--sr", &sr]);
    let names: Vec<&str> = list.as_array().expect("list").iter().map(|v| v["name_label"].as_str().expect("name")).collect();
    assert!(names.contains(&"scratch") && names.contains(&"imported"), "{list}");
    let table = host.cli(&["vdi", "list", "--sr", &sr]);
    assert!(table.contains(&empty) && table.contains("imported"), "{table}");

    let exported = dir.path().join("exported.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", &imported_id, exported.to_str().expect("path")]);
    assert!(std::fs::read(&exported).expect("exported") == data, "export differs from what was imported");

    let snap = host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &imported_id, "--name", "before"]);
    assert_eq!(snap["is_a_snapshot"], true);
    assert_eq!(snap["snapshot_of"], json!(imported_id));
    assert_eq!(snap["name_label"], "before");

    // Nothing is left attached by the CLI's own datapaths.
    for id in [&imported_id, &empty] {
        let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": id, "dbg": "t"}));
        assert_eq!(stat["superstate"], "Detached", "{id}: {stat}");
    }
    assert!(host.cli(&["task", "list"]).contains("TASK"));
    assert_eq!(host.cli_json(&["task", "list"]), json!([]));
}

/// SR names are unique to the CLI, which takes them for ids: a second SR of one name is
/// refused (it made every later `--sr NAME` ambiguous). `sr destroy` removes an empty SR, and
/// refuses one that holds VDIs, saying so.
/// `SXM_TLS_CA` set empty is unset (the CLI failed with "TLS: : I/O error", naming neither
/// the variable nor a file); one naming a missing file says which variable named it.
#[test]
fn an_empty_sxm_tls_ca_is_unset_and_a_wrong_one_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, _sr) = host_with_sr(&dir);
    let with_ca = |ca: &str| Command::new(sxm()).arg("--host").arg(&host.socket).args(["sr", "list"]).env("SXM_TLS_CA", ca).output().expect("run sxm");
    let out = with_ca("");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = with_ca("/nonexistent/ca.pem");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("SXM_TLS_CA") && err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn sr_names_are_unique_and_an_empty_sr_can_be_destroyed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let name = host.cli_json(&["sr", "list"])[&sr]["name_label"].as_str().expect("name").to_owned();
    let out = host.cli_raw(&["sr", "create", "--type", "qcow2", "--name", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already"), "{err}");
    assert_eq!(host.cli_json(&["sr", "list"]).as_object().expect("srs").len(), 1, "a second SR was made");

    let other = host.cli(&["sr", "create", "--type", "qcow2", "--name", "scratch"]);
    let vdi = host.cli(&["vdi", "create", "--sr", "scratch", "--size", "1M", "--name", "v"]);
    let out = host.cli_raw(&["sr", "destroy", "--sr", "scratch"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("still holds VDIs"), "{out:?}");
    host.cli(&["vdi", "destroy", "--sr", "scratch", "--vdi", &vdi]);
    host.cli(&["sr", "destroy", "--sr", "scratch"]);
    let srs = host.cli_json(&["sr", "list"]);
    assert!(srs.get(&other).is_none() && srs.get(&sr).is_some(), "{srs}");
    assert!(!host.root.join("sr").join(&other).exists(), "the destroyed SR's folder is left");

    // An SR whose folder was removed by hand is listed with its error, and keeps no other SR
    // from being listed or found by name (both failed on its SR.stat).
    let broken = host.cli(&["sr", "create", "--type", "qcow2", "--name", "broken"]);
    std::fs::remove_dir_all(host.root.join("sr").join(&broken)).expect("remove the SR's folder");
    let table = host.cli(&["sr", "list"]);
    assert!(table.contains(&sr) && table.contains("unavailable"), "{table}");
    host.cli(&["vdi", "list", "--sr", &name]);
}

/// What the host keeps is its own: the root is 0700 (guests' disks, datapath sockets), and a
/// migration's record, which holds the destination host's secret in its URL, is 0600. Both
/// were readable by any local user. An imported image that reads through a backing file (any
/// file of this host, named in an image from elsewhere) is refused, and leaves no VDI.
#[test]
fn the_host_keeps_its_files_to_itself_and_imports_no_backing_files() {
    use std::os::unix::fs::PermissionsExt;
    require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&host.root), 0o700, "the host's root");
    let mut records = 0;
    for sub in ["srs", "state"] {
        for e in std::fs::read_dir(host.root.join(sub)).expect("records").flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
                records += 1;
            }
        }
    }
    assert!(records > 0, "no records looked at");

    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5a; MIB as usize]).expect("secret");
    let image = dir.path().join("evil.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&secret).arg(&image).arg("1M"));
    let before = vdi_ids(&host, &sr);
    let out = host.cli_raw(&["vdi", "import", "--sr", &sr, image.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("backing"), "{err}");
    assert_eq!(vdi_ids(&host, &sr), before, "a refused import left a VDI");
}

/// An SR record whose id could name a place outside the root, or another SR than its file's,
/// is not taken at start: one edited to `../../evil` had the host write its metadata into that
/// folder, delete a file there it took for an unused image, and destroy the whole folder on
/// `sr destroy`. The other SRs come up as they were.
#[test]
fn an_sr_record_naming_a_place_outside_the_root_is_not_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let other = host.cli(&["sr", "create", "--type", "qcow2", "--name", "other"]);
    let root = host.root.clone();
    host.kill();
    let evil = dir.path().join("evil");
    std::fs::create_dir_all(&evil).expect("evil");
    let planted = evil.join("12345678-1234-1234-1234-123456789abc.vhd");
    std::fs::write(&planted, b"precious").expect("plant");
    let record = root.join("srs").join(format!("{sr}.json"));
    let text = std::fs::read_to_string(&record).expect("record");
    let escaped = text.replace(&format!("\"{sr}\""), "\"../../evil\"");
    assert_ne!(escaped, text, "the record names its SR");
    std::fs::write(&record, escaped).expect("edit record");
    let host = Host::start(&root);
    let listed = host.call("SR.list", serde_json::json!({"dbg": "t"}));
    assert_eq!(listed, serde_json::json!([other]), "{listed}");
    assert_eq!(std::fs::read(&planted).expect("the planted file"), b"precious");
    let names: Vec<_> = std::fs::read_dir(&evil).expect("evil").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "the host wrote into a folder outside its root: {names:?}");
}

/// `DP.destroy` racing an activate of the same datapath lets go of it whoever wins: the
/// datapath's record and its process go together. (The activate could come in between the
/// destroy's deactivate and detach; with `allow_leak` the record went and the process stayed,
/// activated, keeping the VDI from `VDI.destroy`, and without it the destroy failed with a
/// transition it is allowed to make.)
#[test]
fn a_datapath_destroyed_while_it_is_activated_goes_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "8M", "--name", "raced"]);
    let dp = json!({"dbg": "t", "dp": "d", "sr": sr, "vdi": vdi, "vm": "vm"});
    let serving = || {
        let out = Command::new("pgrep").args(["-f", &format!("tapmirror serve .*{vdi}")]).output().expect("pgrep");
        !out.stdout.is_empty()
    };
    for allow_leak in [true, false] {
        for i in 0..25 {
            let mut attach = dp.clone();
            attach["read_write"] = json!(true);
            host.call("VDI.attach3", attach);
            // The activate may win or lose (refused once the datapath is gone): either is fine.
            std::thread::scope(|scope| {
                let activating = scope.spawn(|| host.jsonrpc("VDI.activate3", dp.clone()));
                let destroyed = host.jsonrpc("DP.destroy", json!({"dbg": "t", "dp": "d", "allow_leak": allow_leak}));
                assert!(destroyed.get("error").is_none(), "round {i}: DP.destroy failed: {destroyed}");
                activating.join().expect("activate");
            });
            // No process may serve a datapath that has no record.
            let dps = host.call("DP.stat_vdi", json!({"dbg": "t", "sr": sr, "vdi": vdi}))["dps"].clone();
            if dps == json!({}) {
                eventually(10, "the destroyed datapath's process went", || !serving());
            }
            host.call("DP.destroy", json!({"dbg": "t", "dp": "d", "allow_leak": false}));
        }
    }
    host.call("VDI.destroy", json!({"dbg": "t", "sr": sr, "vdi": vdi}));
}

/// A guest's raw disk is the guest's to write, header and all: one whose first bytes the guest
/// made a qcow2 header naming a backing file is refused by the magic bytes, and imported byte
/// for byte with `--format raw`.
#[test]
fn a_raw_disk_holding_an_image_header_imports_as_raw_when_named_so() {
    require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5a; MIB as usize]).expect("secret");
    let header = dir.path().join("header.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&secret).arg(&header).arg("1M"));
    let mut disk = pattern((4 * MIB) as usize, 9);
    let header = std::fs::read(&header).expect("header");
    disk[..header.len()].copy_from_slice(&header);
    let file = dir.path().join("guest.raw");
    std::fs::write(&file, &disk).expect("guest disk");

    let out = host.cli_raw(&["vdi", "import", "--sr", &sr, file.to_str().expect("path")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("backing"), "{out:?}");
    let imported = host.cli_json(&["vdi", "import", "--sr", &sr, "--format", "raw", file.to_str().expect("path")]);
    assert_eq!(imported["virtual_size"], json!(4 * MIB), "{imported}");
    let exported = dir.path().join("exported.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", imported["vdi"].as_str().expect("vdi"), exported.to_str().expect("path")]);
    assert!(std::fs::read(&exported).expect("exported") == disk, "the imported disk differs from the guest's raw file");
}

/// A damaged image (a qcow2 cut short, its data clusters past the new end) is refused by
/// `vdi import` and leaves no VDI behind: it used to import, the lost clusters read as zeroes,
/// though `tapmirror image check` knew. In both SR types.
#[test]
fn a_truncated_image_is_not_imported() {
    require!("qemu-img");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let sr3 = host.cli(&["sr", "create", "--type", "qcow2", "--name", "volumes"]);
    let raw = dir.path().join("data.raw");
    std::fs::write(&raw, pattern((4 * MIB) as usize, 23)).expect("data");
    let good = dir.path().join("good.qcow2");
    run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&good));
    let bytes = std::fs::read(&good).expect("image");
    let cut = dir.path().join("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("truncated image");
    // Cut inside its last data cluster only: that passed, and its last 512 bytes arrived as
    // zeroes.
    let cut_tail = dir.path().join("cut-tail.qcow2");
    std::fs::write(&cut_tail, &bytes[..bytes.len() - 512]).expect("truncated image");
    for sr in [&sr, &sr3] {
        let before = host.call("SR.scan", json!({"sr": sr, "dbg": "t"}));
        for cut in [&cut, &cut_tail] {
            let out = host.cli_raw(&["vdi", "import", "--sr", sr, cut.to_str().expect("path")]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "a truncated image was imported: {err}");
            assert!(err.contains("damaged") && err.contains("beyond the end of the file"), "{err}");
        }
        assert_eq!(host.call("SR.scan", json!({"sr": sr, "dbg": "t"})), before, "the refused import left a VDI");
        // The intact image imports.
        host.cli_json(&["vdi", "import", "--sr", sr, good.to_str().expect("path")]);
    }
}

/// An import or export stopped by a signal undoes itself: the import's VDI goes, the export's
/// file and datapath go, and no copy goes on writing. An import stopped with SIGINT or SIGTERM
/// used to leave a half-written VDI, attached, with its copy still writing into it under init;
/// an export left its datapath, which no CLI command let go of. (The copies are slowed by a
/// `tapmirror` that caps them at 1 MiB/s, so that the signals land in them.)
#[test]
fn an_import_or_export_stopped_by_a_signal_undoes_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let slow = dir.path().join("slow-tapmirror");
    std::fs::write(&slow, format!("#!/bin/sh\nif [ \"$1\" = copy ]; then exec {} \"$@\" --bwlimit 1M; fi\nexec {} \"$@\"\n", tapmirror().display(), tapmirror().display())).expect("wrapper");
    run(Command::new("chmod").arg("755").arg(&slow));
    let file = dir.path().join("data.raw");
    std::fs::write(&file, pattern((16 * MIB) as usize, 41)).expect("data");
    let copies_running = |path: &std::path::Path| {
        let out = Command::new("pgrep").arg("-f").arg(format!("copy .*{}", path.display())).output().expect("pgrep");
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    let stop_mid_copy = |args: &[&str], watched: &std::path::Path, signal: nix::sys::signal::Signal| {
        let child = Command::new(sxm())
            .arg("--host")
            .arg(&host.socket)
            .args(args)
            .env("SXM_TAPMIRROR", &slow)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sxm");
        eventually(30, "the copy under way", || copies_running(watched));
        std::thread::sleep(std::time::Duration::from_millis(500));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal");
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "a stopped {args:?} succeeded: {err}");
        assert!(err.contains(&format!("stopped by {signal}")), "{err}");
        assert!(!copies_running(watched), "the copy goes on after its CLI was stopped");
    };

    let before = vdi_ids(&host, &sr);
    for signal in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
        stop_mid_copy(&["vdi", "import", "--sr", &sr, file.to_str().expect("path")], &file, signal);
        assert_eq!(vdi_ids(&host, &sr), before, "the stopped import left its VDI");
    }

    let vdi = host.cli(&["vdi", "import", "--sr", &sr, "--format", "raw", file.to_str().expect("path")]);
    let out_file = dir.path().join("out.raw");
    stop_mid_copy(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, out_file.to_str().expect("path")], &out_file, nix::sys::signal::Signal::SIGINT);
    assert!(!out_file.exists(), "the stopped export left its file");
    let dps = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(dps["dps"], json!({}), "the stopped export left its datapath");
    // A datapath an export left (its CLI killed outright) is let go of by `vdi detach`.
    let uri = host.call("VDI.attach3", json!({"sr": sr, "vdi": vdi, "dp": format!("sxm-cli-export/{vdi}"), "vm": "0", "read_write": false, "dbg": "t"}));
    assert!(uri.is_object(), "{uri}");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
    let dps = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(dps["dps"], json!({}), "vdi detach kept the export's datapath");

    // A signal that comes as the copy ends finds it done: the export succeeds, its file whole.
    // (It said "stopped by SIGTERM" and kept the file.) Here the copy's process lingers 2 s
    // after the copy, ignoring the stop, and says when the copy is done.
    let done = dir.path().join("copied");
    let lingering = dir.path().join("lingering-tapmirror");
    std::fs::write(&lingering, format!("#!/bin/sh\nif [ \"$1\" = copy ]; then trap '' TERM; {} \"$@\"; rc=$?; touch {}; sleep 2; exit $rc; fi\nexec {} \"$@\"\n", tapmirror().display(), done.display(), tapmirror().display())).expect("wrapper");
    run(Command::new("chmod").arg("755").arg(&lingering));
    let out_file = dir.path().join("whole.raw");
    let child = Command::new(sxm())
        .arg("--host")
        .arg(&host.socket)
        .args(["vdi", "export", "--sr", &sr, "--vdi", &vdi, out_file.to_str().expect("path")])
        .env("SXM_TAPMIRROR", &lingering)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sxm");
    eventually(60, "the export's copy done", || done.exists());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("signal");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "an export whose copy was done failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&out_file).expect("the export's file") == std::fs::read(&file).expect("source"), "the export differs");
}

/// A name or description longer than 64 KiB is refused, saying so, and changes nothing: one of
/// 15 MiB was taken, made every `SR.scan` answer twice that, and kept the VDI from migrating.
#[test]
fn names_longer_than_64_kib_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "1M", "--name", "short"]);
    let long = "n".repeat((64 << 10) + 1);
    let scan = host.call("SR.scan", json!({"sr": sr, "dbg": "t"}));
    for (method, params) in [
        ("VDI.set_name_label", json!({"sr": sr, "vdi": vdi, "new_name_label": long, "dbg": "t"})),
        ("VDI.set_name_description", json!({"sr": sr, "vdi": vdi, "new_name_description": long, "dbg": "t"})),
        ("SR.set_name_label", json!({"sr": sr, "new_name_label": long, "dbg": "t"})),
        ("VDI.create", json!({"sr": sr, "vdi_info": {"vdi": "", "name_label": long, "virtual_size": 1048576}, "dbg": "t"})),
    ] {
        let reply = host.jsonrpc(method, params);
        assert!(reply["error"].to_string().contains("longer than the 65536 bytes an SR or VDI keeps"), "{method}: {reply}");
    }
    assert_eq!(host.call("SR.scan", json!({"sr": sr, "dbg": "t"})), scan, "a refused name changed the SR");
    // 64 KiB itself is taken.
    host.call("VDI.set_name_label", json!({"sr": sr, "vdi": vdi, "new_name_label": "n".repeat(64 << 10), "dbg": "t"}));
}

/// An import whose host is killed and started again under it waits for the host and ends as
/// an import should: whole and let go of, or failed and taken away. It gave up at once, leaving
/// its VDI behind, empty or whole, and often still attached.
#[test]
fn an_import_rides_out_a_restart_of_its_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut host, sr) = host_with_sr(&dir);
    let root = dir.path().join("host");
    let slow = dir.path().join("slow-tapmirror");
    std::fs::write(&slow, format!("#!/bin/sh\nif [ \"$1\" = copy ]; then exec {} \"$@\" --bwlimit 2M; fi\nexec {} \"$@\"\n", tapmirror().display(), tapmirror().display())).expect("wrapper");
    run(Command::new("chmod").arg("755").arg(&slow));
    let file = dir.path().join("data.raw");
    let data = pattern((8 * MIB) as usize, 43);
    std::fs::write(&file, &data).expect("data");
    let child = Command::new(sxm())
        .arg("--host")
        .arg(&host.socket)
        .args(["vdi", "import", "--sr", &sr, "--name", "riding", file.to_str().expect("path")])
        .env("SXM_TAPMIRROR", &slow)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sxm");
    let copying = || {
        let out = Command::new("pgrep").arg("-f").arg(format!("copy .*{}", file.display())).output().expect("pgrep");
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    eventually(30, "the copy under way", copying);
    host.kill();
    // The copy goes on into the datapath, which outlives its host; the host is still away
    // when it ends and the CLI lets the VDI go.
    eventually(60, "the copy ended", || !copying());
    std::thread::sleep(std::time::Duration::from_secs(1));
    host = Host::start(&root);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the import failed: {err}");
    assert!(err.contains("waits for it"), "{err}");
    let vdi = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(vdi_ids(&host, &sr), vec![vdi.clone()], "one VDI, the import's");
    let dps = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(dps["dps"], json!({}), "the import left its VDI attached");
    let out_file = dir.path().join("out.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, out_file.to_str().expect("path")]);
    assert!(std::fs::read(&out_file).expect("export") == data, "the imported VDI differs from the file");
}

/// A raw file whose size is no whole number of sectors imports into either SR type: the VDI is
/// the next whole sector, its bytes the file's and then zeroes. The copy failed with EINVAL at
/// its last, partial sector.
#[test]
fn a_file_of_no_whole_sectors_imports_padded_with_zeroes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, ext) = host_with_sr(&dir);
    let qcow2 = host.cli(&["sr", "create", "--type", "qcow2", "--name", "volumes"]);
    let file = dir.path().join("odd.raw");
    let bytes = pattern(1000, 6);
    std::fs::write(&file, &bytes).expect("file");
    for sr in [&ext, &qcow2] {
        let imported = host.cli_json(&["vdi", "import", "--sr", sr, file.to_str().expect("path")]);
        assert_eq!(imported["virtual_size"], json!(1024), "{imported}");
        let exported = dir.path().join(format!("out-{sr}.raw"));
        host.cli(&["vdi", "export", "--sr", sr, "--vdi", imported["vdi"].as_str().expect("vdi"), exported.to_str().expect("path")]);
        let mut want = bytes.clone();
        want.resize(1024, 0);
        assert!(std::fs::read(&exported).expect("exported") == want, "{sr}: the VDI is not the file's bytes then zeroes");
    }
    // An empty file is no disk: refused on either SR type, which made 2 MiB and 0 B of it.
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, b"").expect("file");
    for sr in [&ext, &qcow2] {
        let before = vdi_ids(&host, sr);
        let out = host.cli_raw(&["vdi", "import", "--sr", sr, empty.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("nothing to import"), "{sr}: {err}");
        assert_eq!(vdi_ids(&host, sr), before, "{sr}: the refused import made a VDI");
    }
}

#[test]
fn an_attached_vdi_is_read_and_written_through_its_nbd_uri() {
    require!("qemu-io", "nbdcopy", "nbdinfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "32M", "--name", "disk"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    assert!(uri.starts_with(&format!("nbd+unix:///{vdi}?socket=")), "{uri}");

    let size = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), (32 * MIB).to_string());
    // qemu-io writes at unaligned offsets and reads them back through its own client.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xa5 1536 70000", "-c", "read -P 0xa5 1536 70000", &uri]));
    // nbdcopy writes a whole pattern in and reads it out again.
    let data = pattern((32 * MIB) as usize, 9);
    let src = dir.path().join("in.raw");
    std::fs::write(&src, &data).expect("write");
    run(Command::new("nbdcopy").arg("--").arg(&src).arg(&uri));
    assert!(read_export(&uri, dir.path()) == data, "nbdcopy read back something else");

    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(stat["superstate"], json!(["Activated", "RW"]), "{stat}");
    let attach = host.call("DP.attach_info", json!({"sr": sr, "vdi": vdi, "dp": format!("sxm-cli/{vdi}"), "dbg": "t"}));
    assert_eq!(attach["implementations"][0][0], "Nbd", "{attach}");

    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(stat["superstate"], "Detached");
    let out = Command::new("nbdinfo").args(["--size", &uri]).output().expect("nbdinfo");
    assert!(!out.status.success(), "the export still answers after detach");
    // The data stays in the VDI.
    let exported = dir.path().join("out.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, exported.to_str().expect("path")]);
    assert!(std::fs::read(&exported).expect("read") == data);
}

/// The deprecated `VDI.attach`, which older xapis still call during a migration, answers
/// xapi's `attach_info` (a path and O_DIRECT), not the newer `backend`, and its path reaches
/// the disk.
#[test]
fn the_deprecated_attach_answers_an_attach_info() {
    require!("nbdinfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "disk"]);
    let out = host.python_xmlrpc(&format!(
        "r = proxy.VDI.attach({{'dbg': 't', 'dp': 'old', 'sr': '{sr}', 'vdi': '{vdi}', 'read_write': True}})\nprint(json.dumps(r))"
    ));
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(r["Status"], "Success", "{r}");
    let info = &r["Value"];
    assert_eq!((info["o_direct"].clone(), info["o_direct_reason"].clone(), info["xenstore_data"].clone()), (json!(true), json!(""), json!({})), "{info}");
    // xapi's NBD URI form, nbd:unix:SOCKET:exportname=NAME, as nbdinfo takes it.
    let params = info["params"].as_str().expect("params");
    let (socket, export) = params.strip_prefix("nbd:unix:").and_then(|p| p.split_once(":exportname=")).expect("an NBD URI");
    assert_eq!(export, vdi);
    host.call("VDI.activate", json!({"dbg": "t", "dp": "old", "sr": sr, "vdi": vdi}));
    let size = run(Command::new("nbdinfo").args(["--size", &format!("nbd+unix:///{export}?socket={socket}")]));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), (4 * MIB).to_string());
    host.call("DP.destroy", json!({"dp": "old", "allow_leak": false, "dbg": "t"}));
}

#[test]
fn a_snapshot_of_a_vdi_being_written_holds_the_instant_and_the_leaf_loses_nothing() {
    require!("qemu-io", "nbdcopy");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let size = 16 * MIB;
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "16M", "--name", "disk"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);

    // A known state A, a snapshot, then B over part of it.
    let a = pattern(size as usize, 1);
    let file_a = dir.path().join("a.raw");
    std::fs::write(&file_a, &a).expect("write a");
    run(Command::new("nbdcopy").arg("--").arg(&file_a).arg(&uri));
    let snap_a = host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &vdi, "--name", "A"]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5b 512 1048576", &uri]));
    let mut b = a.clone();
    b[512..512 + MIB as usize].fill(0x5b);

    // Now a guest writes without pause while a second snapshot is taken under it.
    let guest = Guest::start(uri.clone(), size, 77);
    std::thread::sleep(std::time::Duration::from_millis(300));
    host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &vdi, "--name", "live"]);
    guest.wait_for_more_writes(11);
    let (model, writes) = guest.stop();
    assert!(writes > 10, "the guest hardly wrote ({writes})");

    let leaf = read_export(&uri, dir.path());
    assert_matches_guest(&leaf, &model, &b, "leaf after a live snapshot");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);

    let snap_id = snap_a["vdi"].as_str().expect("id");
    let out = dir.path().join("snap.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", snap_id, out.to_str().expect("path")]);
    assert!(std::fs::read(&out).expect("snapshot") == a, "snapshot A does not hold A");
}

/// A backup's cycle, snapshot then destroy, repeated under a writing guest on both SR types:
/// each destroy coalesces the VDI with the base it leaves, so one image file remains, and the
/// guest loses no write.
#[test]
fn snapshot_and_destroy_cycles_under_a_writing_guest_leave_no_chain() {
    require!("nbdcopy");
    for ty in ["ext", "qcow2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = Host::start(&dir.path().join("host"));
        let sr = host.cli(&["sr", "create", "--type", ty, "--name", "local"]);
        let size = 16 * MIB;
        let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "16M", "--name", "disk"]);
        let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
        let guest = Guest::start(uri.clone(), size, 91);
        for cycle in 0..5 {
            guest.wait_for_more_writes(5);
            let snap = host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &vdi, "--name", &format!("backup {cycle}")]);
            guest.wait_for_more_writes(5);
            host.cli(&["vdi", "destroy", "--sr", &sr, "--vdi", snap["vdi"].as_str().expect("id")]);
            let images: Vec<String> =
                host.files().into_iter().map(|(n, _)| n).filter(|n| n.ends_with(".vhd") || n.ends_with(".qcow2")).collect();
            assert_eq!(images.len(), 1, "{ty} cycle {cycle}: {images:?}");
        }
        guest.wait_for_more_writes(5);
        let (model, writes) = guest.stop();
        assert!(writes > 20, "{ty}: the guest hardly wrote ({writes})");
        assert_matches_guest(&read_export(&uri, dir.path()), &model, &vec![0u8; size as usize], &format!("{ty}: the disk after the cycles"));
        host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
    }
}

/// A host killed inside a snapshot, or between a destroy and its coalesce, leaves a VDI on a
/// hidden layer with no other child, which the host adopts from the files when it starts
/// again. No later destroy looked at that pair: each such crash cost the VDI a chain level
/// for good, up to the 30 that refuse its next snapshot. Such pairs are folded at attach.
#[test]
fn a_layer_a_crash_left_under_a_vdi_is_folded_when_the_host_starts_again() {
    for (ty, ext) in [("ext", "vhd"), ("qcow2", "qcow2")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("host");
        let host = Host::start(&root);
        let sr = host.cli(&["sr", "create", "--type", ty, "--name", "local"]);
        let data = pattern((4 * MIB) as usize, 61);
        let file = dir.path().join("seed.raw");
        std::fs::write(&file, &data).expect("seed");
        let vdi = host.cli_json(&["vdi", "import", "--sr", &sr, "--format", "raw", file.to_str().expect("path")])["vdi"].as_str().expect("vdi").to_owned();
        host.kill();
        // What a snapshot killed after its rename leaves: the VDI's data in a file no record
        // names, under a new file in the VDI's place.
        let folder = root.join("sr").join(&sr);
        let (top, base) = (folder.join(format!("{vdi}.{ext}")), folder.join(format!("{}.{ext}", uuid::Uuid::new_v4())));
        std::fs::rename(&top, &base).expect("rename");
        run(Command::new(tapmirror()).args(["image", "create", ext]).arg(&top).arg("--parent").arg(&base));
        let host = Host::start(&root);
        let images: Vec<String> = host.files().into_iter().map(|(n, _)| n).filter(|n| n.ends_with(&format!(".{ext}"))).collect();
        assert_eq!(images.len(), 1, "{ty}: the adopted layer stayed under the VDI: {images:?}");
        let out = dir.path().join("out.raw");
        host.cli(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, out.to_str().expect("path")]);
        assert!(std::fs::read(&out).expect("export") == data, "{ty}: the VDI changed");
    }
}

#[test]
fn a_restarted_host_takes_up_its_datapaths_and_the_guest_never_notices() {
    require!("nbdcopy");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let size = 16 * MIB;
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "16M", "--name", "disk"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    let before = host.files();
    let guest = Guest::start(uri.clone(), size, 3);
    std::thread::sleep(std::time::Duration::from_millis(300));

    // SIGKILL: no chance to clean up. The datapath keeps serving the guest meanwhile.
    let root = host.root.clone();
    host.kill();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let host = Host::start(&root);
    guest.wait_for_more_writes(11);
    let (model, writes) = guest.stop();
    assert!(writes > 10, "the guest hardly wrote ({writes})");

    // Everything is as it was: the SR attached, the VDI active on its datapath.
    assert_eq!(host.call("SR.list", json!({"dbg": "t"})), json!([sr]));
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(stat["superstate"], json!(["Activated", "RW"]), "{stat}");
    let after: Vec<String> = host.files().into_iter().map(|(n, _)| n).filter(|n| !n.ends_with(".vhd")).collect();
    let before: Vec<String> = before.into_iter().map(|(n, _)| n).filter(|n| !n.ends_with(".vhd")).collect();
    assert_eq!(after, before, "files under the root changed across the restart");

    let disk = read_export(&uri, dir.path());
    assert_matches_guest(&disk, &model, &vec![0u8; size as usize], "disk after the host restarted");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
}

/// The pids of the host's `tapmirror serve` processes, by the socket each serves.
fn datapath_pids(root: &std::path::Path) -> std::collections::BTreeMap<String, i32> {
    let mut pids = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "serve.pid") {
                let Ok(bytes) = std::fs::read(&path) else { continue };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
                let socket = path.with_file_name("nbd.sock").display().to_string();
                pids.insert(socket, v["pid"].as_i64().expect("pid") as i32);
            }
        }
    }
    pids
}

fn is_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// A datapath whose process dies (a crash, the OOM killer) is started again by the host on the
/// same socket and in the state it was in: the active disk (VHD) takes I/O again with what was
/// written before, the attached-only one (qcow2) stays paused, and both detach as usual.
#[test]
fn a_datapath_whose_process_dies_is_restarted_in_its_state() {
    require!("qemu-io", "nbdinfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let active = host.cli(&["vdi", "create", "--sr", &sr, "--size", "8M", "--name", "active"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &active]);
    // The other on a qcow2 SR: both backends restart their own.
    let sr3 = host.cli(&["sr", "create", "--type", "qcow2", "--name", "volumes"]);
    let idle = host.cli(&["vdi", "create", "--sr", &sr3, "--size", "8M", "--name", "idle"]);
    host.call("VDI.attach3", json!({"dp": "idle-dp", "sr": sr3, "vdi": idle, "vm": "vm", "read_write": true, "dbg": "t"}));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 4096 1048576", &uri]));
    let before = datapath_pids(&host.root);
    assert_eq!(before.len(), 2, "{before:?}");

    for pid in before.values() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    }
    // A new pid file comes before the new process listens (the host writes it first, then
    // waits for readiness): restarted means its sockets are there too, the NBD one bound
    // before the control one.
    eventually(30, "both datapaths restarted", || {
        let now = datapath_pids(&host.root);
        now.len() == 2
            && now.iter().all(|(socket, pid)| {
                let control = std::path::Path::new(socket).with_file_name("control.sock");
                before.get(socket).is_some_and(|old| old != pid) && is_alive(*pid) && control.exists()
            })
    });

    // The active one serves again, on the same URI, with what was written before it died.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 4096 1048576", "-c", "write -P 0x4d 2097152 4096", "-c", "read -P 0x4d 2097152 4096", &uri]));
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": active, "dbg": "t"}));
    assert_eq!(stat["superstate"], json!(["Activated", "RW"]), "{stat}");
    // The attached-only one is paused again: its control socket says so.
    let idle_socket = datapath_pids(&host.root).into_keys().find(|s| !uri.contains(s.as_str())).expect("the idle datapath");
    let control = std::path::Path::new(&idle_socket).with_file_name("control.sock");
    // The host pauses a restarted process after it answers (it starts serving, as any
    // `tapmirror serve` does): a socket that answers does not mean the pause has come yet.
    let stats = || {
        let out = run(Command::new(tapmirror()).arg("ctl").arg(&control).arg("stats"));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("stats JSON")
    };
    eventually(30, "the attached-only datapath paused again", || stats()["paused"] == json!(true));

    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &active]);
    host.call("DP.destroy", json!({"dp": "idle-dp", "allow_leak": false, "dbg": "t"}));
    assert!(datapath_pids(&host.root).is_empty(), "datapaths left after detach");
}

/// A VDI deactivated (or activated) just as its datapath's process died: the call succeeds,
/// and the restarted process is in the state the call asked for. Deactivated, it came back
/// taking the guest's writes though recorded inactive (after a restart of the host, which
/// goes by the record, the guest's I/O hung); activated, the call failed (a failed
/// switch-over's undo could not give the guest its disk back).
#[test]
fn a_datapath_that_dies_as_it_is_deactivated_or_activated_comes_back_as_asked() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "8M", "--name", "disk"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    let dp = format!("sxm-cli/{vdi}");
    let control = || {
        let socket = datapath_pids(&host.root).into_keys().next().expect("a datapath");
        std::path::Path::new(&socket).with_file_name("control.sock")
    };
    let paused = || {
        let out = Command::new(tapmirror()).arg("ctl").arg(control()).arg("stats").output().expect("ctl");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().map(|s| s["paused"] == json!(true))
    };
    // Kills the datapath, makes `call` at once, and waits for the host to restart it.
    let kill_then = |call: &str| {
        let before = datapath_pids(&host.root);
        let pid = *before.values().next().expect("a datapath");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
        host.call(call, json!({"dp": dp, "sr": sr, "vdi": vdi, "dbg": "t"}));
        eventually(30, "the datapath restarted", || datapath_pids(&host.root).values().next().is_some_and(|p| *p != pid && is_alive(*p)));
    };
    kill_then("VDI.deactivate");
    eventually(30, "the restarted datapath answers", || paused().is_some());
    // Give the host the time it took to unpause it wrongly, then look again.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(paused(), Some(true), "a deactivated VDI's restarted datapath takes I/O");
    kill_then("VDI.activate");
    eventually(30, "the restarted datapath takes I/O", || paused() == Some(false));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5e 0 4096", "-c", "read -P 0x5e 0 4096", &uri]));
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(stat["superstate"], json!(["Activated", "RW"]), "{stat}");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
}

/// A host whose stdout and log cannot be written (their file system full: here `/dev/full`)
/// runs on and answers, its datapaths too: a log line that fails is lost, nothing else (the
/// default report of a failed log write, `eprintln!`, panicked on the first line).
#[test]
fn a_host_whose_log_cannot_be_written_runs_on() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("host");
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let mut child = Command::new(sxm())
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--tapmirror")
        .arg(tapmirror())
        .env("RUST_LOG", "debug")
        .stdout(full())
        .stderr(full())
        .spawn()
        .expect("spawn");
    let socket = root.join("sxm.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() {
        assert!(child.try_wait().expect("try_wait").is_none(), "the host died at start");
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let cli = |args: &[&str]| {
        let out = Command::new(sxm()).arg("--host").arg(&socket).args(args).output().expect("sxm");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let sr = cli(&["sr", "create", "--name", "local"]);
    let vdi = cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "disk"]);
    let uri = cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x4e 0 64k", "-c", "read -P 0x4e 0 64k", &uri]));
    cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
    assert!(child.try_wait().expect("try_wait").is_none(), "the host died");
    let _ = child.kill();
    let _ = child.wait();
}

/// A guest that fills the file system holding both its SR and the host's state gets ENOSPC,
/// and its disk can still be detached: the datapath table is written with the state folder's
/// reserve (it once failed with "No space left on device", so no disk could be let go until
/// someone freed space by hand).
#[test]
fn a_disk_that_filled_the_hosts_file_system_still_detaches() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("host");
    let Some(_small) = Tmpfs::mount(&root, "24m") else {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    };
    let host = Host::start(&root);
    let sr = host.cli(&["sr", "create", "--type", "ext", "--name", "small"]);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "64M", "--name", "disk"]);
    let uri = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3a 0 48M", &uri]).output().expect("qemu-io");
    assert!(String::from_utf8_lossy(&out.stdout).contains("No space left") || !out.status.success(), "the guest filled nothing: {out:?}");
    assert!(tapmirror::testkit::no_room_in(&root), "the file system is not full");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": vdi, "dbg": "t"}));
    assert_eq!(stat["superstate"], "Detached", "{stat}");
}

/// Two VMs sharing one read-only disk start and stop at once, over and over: every attach,
/// activate and destroy of their datapaths succeeds, every read after an activate is answered,
/// and at the end the disk is detached and destroyable. (Interleaved, one datapath's detach
/// once stopped the process the other's attach had just found running, leaving a record with
/// no process; and a deactivate paused the process the other had just activated.)
#[test]
fn two_datapaths_of_one_disk_changing_at_once_never_wedge_it() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "shared"]);
    let snap = host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &vdi, "--name", "ro"])["vdi"].as_str().expect("id").to_owned();
    std::thread::scope(|s| {
        for vm in ["vm1", "vm2"] {
            let (host, sr, snap) = (&host, &sr, &snap);
            s.spawn(move || {
                let dp = format!("{vm}/xvda");
                for round in 0..15 {
                    let args = json!({"dp": dp, "sr": sr, "vdi": snap, "vm": vm, "read_write": false, "dbg": "t"});
                    let info = host.call("VDI.attach3", args.clone());
                    host.call("VDI.activate3", args);
                    let uri = info["implementations"][0][1]["uri"].as_str().expect("uri").to_owned();
                    let (socket, export) = uri.strip_prefix("nbd:unix:").and_then(|p| p.split_once(":exportname=")).expect("nbd uri");
                    let out = Command::new("timeout")
                        .args(["20", "qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", &format!("nbd+unix:///{export}?socket={socket}")])
                        .output()
                        .expect("qemu-io");
                    assert!(out.status.success(), "{vm} round {round}: a read after activate: {out:?}");
                    host.call("DP.destroy2", json!({"dp": dp, "sr": sr, "vdi": snap, "vm": vm, "allow_leak": false, "dbg": "t"}));
                }
            });
        }
    });
    let stat = host.call("DP.stat_vdi", json!({"sr": sr, "vdi": snap, "dbg": "t"}));
    assert_eq!(stat["superstate"], "Detached", "{stat}");
    host.cli(&["vdi", "destroy", "--sr", &sr, "--vdi", &snap]);
}

/// One host per root: a second `sxm serve` on a root in use is refused (it would take up the
/// first one's datapaths and overwrite its records), and the first goes on serving.
#[test]
fn a_second_host_on_the_same_root_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let mut second = Command::new(sxm())
        .args(["serve", "--root"])
        .arg(&host.root)
        .args(["--listen", "127.0.0.1:0", "--socket"])
        .arg(dir.path().join("second.sock"))
        .arg("--tapmirror")
        .arg(tapmirror())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run a second sxm serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while second.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second host started on the same root");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = second.wait_with_output().expect("second host's output");
    assert!(!out.status.success(), "a second host started on the same root");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sxm serve runs on"), "{err}");
    assert!(!dir.path().join("second.sock").exists());
    assert_eq!(host.call("SR.list", json!({"dbg": "t"})), json!([sr]));
}

/// An admin command piped into a reader that has gone (`sxm --json sr list | true`) ends
/// quietly, as `ls` does: no panic on the broken pipe.
#[test]
fn a_cli_whose_reader_has_gone_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, _sr) = host_with_sr(&dir);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(sxm()).arg("--host").arg(&host.socket).args(["--json", "sr", "list"]).stdout(writer).output().expect("run sxm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(13), "ends by SIGPIPE, as a pipeline expects: {:?}", out.status);
    // A host that hangs up on it is another matter: an https:// URL naming the plain port
    // (whose answer to the TLS greeting is to close) is an error said, not a silent death by
    // SIGPIPE (exit 141, nothing printed).
    let out = Command::new(sxm()).args(["--host", &host.tcp.replace("http://", "https://"), "--secret-file"]).arg(host.root.join("secret")).args(["sr", "list"]).output().expect("run sxm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), out.status.signal()), (Some(1), None), "{err}");
    assert!(err.contains("TLS") && err.contains("name it http://"), "{err}");
    // Output that cannot be written (a full disk) is an error said, exit 1, not a panic.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let out = Command::new(sxm()).arg("--host").arg(&host.socket).args(["sr", "list"]).stdout(full).output().expect("run sxm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing the output") && !err.contains("panicked"), "{err}");
}

/// `Query.query` advertises only what the host answers: `SR.probe` is unimplemented, so
/// no `SR_PROBE`; `VDI.snapshot` works, so `VDI_SNAPSHOT`.
#[test]
fn query_advertises_only_what_is_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, _sr) = host_with_sr(&dir);
    let features = host.call("Query.query", json!({"dbg": "t"}))["features"].clone();
    let has = |f: &str| features.as_array().is_some_and(|a| a.iter().any(|x| x == f));
    let probe = host.jsonrpc("SR.probe", json!({"dbg": "t", "queue": "q", "device_config": {}, "sm_config": {}}));
    assert_eq!(has("SR_PROBE"), probe.get("error").is_none(), "SR_PROBE advertised: {}, SR.probe answered: {probe}", has("SR_PROBE"));
    assert!(has("VDI_SNAPSHOT") && has("SR_TYPE/ext") && has("SR_TYPE/qcow2"), "{features}");
}

#[test]
fn bad_calls_get_the_right_error_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "1M", "--name", "disk"]);
    let before = host.files();
    let error_of = |reply: &serde_json::Value| serde_json::to_string(&reply["error"]).expect("error");

    // Unknown and unserved methods.
    let e = error_of(&host.jsonrpc("VDI.frobnicate", json!({"dbg": "x"})));
    assert!(e.contains("Unimplemented") && e.contains("VDI.frobnicate"), "{e}");
    let e = error_of(&host.jsonrpc("VDI.enable_cbt", json!({"dbg": "x", "sr": sr, "vdi": vdi})));
    assert!(e.contains("Unimplemented"), "{e}");
    // Wrong types and missing arguments.
    let e = error_of(&host.jsonrpc("VDI.resize", json!({"dbg": "x", "sr": sr, "vdi": vdi, "new_size": "huge"})));
    assert!(e.contains("Internal_error") && e.contains("new_size"), "{e}");
    let e = error_of(&host.jsonrpc("VDI.stat", json!({"dbg": "x", "sr": sr})));
    assert!(e.contains("Internal_error") && e.contains("missing vdi"), "{e}");
    let e = error_of(&host.jsonrpc("VDI.create", json!({"dbg": "x", "sr": sr, "vdi_info": "not a record"})));
    assert!(e.contains("Internal_error") && e.contains("vdi_info"), "{e}");
    // Names that would leave the SR.
    for bad in ["../../secret", "..", "/etc/passwd", ""] {
        let e = error_of(&host.jsonrpc("VDI.destroy", json!({"dbg": "x", "sr": sr, "vdi": bad})));
        assert!(e.contains("does_not_exist") || e.contains("Does_not_exist"), "{bad:?}: {e}");
        let e = error_of(&host.jsonrpc("VDI.stat", json!({"dbg": "x", "sr": sr, "vdi": bad})));
        assert!(e.to_lowercase().contains("does_not_exist"), "{bad:?}: {e}");
    }
    let e = error_of(&host.jsonrpc("SR.create", json!({"dbg": "x", "sr": "../escape", "device_config": {}})));
    assert!(e.contains("Backend_error"), "{e}");
    let e = error_of(&host.jsonrpc("SR.scan", json!({"dbg": "x", "sr": "../../.."})));
    assert!(e.contains("No_storage_plugin_for_sr"), "{e}");
    let e = error_of(&host.jsonrpc("SR.create", json!({"dbg": "x", "sr": "s2", "device_config": {"type": "zfs"}})));
    assert!(e.contains("No_storage_plugin_for_sr"), "{e}");
    // Malformed bodies, over both transports and encodings.
    let (status, reply) = host.post_unix("/jsonrpc", "{\"method\": ");
    assert!(status == 200 || status == 400, "{status}: {reply}");
    assert!(reply.contains("Internal_error") || reply.contains("-32700"), "{reply}");
    let (status, reply) = host.post_tcp(&format!("/services/SM?session_id={}", host.secret), "<methodCall><methodName>SR.list", "text/xml");
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("Failure") && reply.contains("Internal_error"), "{reply}");
    // Unauthenticated and wrongly authenticated TCP calls.
    let body = json!({"method": "VDI.destroy", "params": [{"dbg": "x", "sr": sr, "vdi": vdi}], "id": 1}).to_string();
    let (status, _) = host.post_tcp("/jsonrpc", &body, "application/json");
    assert_eq!(status, 401);
    let (status, _) = host.post_tcp("/jsonrpc?session_id=wrong", &body, "application/json");
    assert_eq!(status, 401);
    // An oversized body.
    let big = format!("{{\"method\":\"SR.list\",\"params\":[{{\"dbg\":\"{}\"}}],\"id\":1}}", "x".repeat(17 << 20));
    let path = dir.path().join("big.json");
    std::fs::write(&path, big).expect("write");
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", host.socket.to_str().expect("utf-8"), "-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", path.display()))
        .arg("http://localhost/jsonrpc")
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "413");

    // The CLI says what is wrong and exits non-zero.
    let out = host.cli_raw(&["vdi", "snapshot", "--sr", &sr, "--vdi", "../../secret"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no VDI \"../../secret\""), "{err}");

    // Nothing changed, and the host still answers.
    assert_eq!(host.files(), before, "a bad call changed files under the root");
    assert_eq!(vdi_ids(&host, &sr), vec![vdi]);
}

/// Writes `byte` over the first MiB of `vdi` through a datapath `dp`, then lets go of it.
fn write_first_mib(host: &Host, sr: &str, vdi: &str, byte: u8) {
    let uri = host.cli(&["vdi", "attach", "--sr", sr, "--vdi", vdi]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {byte} 0 1M"), &uri]));
    host.cli(&["vdi", "detach", "--sr", sr, "--vdi", vdi]);
}

/// Whether the first MiB of `vdi` holds `byte`, read through a datapath.
fn first_mib_is(host: &Host, sr: &str, vdi: &str, byte: u8) -> bool {
    let uri = host.cli(&["vdi", "attach", "--sr", sr, "--vdi", vdi, "--read-only"]);
    let ok = Command::new("qemu-io").args(["-r", "-f", "raw", "-c", &format!("read -P {byte} 0 1M"), &uri]).output().expect("qemu-io");
    host.cli(&["vdi", "detach", "--sr", sr, "--vdi", vdi]);
    ok.status.success() && !String::from_utf8_lossy(&ok.stdout).contains("Pattern verification failed")
}

/// The calls an orchestrator makes around a VM's start and stop, and its cleanups, behave as
/// xapi's: a non-persistent VDI is reset at each `VDI.epoch_begin` to what it held when it was
/// made so, on both SR types; repeated or misdirected cleanups succeed; names XML cannot carry
/// are refused, so `SR.scan` over XML-RPC keeps working.
#[test]
fn vm_start_and_cleanup_calls_behave_as_xapis() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let host = Host::start(&dir.path().join("host"));
    let features = host.call("Query.query", json!({"dbg": "t"}))["features"].clone();
    for f in ["VDI_MIRROR_IN", "VDI_RESET_ON_BOOT/2"] {
        assert!(features.as_array().is_some_and(|a| a.iter().any(|x| x == f)), "{f} not in {features}");
    }
    for ty in ["ext", "qcow2"] {
        let sr = host.cli(&["sr", "create", "--type", ty, "--name", ty]);
        let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "desktop"]);
        let begin = json!({"dbg": "t", "sr": sr, "vdi": vdi, "vm": "vm1", "persistent": false});
        let end = json!({"dbg": "t", "sr": sr, "vdi": vdi, "vm": "vm1"});

        // Persistent: epoch_begin and epoch_end change nothing.
        write_first_mib(&host, &sr, &vdi, 0x11);
        host.call("VDI.epoch_begin", begin.clone());
        host.call("VDI.epoch_end", end.clone());
        assert!(first_mib_is(&host, &sr, &vdi, 0x11), "{ty}: a persistent VDI changed");

        // Non-persistent: each epoch starts from the content it had when made so.
        host.call("VDI.set_persistent", json!({"dbg": "t", "sr": sr, "vdi": vdi, "persistent": false}));
        assert_eq!(host.call("VDI.stat", json!({"dbg": "t", "sr": sr, "vdi": vdi}))["persistent"], json!(false));
        for boot in 0..3u8 {
            host.call("VDI.epoch_begin", begin.clone());
            assert!(first_mib_is(&host, &sr, &vdi, 0x11), "{ty}: boot {boot} did not start from the reset point");
            write_first_mib(&host, &sr, &vdi, 0x20 + boot);
            assert!(first_mib_is(&host, &sr, &vdi, 0x20 + boot), "{ty}: the boot's writes are not there during it");
            host.call("VDI.epoch_end", end.clone());
        }
        // Never reset under a datapath that holds it.
        host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
        let e = host.jsonrpc("VDI.epoch_begin", begin.clone());
        assert!(e["error"].to_string().contains("VDI_IN_USE"), "{ty}: {e}");
        host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);
        assert!(first_mib_is(&host, &sr, &vdi, 0x22), "{ty}: the refused reset changed the VDI");
        // A caller that says persistent (it never heard set_persistent false succeed) gets no
        // reset.
        write_first_mib(&host, &sr, &vdi, 0x23);
        host.call("VDI.epoch_begin", json!({"dbg": "t", "sr": sr, "vdi": vdi, "vm": "vm1", "persistent": true}));
        assert!(first_mib_is(&host, &sr, &vdi, 0x23), "{ty}: reset though the caller said persistent");
        // A snapshot of it starts persistent, and is never reset; nor is the VDI through it.
        let snap = host.call("VDI.snapshot", json!({"dbg": "t", "sr": sr, "vdi_info": {"vdi": vdi, "name_label": "snap"}}));
        assert_eq!(snap["persistent"], json!(true), "{ty}: {snap}");
        let nonpersistent_begin = |v: &str| json!({"dbg": "t", "sr": sr, "vdi": v, "vm": "vm1", "persistent": false});
        host.call("VDI.epoch_begin", nonpersistent_begin(snap["vdi"].as_str().expect("snap id")));
        assert!(first_mib_is(&host, &sr, snap["vdi"].as_str().expect("snap id"), 0x23), "{ty}: the snapshot was reset");
        assert!(first_mib_is(&host, &sr, &vdi, 0x23), "{ty}: the VDI lost what its snapshot holds");
        // It does not migrate: its reset point would not travel with it.
        let e = host.jsonrpc(
            "DATA.MIRROR.start",
            json!({"dbg": "t", "sr": sr, "vdi": vdi, "dp": "d", "url": "http://127.0.0.1:9?session_id=x", "dest": "other"}),
        );
        assert!(e["error"].to_string().contains("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"), "{ty}: {e}");
        // Reset again: to the content of the snapshot's instant, its new reset point (as SM's
        // reset_leaf does after a snapshot).
        write_first_mib(&host, &sr, &vdi, 0x24);
        host.call("VDI.epoch_begin", nonpersistent_begin(&vdi));
        assert!(first_mib_is(&host, &sr, &vdi, 0x23), "{ty}: not reset to the snapshot's instant");
        // Persistent again: its content stays.
        write_first_mib(&host, &sr, &vdi, 0x22);
        host.call("VDI.set_persistent", json!({"dbg": "t", "sr": sr, "vdi": vdi, "persistent": true}));
        host.call("VDI.epoch_begin", begin.clone());
        assert!(first_mib_is(&host, &sr, &vdi, 0x22), "{ty}: a VDI made persistent again was reset");

        // Cleanups: a deactivate of what a datapath does not hold, a DP.destroy2 naming
        // another VDI, a read-only attach on a read-write datapath.
        host.call("VDI.deactivate", json!({"dbg": "t", "dp": "never", "sr": sr, "vdi": vdi, "vm": "vm1"}));
        host.call("VDI.attach3", json!({"dbg": "t", "dp": "d1", "sr": sr, "vdi": vdi, "vm": "vm1", "read_write": true}));
        host.call("VDI.attach3", json!({"dbg": "t", "dp": "d1", "sr": sr, "vdi": vdi, "vm": "vm1", "read_write": false}));
        host.call("VDI.activate3", json!({"dbg": "t", "dp": "d1", "sr": sr, "vdi": vdi, "vm": "vm1"}));
        host.call("DP.destroy2", json!({"dbg": "t", "dp": "d1", "sr": sr, "vdi": "another", "vm": "vm1", "allow_leak": false}));
        let stat = host.call("DP.stat_vdi", json!({"dbg": "t", "sr": sr, "vdi": vdi}));
        assert_eq!(stat["superstate"], "Detached", "{ty}: DP.destroy2 left the datapath: {stat}");

        // get_by_name finds by location (the id), not by name_label.
        assert_eq!(host.call("VDI.get_by_name", json!({"dbg": "t", "sr": sr, "name": vdi}))["vdi"], json!(vdi));
        let e = host.jsonrpc("VDI.get_by_name", json!({"dbg": "t", "sr": sr, "name": "desktop"}));
        assert!(e["error"].to_string().contains("Vdi_does_not_exist"), "{ty}: {e}");

        // A name XML cannot carry is refused; XML-RPC scans still parse.
        let e = host.jsonrpc("VDI.create", json!({"dbg": "t", "sr": sr, "vdi_info": {"vdi": "", "name_label": "a\u{1}b", "virtual_size": 1048576}}));
        assert!(e["error"].to_string().contains("SR_BACKEND_FAILURE_447"), "{ty}: {e}");
        let e = host.jsonrpc("VDI.set_name_label", json!({"dbg": "t", "sr": sr, "vdi": vdi, "new_name_label": "q\u{1f}"}));
        assert!(e["error"].to_string().contains("SR_BACKEND_FAILURE_447"), "{ty}: {e}");
        let names = host.python_xmlrpc(&format!("r = proxy.SR.scan({{'dbg': 't', 'sr': '{sr}'}})\nprint(json.dumps([v['name_label'] for v in r['Value']]))"));
        assert!(names.contains("\"desktop\"") && names.contains("\"snap\""), "{ty}: {names}");
    }
    // An SR detached twice: the second is told it is not attached, as xapi answers.
    let sr = host.cli(&["sr", "create", "--type", "ext", "--name", "spare"]);
    host.call("SR.detach", json!({"dbg": "t", "sr": sr}));
    let e = host.jsonrpc("SR.detach", json!({"dbg": "t", "sr": sr}));
    assert!(e["error"].to_string().contains("Sr_not_attached"), "{e}");
    // Created non-persistent, a VDI has no reset point: it is made persistent, as SM does, so
    // a VM's epoch_begin on it (a copy of a non-persistent VDI, say) boots.
    for ty in ["ext", "qcow2"] {
        let sr = host.cli(&["sr", "create", "--type", ty, "--name", &format!("{ty}-2")]);
        let made = host.call("VDI.create", json!({"dbg": "t", "sr": sr, "vdi_info": {"vdi": "", "name_label": "np", "virtual_size": 1048576, "persistent": false}}));
        assert_eq!(made["persistent"], json!(true), "{ty}: {made}");
        host.call("VDI.epoch_begin", json!({"dbg": "t", "sr": sr, "vdi": made["vdi"], "vm": "vm", "persistent": false}));
    }
    let diagnostics = host.call("Query.diagnostics", json!({"dbg": "t"}));
    assert!(diagnostics.as_str().is_some_and(|d| d.contains("type ext") && d.contains("type qcow2")), "{diagnostics}");
}

/// The CLI says what to do when a VDI is attached in another mode, and an export never lets go
/// of a datapath the user attached.
#[test]
fn the_cli_explains_attach_modes_and_export_keeps_the_users_datapath() {
    require!("nbdinfo");
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "disk"]);
    host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi]);
    let out = host.cli_raw(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, dir.path().join("x.raw").to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("attached read-write") && err.contains("snapshot"), "{err}");
    let out = host.cli_raw(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi, "--read-only"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("detach it first"), "{err}");
    // xapi's codes come with what they mean.
    let out = host.cli_raw(&["vdi", "destroy", "--sr", &sr, "--vdi", &vdi]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VDI_IN_USE") && err.contains("detach it first"), "{err}");
    let snap = host.cli_json(&["vdi", "snapshot", "--sr", &sr, "--vdi", &vdi])["vdi"].as_str().expect("snapshot").to_owned();
    let out = host.cli_raw(&["vdi", "attach", "--sr", &sr, "--vdi", &snap]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VDI_READONLY") && err.contains("--read-only"), "{err}");
    host.cli(&["vdi", "detach", "--sr", &sr, "--vdi", &vdi]);

    // Attached read-only by the user, exported: still attached and serving afterwards.
    let uri_ro = host.cli(&["vdi", "attach", "--sr", &sr, "--vdi", &vdi, "--read-only"]);
    let out_file = dir.path().join("out.raw");
    host.cli(&["vdi", "export", "--sr", &sr, "--vdi", &vdi, out_file.to_str().expect("path")]);
    assert_eq!(std::fs::metadata(&out_file).expect("exported").len(), 4 * MIB);
    let size = run(Command::new("nbdinfo").args(["--size", &uri_ro]));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), (4 * MIB).to_string(), "the user's datapath went with the export");
}

/// An admin names SRs and VDIs by name as well as by id; a name two of them share is refused
/// with the ids to choose from.
#[test]
fn the_cli_takes_names_for_srs_and_vdis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, sr) = host_with_sr(&dir);
    let vdi = host.cli(&["vdi", "create", "--sr", "local", "--size", "1M", "--name", "boot"]);
    let listed = host.cli_json(&["vdi", "list", "--sr", "local"]);
    assert_eq!(listed[0]["vdi"], json!(vdi), "{listed}");
    let snap = host.cli_json(&["vdi", "snapshot", "--sr", "local", "--vdi", "boot", "--name", "boot-snap"]);
    assert_eq!(snap["snapshot_of"], json!(vdi), "{snap}");
    // Two named alike: refused, naming both.
    let other = host.cli(&["vdi", "create", "--sr", &sr, "--size", "1M", "--name", "boot"]);
    let out = host.cli_raw(&["vdi", "destroy", "--sr", "local", "--vdi", "boot"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&vdi) && err.contains(&other), "{err}");
    assert_eq!(vdi_ids(&host, &sr).len(), 3, "nothing was destroyed");
    host.cli(&["vdi", "destroy", "--sr", "local", "--vdi", &other]);
    assert_eq!(vdi_ids(&host, &sr).len(), 2);
    // Something shaped like an id is only ever an id, and an empty name names nothing: a
    // retried destroy never takes a VDI named with the destroyed one's id.
    let named_as_id = host.cli(&["vdi", "create", "--sr", &sr, "--size", "1M", "--name", &other]);
    let out = host.cli_raw(&["vdi", "destroy", "--sr", "local", "--vdi", &other]);
    assert!(!out.status.success(), "a retried destroy took {named_as_id}");
    let out = host.cli_raw(&["vdi", "destroy", "--sr", "local", "--vdi", ""]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("empty"));
    assert_eq!(vdi_ids(&host, &sr).len(), 3);
    // A snapshot keeps its VDI's name by default (as in xapi): the name still means the VDI,
    // the one of them that is no snapshot.
    let disk = host.cli(&["vdi", "create", "--sr", "local", "--size", "1M", "--name", "data"]);
    host.cli(&["vdi", "snapshot", "--sr", "local", "--vdi", "data"]);
    let uri = host.cli(&["vdi", "attach", "--sr", "local", "--vdi", "data"]);
    assert!(uri.contains(&disk), "{uri}");
    host.cli(&["vdi", "detach", "--sr", "local", "--vdi", "data"]);
    // A name nothing has is said so, not passed on as an id for the host to puzzle over.
    let out = host.cli_raw(&["vdi", "attach", "--sr", "local", "--vdi", "no-such-disk"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no VDI \"no-such-disk\""), "{err}");
    // A VDI id the SR does not hold: the error names the SR, and no command takes it for one
    // with nothing to do (`vdi detach` said "not attached" and succeeded).
    let missing = "0f0e0d0c-0b0a-4909-8807-060504030201";
    for cmd in ["detach", "attach", "destroy"] {
        let out = host.cli_raw(&["vdi", cmd, "--sr", "local", "--vdi", missing]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&format!("has no VDI {missing}")), "vdi {cmd}: {err}");
    }
}

/// `--json` errors are one JSON object carrying the host's storage error, `task stat` reads
/// as text without it, and the job commands refuse a task that is no job.
#[test]
fn the_cli_says_errors_in_json_and_job_commands_take_only_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, _sr) = host_with_sr(&dir);
    let out = host.cli_raw(&["--json", "task", "stat", "no-such-task"]);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(err["storage_error"], json!(["Does_not_exist", ["task", "no-such-task"]]), "{err}");
    assert!(err["error"].as_str().is_some_and(|e| e.contains("no-such-task")), "{err}");
    // A usage error too.
    let out = host.cli_raw(&["--json", "vdi", "bogus"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.code() == Some(2) && err["error"].as_str().is_some_and(|e| e.contains("bogus")), "{err}");
    let out = host.cli_raw(&["--json", "vdi", "create", "--sr", "local", "--size", "3T", "--name", "big"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).expect("one JSON object");
    assert_eq!(err["storage_error"][1][0], json!("VDI_TOO_LARGE"), "{err}");
    // The limit in the unit that holds it whole: "2.0 TiB" read as if 2 TiB fitted.
    assert!(err["error"].as_str().is_some_and(|e| e.contains("2040 GiB")), "{err}");
    // A task that is not a job: the job commands refuse it and cancel nothing.
    let vdi = host.cli(&["vdi", "create", "--sr", "local", "--size", "1M", "--name", "d"]);
    let snap = host.cli_json(&["vdi", "snapshot", "--sr", "local", "--vdi", "d"])["vdi"].as_str().expect("snapshot").to_owned();
    assert_ne!(snap, vdi);
    let unreachable = "http://127.0.0.1:9?session_id=x";
    let sr = host.cli(&["--json", "sr", "list"]);
    let sr: serde_json::Value = serde_json::from_str(&sr).expect("json");
    let sr = sr.as_object().and_then(|o| o.keys().next()).expect("an SR").to_owned();
    let task = host.call("DATA.copy", json!({"sr": sr, "vdi": snap, "url": unreachable, "dest": sr, "verify_dest": false, "dbg": "t"}));
    let task = task.as_str().expect("task");
    for args in [vec!["migrate", "cancel", task], vec!["migrate", "cutover", task], vec!["migrate", "set-bwlimit", task, "1M"]] {
        let out = host.cli_raw(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is not a migrate job"), "{args:?}: {err}");
    }
    // `task stat` without --json: lines of text naming the task and its state.
    let shown = host.cli(&["task", "stat", task]);
    let first = |key: &str| shown.lines().find(|l| l.split_whitespace().next() == Some(key)).map(|l| l.trim_start_matches(key).trim().to_owned());
    assert_eq!(first("task").as_deref(), Some(task), "{shown}");
    assert!(first("state").is_some_and(|s| s.starts_with("pending") || s.starts_with("failed")), "{shown}");
    assert!(serde_json::from_str::<serde_json::Value>(&shown).is_err(), "{shown}");
}

/// Making a VDI non-persistent and persistent again, many times over, keeps its chain short
/// (each reset point folds into the last), and the VDI keeps its content.
#[test]
fn toggling_reset_on_boot_keeps_the_chain_short() {
    require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let host = Host::start(&dir.path().join("host"));
    for ty in ["ext", "qcow2"] {
        let sr = host.cli(&["sr", "create", "--type", ty, "--name", ty]);
        let vdi = host.cli(&["vdi", "create", "--sr", &sr, "--size", "4M", "--name", "desktop"]);
        for round in 0..35u8 {
            write_first_mib(&host, &sr, &vdi, round + 1);
            host.call("VDI.set_persistent", json!({"dbg": "t", "sr": sr, "vdi": vdi, "persistent": false}));
            host.call("VDI.set_persistent", json!({"dbg": "t", "sr": sr, "vdi": vdi, "persistent": true}));
        }
        assert!(first_mib_is(&host, &sr, &vdi, 35), "{ty}: the VDI lost its content");
        let images = std::fs::read_dir(host.root.join("sr").join(&sr))
            .expect("SR folder")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".vhd") || n.ends_with(".qcow2")))
            .count();
        assert!(images <= 3, "{ty}: {images} images after 35 toggles");
    }
}
