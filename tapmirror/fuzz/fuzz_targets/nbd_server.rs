//! Fuzzes the NBD server end to end: the input is everything a client sends on one connection.
//!
//! Each input is fed, as the client's half of the stream, to `NbdServer::serve_with` under each
//! greeting (fixed newstyle for the export's name or any name, and old style): the
//! reader yields the input bytes and then end-of-file, and the server's replies go to
//! `tokio::io::sink()`. The input therefore reaches option parsing (negotiation) first and, once
//! an `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` succeeds, request parsing (transmission) against a
//! real 1 MiB raw image on the portable I/O engine (no io_uring worker thread).
//!
//! Invariants checked per input (a violation aborts the run and saves the input):
//! - nothing panics, here or in any task the server spawns (libfuzzer-sys installs a panic
//!   hook that aborts the process);
//! - the connection ends within `STALL_LIMIT` (no hang: the input always ends in EOF);
//! - the image's size, cached and on disk, is unchanged;
//! - the server never answers more requests than the input has room for (28 bytes each),
//!   never reports more errors than replies, and never writes more bytes to the image than the
//!   client sent.
//!
//! After each input the image is reset to a sparse, all-zero file so runs are reproducible.

#![no_main]

mod common;

use std::fs::File;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tapmirror::image::raw::Access;
use tapmirror::image::{Image, RawImage};
use tapmirror::io::EngineKind;
use tapmirror::nbd::proto::REQUEST_LEN;
use tapmirror::nbd::server::Handshake;
use tapmirror::nbd::{ExportConfig, NbdServer};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Size of the exported image.
const SIZE: u64 = 1 << 20;
/// Name of the export (the empty name selects it too).
const EXPORT: &str = "fuzz";
/// How long one connection may take before we call it a stall.
const STALL_LIMIT: Duration = Duration::from_secs(5);

struct Harness {
    rt: Runtime,
    image: Arc<RawImage>,
    /// A second handle to the (already unlinked) image file, to check and reset its length.
    file: File,
    /// `TAPMIRROR_FUZZ_VERBOSE` is set: print each connection's outcome and counters (to check
    /// that seeds get as far as transmission).
    verbose: bool,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = common::runtime();
        let tmp = tempfile::Builder::new().prefix("tapmirror-fuzz-").suffix(".raw").tempfile().expect("temp file");
        RawImage::create(tmp.path(), SIZE).expect("create raw image");
        let image =
            rt.block_on(RawImage::open(tmp.path(), Access::ReadWrite, EngineKind::Portable)).expect("open raw image");
        assert_eq!(image.size(), SIZE);
        // Unlink the path now; both handles keep the inode alive until the process exits.
        let file = tmp.into_file();
        let verbose = std::env::var_os("TAPMIRROR_FUZZ_VERBOSE").is_some();
        Harness { rt, image: Arc::new(image), file, verbose }
    })
}

fuzz_target!(|data: &[u8]| {
    // Each greeting a server gives: the listener's (fixed newstyle, the export's name only),
    // a passed connection's (any name), and the old style (transmission at once, simple
    // replies only).
    for how in [
        Handshake::default(),
        Handshake { oldstyle: false, any_export: true },
        Handshake { oldstyle: true, any_export: true },
    ] {
        one_connection(data, how);
    }
});

fn one_connection(data: &[u8], how: Handshake) {
    let h = harness();
    let export = ExportConfig { name: EXPORT.into(), description: Some("fuzz export".into()), read_only: false };
    let server = NbdServer::new(Arc::clone(&h.image), export);
    let client = std::io::Cursor::new(data.to_vec());

    let connection = Arc::clone(&server).serve_with(client, tokio::io::sink(), CancellationToken::new(), how);
    // The timer must be created inside the runtime, hence the async block.
    let outcome = h.rt.block_on(async { tokio::time::timeout(STALL_LIMIT, connection).await });
    // Errors (bad magic, truncation, EOF mid-message, ...) are expected; a stall is not.
    let Ok(result) = outcome else {
        panic!("serve_with({how:?}) did not return within {STALL_LIMIT:?} for a {}-byte input", data.len());
    };

    assert_eq!(server.image().size(), SIZE, "cached image size changed");
    let on_disk = h.file.metadata().expect("fstat image").len();
    assert_eq!(on_disk, SIZE, "image file length changed");

    let stats = server.stats();
    let requests = stats.requests.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let written = stats.bytes_written.load(Ordering::Relaxed);
    let max_requests = (data.len() / REQUEST_LEN) as u64;
    assert!(requests <= max_requests, "{requests} replies for at most {max_requests} request headers");
    assert!(errors <= requests, "{errors} errors in {requests} replies");
    assert!(written <= data.len() as u64, "{written} bytes written from a {}-byte input", data.len());
    if h.verbose {
        eprintln!(
            "{} bytes, {how:?}: {result:?}; {requests} replies, {errors} errors, {written} bytes written, {} bytes read",
            data.len(),
            stats.bytes_read.load(Ordering::Relaxed)
        );
    }

    // Back to a sparse all-zero image so the next input sees the same state.
    h.file.set_len(0).expect("truncate image");
    h.file.set_len(SIZE).expect("extend image");
}
