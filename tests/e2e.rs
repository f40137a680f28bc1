//! End-to-end tests of what a newcomer runs.
//!
//! The README's first command (`sxm demo`) is executed as written, minus `cargo build
//! --release`, which the test run has already done in its own profile, and so is its
//! tapmirror example, so the documented quick start cannot silently rot.

use std::path::PathBuf;
use std::process::Command;

/// The `tapmirror` binary built next to this test (`cargo test --workspace` builds it).
fn tapmirror_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    let bin = dir.join("tapmirror");
    assert!(bin.exists(), "{} missing: run `cargo test --workspace`", bin.display());
    bin
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{tool} is required under CI");
        eprintln!("skipping: {tool} not installed");
    }
    ok
}

#[test]
fn readme_first_command_runs_the_demo_to_a_verified_end_and_leaves_nothing() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo build --release && "))
        .expect("README's first command starts with `cargo build --release && `");
    let command = line.trim_start_matches("cargo build --release && ").replace("target/release/sxm", env!("CARGO_BIN_EXE_sxm"));
    assert!(command.ends_with(" demo"), "the first command runs the demo: {command}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&command)
        // The demo's folder goes under a folder of this test's own, to check it is removed.
        .env("TMPDIR", tmp.path())
        .env("SXM_TAPMIRROR", tapmirror_bin())
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{command}\nfailed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verified: both destination VDIs hold exactly what the guest wrote"), "{stdout}");
    assert!(stdout.contains("cleaned up"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("list").collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
    let procs = Command::new("pgrep").args(["-f", &tmp.path().display().to_string()]).output().expect("pgrep");
    assert!(procs.stdout.is_empty(), "the demo left processes: {}", String::from_utf8_lossy(&procs.stdout));
}

/// Interrupted part-way (SIGINT as Ctrl-C sends it, or SIGTERM), the demo still stops its
/// hosts and their datapaths and removes its folder; an oversized disk is refused up front.
#[test]
fn an_interrupted_demo_leaves_nothing_behind() {
    for signal in ["INT", "TERM"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let child = Command::new(env!("CARGO_BIN_EXE_sxm"))
            .args(["demo", "--size", "64M"])
            .env("TMPDIR", tmp.path())
            .env("SXM_TAPMIRROR", tapmirror_bin())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the demo");
        // Once the hosts are up and a datapath serves a disk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let serving = Command::new("pgrep").args(["-f", &format!("tapmirror serve .*{}", tmp.path().display())]).output().expect("pgrep");
            if !serving.stdout.is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "SIG{signal}: the demo served no disk within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let killed = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().expect("kill");
        assert!(killed.success());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("interrupted"), "SIG{signal}: {:?} {stderr}", out.status);
        let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("list").collect();
        assert!(left.is_empty(), "SIG{signal}: the demo left {left:?} behind");
        let procs = Command::new("pgrep").args(["-f", &tmp.path().display().to_string()]).output().expect("pgrep");
        assert!(procs.stdout.is_empty(), "SIG{signal}: the demo left processes: {}", String::from_utf8_lossy(&procs.stdout));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sxm")).args(["demo", "--size", "100G"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("at most"), "{stderr}");
    // No guest writing is no demo of a live move (it said "0 per second" and wrote 1).
    let out = Command::new(env!("CARGO_BIN_EXE_sxm")).args(["demo", "--rate", "0"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // A host that cannot start says why in the demo's own error: it gave an empty reason and
    // pointed at a log in the folder the demo had just removed.
    let out = Command::new(env!("CARGO_BIN_EXE_sxm")).arg("demo").env("SXM_TAPMIRROR", "/nonexistent/tapmirror").output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("did not start") && stderr.contains("/nonexistent/tapmirror"), "{stderr}");
}

#[test]
fn readme_tapmirror_example_serves_writes_and_maps_a_disk() {
    if !(have("nbdcopy") && have("nbdinfo")) {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let line = readme.lines().find(|l| l.starts_with("rm -f /tmp/tm.raw && ")).expect("the tapmirror example in the README");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("demo.raw");
    let command = line.replace("target/release/tapmirror", &tapmirror_bin().display().to_string()).replace("/tmp/tm.raw", &image.display().to_string());
    let out = Command::new("bash").arg("-c").arg(&command).env("RUST_LOG", "warn").output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{command}\nfailed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));

    // nbdinfo --map prints "offset length type description" rows.
    let rows: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).filter(|r: &Vec<&str>| r.len() >= 4).collect();
    assert_eq!(rows.len(), 2, "map: {stdout}");
    assert_eq!(&rows[0][..4], &["0", "104857600", "0", "data"], "first 100 MiB are data");
    assert_eq!(&rows[1][..4], &["104857600", "968884224", "3", "hole,zero"], "the rest is holes");
    let meta = std::fs::metadata(&image).expect("image");
    assert_eq!(meta.len(), 1 << 30, "--create made a 1 GiB image");
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 200 << 20, "the image stayed sparse: {} blocks", meta.blocks());
}

#[test]
fn sxm_binary_identifies_itself() {
    let out = Command::new(env!("CARGO_BIN_EXE_sxm")).arg("--version").output().expect("run sxm");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("sxm {}", env!("CARGO_PKG_VERSION")));
}
