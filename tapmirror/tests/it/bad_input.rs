//! Hostile and malformed input against our server, byte by byte.
//!
//! Every test talks to `tapmirror serve` over a raw Unix socket with timeouts, crafting each
//! message with the codec in `tapmirror::nbd::proto`, so we control every byte. What must hold:
//! a broken stream closes that connection only (the server keeps serving others), an error the
//! protocol can report gets its error and the connection stays in step, and nothing reaches the
//! image unless it was a valid write.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tapmirror::nbd::proto::{
    self, Errno, InfoRequest, MetaContextRequest, OptionReplyHeader, ReplyHeader, Request, chunk, cmd, cmd_flags, opt, rep,
    tflags,
};

use crate::harness::{self, pattern};

/// How long any single read or write on a raw connection may block before the test fails.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The server's largest payload.
const MAX_PAYLOAD: u32 = 32 << 20;
/// Size of the images most tests serve.
const SIZE: u64 = 1 << 20;

/// A raw NBD connection: every byte is ours to choose.
struct Raw {
    s: UnixStream,
}

/// One reply message: a simple reply header, or a structured chunk with its payload.
#[derive(Debug)]
enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, payload: Vec<u8> },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect to the server");
        s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        Raw { s }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the server");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }

    /// Reads the 18-byte greeting and returns the handshake flags.
    fn greeting(&mut self) -> u16 {
        let g = self.read_n(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_ne!(flags & proto::handshake::FIXED_NEWSTYLE, 0, "server must speak fixed newstyle");
        flags
    }

    /// Greeting plus client flags.
    fn start(socket: &Path, client_flags: u32) -> Raw {
        let mut c = Raw::connect(socket);
        c.greeting();
        c.send(&client_flags.to_be_bytes());
        c
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&proto::encode_option(option, data));
    }

    /// Reads one option reply, which must answer `option`.
    fn opt_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let h = self.read_n(proto::OPTION_REPLY_HEADER_LEN);
        let h = OptionReplyHeader::decode(&h).expect("option reply header");
        assert_eq!(h.option, option, "reply answers another option");
        assert!(h.length <= 64 * 1024, "option reply of {} bytes", h.length);
        let data = self.read_n(h.length as usize);
        (h.kind, data)
    }

    /// Sends `option` and expects exactly one reply of `kind`.
    fn expect_opt(&mut self, option: u32, data: &[u8], kind: u32) {
        self.option(option, data);
        let (k, d) = self.opt_reply(option);
        assert_eq!(k, kind, "option {option}: reply {k:#x} ({:?}), expected {kind:#x}", String::from_utf8_lossy(&d));
    }

    /// `NBD_OPT_STRUCTURED_REPLY` and `base:allocation`; returns the context id.
    fn structured(&mut self) -> u32 {
        self.expect_opt(opt::STRUCTURED_REPLY, &[], rep::ACK);
        let req = MetaContextRequest { export: String::new(), queries: vec![proto::BASE_ALLOCATION.into()] };
        self.option(opt::SET_META_CONTEXT, &req.encode());
        let (k, d) = self.opt_reply(opt::SET_META_CONTEXT);
        assert_eq!(k, rep::META_CONTEXT);
        let (id, name) = proto::decode_meta_context_reply(&d).expect("meta context");
        assert_eq!(name, proto::BASE_ALLOCATION);
        assert_eq!(self.opt_reply(opt::SET_META_CONTEXT).0, rep::ACK);
        id
    }

    /// `NBD_OPT_INFO`/`GO` for `name`: the size and flags on success, the error reply type
    /// otherwise.
    fn info_or_go(&mut self, option: u32, name: &str) -> Result<(u64, u16), u32> {
        let req = InfoRequest { name: name.into(), requests: vec![proto::info::BLOCK_SIZE] };
        self.option(option, &req.encode());
        let mut export = None;
        loop {
            let (k, d) = self.opt_reply(option);
            match k {
                rep::INFO => {
                    if let proto::InfoItem::Export { size, flags } = proto::InfoItem::decode(&d).expect("info item") {
                        export = Some((size, flags));
                    }
                }
                rep::ACK => return Ok(export.expect("GO acknowledged without NBD_INFO_EXPORT")),
                k if k & rep::ERR_BIT != 0 => return Err(k),
                other => panic!("unexpected reply {other:#x} to option {option}"),
            }
        }
    }

    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.info_or_go(opt::GO, name)
    }

    /// A full handshake to transmission: returns the connection and the export flags.
    fn open(socket: &Path, structured: bool) -> (Raw, u16) {
        let mut c = Raw::start(socket, proto::client_flags::KNOWN);
        if structured {
            c.structured();
        }
        let (_, flags) = c.go("").expect("GO \"\"");
        (c, flags)
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&Request { flags, kind, cookie, offset, length }.encode());
    }

    fn write_req(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let mut m = Request { flags: 0, kind: cmd::WRITE, cookie, offset, length: data.len() as u32 }.encode().to_vec();
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Reads one reply message (for a chunk, with its payload; a simple READ reply's data is
    /// left on the wire).
    fn reply(&mut self) -> Reply {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
        let len = ReplyHeader::header_len(magic).unwrap_or_else(|e| panic!("reply magic: {e}"));
        let mut h = m;
        h.extend(self.read_n(len - 4));
        match ReplyHeader::decode(&h).expect("reply header") {
            ReplyHeader::Simple { error, cookie } => Reply::Simple { error, cookie },
            ReplyHeader::Chunk { flags, kind, cookie, length } => {
                assert!(length <= MAX_PAYLOAD + 8, "chunk of {length} bytes");
                Reply::Chunk { flags, kind, cookie, payload: self.read_n(length as usize) }
            }
        }
    }

    /// Expects a simple reply for `cookie` and returns its error value.
    fn simple(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie, "reply for another request");
                error
            }
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Expects an error for `cookie`, as a simple reply or a final error chunk (both are
    /// allowed for commands other than READ once structured replies are on).
    fn error_of(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie);
                error
            }
            Reply::Chunk { flags, kind, cookie: c, payload } => {
                assert_eq!(c, cookie);
                assert!(kind & (1 << 15) != 0, "expected an error chunk, got type {kind}");
                assert_ne!(flags & chunk::FLAG_DONE, 0, "a lone error chunk must be the last");
                proto::decode_error_payload(&payload).expect("error payload").0
            }
        }
    }

    /// A simple READ: the data, or the error value.
    fn simple_read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(cmd::READ, 0, cookie, offset, len);
        match self.simple(cookie) {
            0 => Ok(self.read_n(len as usize)),
            e => Err(e),
        }
    }

    /// A structured READ: checks the chunks cover the range exactly once and returns the bytes
    /// and the chunk types seen, or the error chunk's value.
    fn structured_read(&mut self, cookie: u64, offset: u64, len: u32, flags: u16) -> Result<(Vec<u8>, Vec<u16>), u32> {
        self.request(cmd::READ, flags, cookie, offset, len);
        self.structured_read_reply(cookie, offset, len)
    }

    fn structured_read_reply(&mut self, cookie: u64, offset: u64, len: u32) -> Result<(Vec<u8>, Vec<u16>), u32> {
        let mut buf = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        let mut kinds = Vec::new();
        let mut error = None;
        loop {
            let Reply::Chunk { flags, kind, cookie: c, payload } = self.reply() else {
                panic!("simple reply to a READ with structured replies negotiated");
            };
            assert_eq!(c, cookie);
            kinds.push(kind);
            let mut mark = |at: u64, n: usize| -> usize {
                let start = at.checked_sub(offset).expect("chunk before the request") as usize;
                assert!(start + n <= len as usize, "chunk {at}+{n} past the request");
                assert!(n > 0, "empty chunk");
                for seen in &mut covered[start..start + n] {
                    assert!(!*seen, "chunks overlap at {at}");
                    *seen = true;
                }
                start
            };
            match kind {
                chunk::OFFSET_DATA => {
                    let at = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
                    let data = &payload[8..];
                    let start = mark(at, data.len());
                    buf[start..start + data.len()].copy_from_slice(data);
                }
                chunk::OFFSET_HOLE => {
                    assert_eq!(payload.len(), 12);
                    let at = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
                    let n = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
                    mark(at, n as usize);
                }
                chunk::NONE => assert!(payload.is_empty()),
                k if k & (1 << 15) != 0 => {
                    let (e, msg) = proto::decode_error_payload(&payload).expect("error payload");
                    assert!(e != 0, "error chunk with error 0 ({msg})");
                    error.get_or_insert(e);
                }
                other => panic!("chunk type {other} in a READ reply"),
            }
            if flags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        assert!(covered.iter().all(|&c| c), "successful READ reply leaves bytes uncovered");
        Ok((buf, kinds))
    }

    /// The server must close the connection: EOF or a reset, but never a timeout.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 4096];
        let mut junk = 0usize;
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return,
                Ok(n) => {
                    junk += n;
                    assert!(junk < 1 << 20, "server keeps talking on a connection it should close");
                }
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("server did not close the connection within {TIMEOUT:?}")
                }
                Err(e) => panic!("unexpected error waiting for close: {e}"),
            }
        }
    }
}

/// A fresh connection negotiates and reads correctly: the server survived whatever came before.
fn assert_serving(socket: &Path, expect: &[u8]) {
    let (mut c, _) = Raw::open(socket, false);
    let n = expect.len().min(4096) as u32;
    let got = c.simple_read(1, 0, n).expect("READ on a fresh connection");
    assert_eq!(got, &expect[..n as usize], "fresh connection reads wrong bytes");
    c.request(cmd::DISC, 0, 2, 0, 0);
    c.expect_closed();
}

/// Serves an image of `SIZE` bytes pre-filled with a pattern; returns it with the bytes.
fn serve_pattern(extra: &[&str]) -> (harness::Served, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let data = pattern(SIZE as usize, 0xbad);
    std::fs::write(&image, &data).expect("write image");
    (harness::serve_file(dir, image, extra), data)
}

#[test]
fn garbage_client_flags_close_only_that_connection() {
    let (s, data) = serve_pattern(&[]);
    // A negotiated connection that must outlive its neighbours' misbehaviour.
    let (mut bystander, _) = Raw::open(&s.socket, false);

    // (No flags, or NO_ZEROES alone, is a plain newstyle client, which is served.)
    for flags in [0xdead_beef_u32, 1 << 2 | 1, 1 << 31] {
        let mut c = Raw::connect(&s.socket);
        c.greeting();
        c.send(&flags.to_be_bytes());
        c.expect_closed();
    }
    // Not even flags: ASCII junk right after the greeting.
    let mut c = Raw::connect(&s.socket);
    c.greeting();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed();

    assert_eq!(bystander.simple_read(7, 4096, 512).expect("bystander READ"), &data[4096..4608]);
    assert_serving(&s.socket, &data);
}

#[test]
fn garbage_instead_of_an_option_closes_the_connection() {
    let (s, data) = serve_pattern(&[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.send(b"GARBAGE!GARBAGE!");
    c.expect_closed();

    // A valid option first, then garbage: the first is answered, then the hang-up.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.expect_opt(opt::LIST, &[], rep::SERVER);
    assert_eq!(c.opt_reply(opt::LIST).0, rep::ACK);
    c.send(&[0xff; 64]);
    c.expect_closed();

    // A request header during negotiation (the client thinks it is in transmission).
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.request(cmd::READ, 0, 1, 0, 512);
    c.expect_closed();

    assert_serving(&s.socket, &data);
}

#[test]
fn truncated_and_stalled_handshakes_affect_only_their_connection() {
    let (s, data) = serve_pattern(&[]);

    // Connect and leave at once, without reading the greeting.
    drop(UnixStream::connect(&s.socket).expect("connect"));

    // Half a client flags word, then EOF.
    let mut c = Raw::connect(&s.socket);
    c.greeting();
    c.send(&[0, 0]);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    // Half an option header, then EOF.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.send(&proto::encode_option(opt::GO, &[])[..8]);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    // An option header whose data never fully arrives.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    let go = proto::encode_option(opt::GO, &InfoRequest { name: String::new(), requests: vec![] }.encode());
    c.send(&go[..go.len() - 1]);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    // Stalled connections (silent, mid-flags, mid-option) while others negotiate and do I/O.
    let mut silent = Raw::connect(&s.socket);
    let mut mid_flags = Raw::connect(&s.socket);
    mid_flags.greeting();
    mid_flags.send(&[0]);
    let mut mid_option = Raw::start(&s.socket, proto::client_flags::KNOWN);
    mid_option.send(&proto::encode_option(opt::LIST, &[])[..10]);
    for round in 0..3u64 {
        let (mut c, _) = Raw::open(&s.socket, round % 2 == 1);
        if round % 2 == 1 {
            let (got, _) = c.structured_read(round, 8192, 4096, 0).expect("structured READ");
            assert_eq!(got, &data[8192..12288]);
        } else {
            assert_eq!(c.simple_read(round, 8192, 4096).expect("READ"), &data[8192..12288]);
        }
    }
    // The stalled ones got their greeting and nothing else: the server is still waiting.
    silent.s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut g = [0u8; 19];
    let n = silent.s.read(&mut g).expect("greeting");
    assert!(n > 0 && n <= 18 && g[..n.min(16)] == b"NBDMAGICIHAVEOPT"[..n.min(16)], "stalled connection got {n} bytes");
    drop((silent, mid_flags, mid_option));
    assert_serving(&s.socket, &data);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let (s, data) = serve_pattern(&[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.expect_opt(0x4242, &[], rep::ERR_UNSUP);
    c.expect_opt(0x7fff_ffff, b"with some data", rep::ERR_UNSUP);
    c.expect_opt(opt::EXTENDED_HEADERS, &[], rep::ERR_UNSUP);
    // No TLS: STARTTLS must get an error, never TLS_REQD (proto.md, "NOTLS mode").
    c.option(opt::STARTTLS, &[]);
    let (k, _) = c.opt_reply(opt::STARTTLS);
    assert!(k == rep::ERR_UNSUP || k == rep::ERR_POLICY, "STARTTLS answered {k:#x}");
    let (size, flags) = c.go("").expect("GO after refused options");
    assert_eq!(size, SIZE);
    assert_ne!(flags & tflags::HAS_FLAGS, 0);
    assert_eq!(c.simple_read(1, 0, 1024).expect("READ"), &data[..1024]);
}

#[test]
fn oversized_option_data_is_too_big_and_negotiation_continues() {
    let (s, data) = serve_pattern(&[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    // 100 KiB of real data for a known and an unknown option: both too big, both consumed.
    let big = pattern(100 * 1024, 3);
    c.expect_opt(opt::GO, &big, rep::ERR_TOO_BIG);
    c.expect_opt(0x999, &big, rep::ERR_TOO_BIG);
    // Still in step: a LIST and a GO work.
    c.expect_opt(opt::LIST, &[], rep::SERVER);
    assert_eq!(c.opt_reply(opt::LIST).0, rep::ACK);
    c.go("").expect("GO after ERR_TOO_BIG");
    assert_eq!(c.simple_read(1, SIZE - 512, 512).expect("READ"), &data[SIZE as usize - 512..]);

    // A claimed 1 GiB that never arrives: the server waits for it, then drops the connection
    // when the client gives up.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    let mut h = proto::encode_option(0x999, &[]);
    h[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&h);
    c.send(&[0u8; 1024]);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    // An over-long NBD_OPT_EXPORT_NAME cannot be answered with an error: hang-up.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    // The server may hang up before it has read it all.
    let _ = c.s.write_all(&proto::encode_option(opt::EXPORT_NAME, &big));
    c.expect_closed();
    assert_serving(&s.socket, &data);
}

#[test]
fn go_for_an_unknown_export_is_unknown_then_the_default_works() {
    let (s, data) = serve_pattern(&["--export-name", "disk0"]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    assert_eq!(c.go("nope"), Err(rep::ERR_UNKNOWN));
    assert_eq!(c.info_or_go(opt::INFO, "nope"), Err(rep::ERR_UNKNOWN));
    // INFO does not enter transmission; the named export and the default both work.
    assert_eq!(c.info_or_go(opt::INFO, "disk0").expect("INFO disk0").0, SIZE);
    // Malformed GO data: a name length past the data, a name over 4096 bytes, a short count.
    let mut bad = Vec::new();
    bad.extend_from_slice(&100u32.to_be_bytes());
    bad.extend_from_slice(b"abc");
    c.expect_opt(opt::GO, &bad, rep::ERR_INVALID);
    let long = InfoRequest { name: "x".repeat(5000), requests: vec![] }.encode();
    c.expect_opt(opt::GO, &long, rep::ERR_INVALID);
    c.expect_opt(opt::GO, &[0, 0, 0, 0, 0], rep::ERR_INVALID);
    let (size, _) = c.go("").expect("GO \"\"");
    assert_eq!(size, SIZE);
    assert_eq!(c.simple_read(9, 512, 512).expect("READ"), &data[512..1024]);

    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.go("disk0").expect("GO by name");
    assert_eq!(c.simple_read(9, 0, 512).expect("READ"), &data[..512]);
}

#[test]
fn options_out_of_order_or_malformed_are_invalid() {
    let (s, data) = serve_pattern(&[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    let ctx = MetaContextRequest { export: String::new(), queries: vec![proto::BASE_ALLOCATION.into()] }.encode();
    // Meta contexts need structured replies first.
    c.expect_opt(opt::SET_META_CONTEXT, &ctx, rep::ERR_INVALID);
    c.expect_opt(opt::LIST_META_CONTEXT, &ctx, rep::ERR_INVALID);
    c.expect_opt(opt::STRUCTURED_REPLY, b"x", rep::ERR_INVALID);
    c.expect_opt(opt::LIST, b"x", rep::ERR_INVALID);
    c.expect_opt(opt::STRUCTURED_REPLY, &[], rep::ACK);
    // A query count far beyond the data: invalid, not a 32 GiB allocation.
    let mut lie = vec![0, 0, 0, 0];
    lie.extend_from_slice(&u32::MAX.to_be_bytes());
    c.expect_opt(opt::SET_META_CONTEXT, &lie, rep::ERR_INVALID);
    let other = MetaContextRequest { export: "nope".into(), queries: vec![proto::BASE_ALLOCATION.into()] }.encode();
    c.expect_opt(opt::SET_META_CONTEXT, &other, rep::ERR_UNKNOWN);
    // A listing names the context with the reserved id 0, a selection with its own.
    c.option(opt::LIST_META_CONTEXT, &ctx);
    let (k, d) = c.opt_reply(opt::LIST_META_CONTEXT);
    assert_eq!(k, rep::META_CONTEXT);
    assert_eq!(proto::decode_meta_context_reply(&d).expect("meta context"), (0, proto::BASE_ALLOCATION.to_owned()));
    assert_eq!(c.opt_reply(opt::LIST_META_CONTEXT).0, rep::ACK);
    // An unknown context: ACK with no context selected; BLOCK_STATUS is then EINVAL.
    let unknown = MetaContextRequest { export: String::new(), queries: vec!["qemu:dirty-bitmap:x".into()] }.encode();
    c.expect_opt(opt::SET_META_CONTEXT, &unknown, rep::ACK);
    c.go("").expect("GO");
    c.request(cmd::BLOCK_STATUS, 0, 5, 0, 4096);
    assert_eq!(c.error_of(5), Errno::Inval as u32);
    let (got, _) = c.structured_read(6, 0, 4096, 0).expect("READ");
    assert_eq!(got, &data[..4096]);

    // ABORT is acknowledged (or not) and the connection ends.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.expect_opt(opt::ABORT, &[], rep::ACK);
    c.expect_closed();
}

#[test]
fn export_name_honours_the_no_zeroes_flag() {
    let (s, data) = serve_pattern(&[]);
    // Without NO_ZEROES: size, flags and 124 zero bytes, then transmission.
    let mut c = Raw::start(&s.socket, proto::client_flags::FIXED_NEWSTYLE);
    c.option(opt::EXPORT_NAME, b"");
    let r = c.read_n(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().expect("8")), SIZE);
    assert_ne!(u16::from_be_bytes([r[8], r[9]]) & tflags::HAS_FLAGS, 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(c.simple_read(1, 100, 100).expect("READ"), &data[100..200]);

    // With NO_ZEROES: the very next bytes after size and flags are the reply to our READ.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.option(opt::EXPORT_NAME, b"");
    let r = c.read_n(10);
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().expect("8")), SIZE);
    assert_eq!(c.simple_read(2, 0, 8).expect("READ right after the 10 bytes"), &data[..8]);

    // A plain newstyle client (no client flags at all, an old one) is served, as qemu-nbd
    // serves it.
    let mut c = Raw::start(&s.socket, 0);
    c.option(opt::EXPORT_NAME, b"");
    let r = c.read_n(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().expect("8")), SIZE);
    assert_eq!(c.simple_read(3, 4096, 512).expect("READ"), &data[4096..4608]);

    // EXPORT_NAME cannot fail politely: an unknown name is a hang-up.
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    c.option(opt::EXPORT_NAME, b"no-such-export");
    c.expect_closed();
    assert_serving(&s.socket, &data);
}

#[test]
fn endless_options_are_cut_off() {
    let (s, data) = serve_pattern(&[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    let one = proto::encode_option(0x4242, &[]);
    let all: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    // The server may hang up before it has read everything; that is the point.
    let _ = c.s.write_all(&all);
    let mut replies = 0;
    loop {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        match c.s.read_exact(&mut h) {
            Ok(()) => {
                let h = OptionReplyHeader::decode(&h).expect("option reply");
                assert_eq!(h.kind, rep::ERR_UNSUP);
                c.read_n(h.length as usize);
                replies += 1;
            }
            Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => break,
            Err(e) => panic!("after {replies} replies: {e}"),
        }
    }
    assert!(replies > 0 && replies < 1000, "server answered {replies} of 1000 options");
    assert_serving(&s.socket, &data);
}

/// The transmission-phase errors, with or without structured replies: every one is answered
/// with the protocol's error, the stream stays in step, and only valid writes reach the image.
fn transmission_errors(structured: bool) {
    let (s, data) = serve_pattern(&[]);
    let mut model = data.clone();
    let (mut c, flags) = Raw::open(&s.socket, structured);
    assert_eq!(flags & tflags::READ_ONLY, 0);

    // Reads, checked against the model; errors come as the session requires.
    let read = |c: &mut Raw, cookie: u64, offset: u64, len: u32| -> Result<Vec<u8>, u32> {
        if structured { c.structured_read(cookie, offset, len, 0).map(|(b, _)| b) } else { c.simple_read(cookie, offset, len) }
    };

    // READ past the end, straddling the end, and overflowing u64.
    assert_eq!(read(&mut c, 1, SIZE, 512), Err(Errno::Inval as u32));
    assert_eq!(read(&mut c, 2, SIZE - 256, 512), Err(Errno::Inval as u32));
    assert_eq!(read(&mut c, 3, u64::MAX - 100, 512), Err(Errno::Inval as u32));
    assert_eq!(read(&mut c, 4, u64::MAX, 1), Err(Errno::Inval as u32));
    // Still in step.
    assert_eq!(read(&mut c, 5, SIZE - 512, 512).expect("valid READ"), &model[SIZE as usize - 512..]);

    // READ over the maximum payload (the image is smaller, but the length check is its own).
    assert_eq!(read(&mut c, 6, 0, MAX_PAYLOAD + 1), Err(Errno::Inval as u32));
    assert_eq!(read(&mut c, 7, 0, u32::MAX), Err(Errno::Inval as u32));

    // WRITE past the end: ENOSPC, payload consumed.
    c.write_req(10, SIZE - 100, &[0xee; 512]);
    assert_eq!(c.error_of(10), Errno::NoSpc as u32);
    c.write_req(11, u64::MAX - 10, &[0xee; 512]);
    assert_eq!(c.error_of(11), Errno::NoSpc as u32);
    // A valid write right after: the stream is in step and the bytes land.
    let good = pattern(1000, 11);
    c.write_req(12, 5000, &good);
    assert_eq!(c.error_of(12), 0);
    model[5000..6000].copy_from_slice(&good);

    // WRITE of 33 MiB: over the maximum, EINVAL, the payload is read and dropped.
    let huge = vec![0xab; 33 << 20];
    c.write_req(13, 0, &huge);
    assert_eq!(c.error_of(13), Errno::Inval as u32);
    drop(huge);
    assert_eq!(read(&mut c, 14, 4096, 4096).expect("READ after huge WRITE"), &model[4096..8192]);

    // WRITE with a flag that does not apply to it (NO_HOLE): EINVAL, payload consumed.
    let mut m = Request { flags: cmd_flags::NO_HOLE, kind: cmd::WRITE, cookie: 15, offset: 0, length: 512 }.encode().to_vec();
    m.extend_from_slice(&[0xcc; 512]);
    c.send(&m);
    assert_eq!(c.error_of(15), Errno::Inval as u32);
    // Unknown flag bits on READ.
    if structured {
        assert_eq!(c.structured_read(16, 0, 512, 1 << 12), Err(Errno::Inval as u32));
    } else {
        // DF needs structured replies.
        c.request(cmd::READ, cmd_flags::DF, 16, 0, 512);
        assert_eq!(c.simple(16), Errno::Inval as u32);
    }

    // Unknown command types, and CACHE, which we do not offer.
    c.request(99, 0, 17, 0, 512);
    assert_eq!(c.error_of(17), Errno::Inval as u32);
    c.request(cmd::CACHE, 0, 18, 0, 512);
    assert_eq!(c.error_of(18), Errno::Inval as u32);

    // TRIM/WRITE_ZEROES past the end or overflowing.
    c.request(cmd::TRIM, 0, 19, SIZE, 4096);
    assert_eq!(c.error_of(19), Errno::Inval as u32);
    c.request(cmd::WRITE_ZEROES, 0, 20, u64::MAX - 4095, 4096);
    assert_eq!(c.error_of(20), Errno::NoSpc as u32);
    c.request(cmd::WRITE_ZEROES, 0, 21, 0, u32::MAX);
    assert_eq!(c.error_of(21), Errno::NoSpc as u32);

    // BLOCK_STATUS: invalid without structured replies; with them, past the end or empty.
    c.request(cmd::BLOCK_STATUS, 0, 22, SIZE, 4096);
    assert_eq!(c.error_of(22), Errno::Inval as u32);
    c.request(cmd::BLOCK_STATUS, 0, 23, 0, 0);
    assert_eq!(c.error_of(23), Errno::Inval as u32);

    // Valid zeroing and trimming land.
    c.request(cmd::WRITE_ZEROES, 0, 24, 65536, 8192);
    assert_eq!(c.error_of(24), 0);
    model[65536..65536 + 8192].fill(0);
    c.request(cmd::TRIM, 0, 25, 131072, 65536);
    assert_eq!(c.error_of(25), 0);
    // Trimmed bytes are unspecified until written; write them to keep the model exact.
    let t = pattern(65536, 25);
    c.write_req(26, 131072, &t);
    assert_eq!(c.error_of(26), 0);
    model[131072..196608].copy_from_slice(&t);
    c.request(cmd::FLUSH, 0, 27, 0, 0);
    assert_eq!(c.error_of(27), 0);

    // Pipelined mix of bad and good requests, without waiting: every cookie answered once.
    let mut expected: HashMap<u64, u32> = HashMap::new();
    for i in 0..40u64 {
        let cookie = 1000 + i;
        match i % 5 {
            0 => {
                c.write_req(cookie, SIZE + i, &[1; 100]);
                expected.insert(cookie, Errno::NoSpc as u32);
            }
            1 => {
                c.request(77, 0, cookie, 0, 0);
                expected.insert(cookie, Errno::Inval as u32);
            }
            2 => {
                let d = pattern(300, cookie);
                c.write_req(cookie, 300_000 + i * 300, &d);
                let at = 300_000 + i as usize * 300;
                model[at..at + 300].copy_from_slice(&d);
                expected.insert(cookie, 0);
            }
            3 => {
                c.request(cmd::FLUSH, 0, cookie, 0, 0);
                expected.insert(cookie, 0);
            }
            _ => {
                c.request(cmd::TRIM, 0, cookie, u64::MAX - i, 1000);
                expected.insert(cookie, Errno::Inval as u32);
            }
        }
    }
    for _ in 0..expected.len() {
        let r = c.reply();
        let cookie = r.cookie();
        let want = expected.remove(&cookie).unwrap_or_else(|| panic!("reply for unknown or repeated cookie {cookie}"));
        let got = match r {
            Reply::Simple { error, .. } => error,
            Reply::Chunk { flags, payload, kind, .. } => {
                assert!(kind & (1 << 15) != 0 && flags & chunk::FLAG_DONE != 0, "unexpected chunk {kind}");
                proto::decode_error_payload(&payload).expect("error").0
            }
        };
        assert_eq!(got, want, "cookie {cookie}");
    }

    // Everything we believe is in the image is what a READ returns, and what the file holds.
    let whole = read(&mut c, 99, 0, SIZE as u32).expect("READ of everything");
    assert!(whole == model, "READ disagrees with the model");
    c.request(cmd::DISC, 0, 100, 0, 0);
    c.expect_closed();
    assert!(s.contents() == model, "image bytes differ from the writes that were allowed");
    assert_serving(&s.socket, &model);
}

#[test]
fn transmission_errors_with_simple_replies() {
    transmission_errors(false);
}

#[test]
fn transmission_errors_with_structured_replies() {
    transmission_errors(true);
}

#[test]
fn read_errors_are_simple_or_error_chunks_as_negotiated() {
    let (s, _) = serve_pattern(&[]);
    // Simple: a 16-byte error reply and no data after it; the next reply follows directly.
    let (mut c, _) = Raw::open(&s.socket, false);
    c.request(cmd::READ, 0, 1, SIZE, 4096);
    c.request(cmd::FLUSH, 0, 2, 0, 0);
    let mut got = HashMap::new();
    for _ in 0..2 {
        match c.reply() {
            Reply::Simple { error, cookie } => got.insert(cookie, error),
            other => panic!("structured reply without negotiation: {other:?}"),
        };
    }
    assert_eq!(got.get(&1), Some(&(Errno::Inval as u32)));
    assert_eq!(got.get(&2), Some(&0));

    // Structured: one ERROR chunk (type 32769) with DONE, a message, and a 16-bit length that
    // matches the payload.
    let (mut c, flags) = Raw::open(&s.socket, true);
    assert_ne!(flags & tflags::SEND_DF, 0);
    c.request(cmd::READ, 0, 3, SIZE, 4096);
    match c.reply() {
        Reply::Chunk { flags, kind, cookie, payload } => {
            assert_eq!(cookie, 3);
            assert_eq!(kind, 32769);
            assert_eq!(flags & chunk::FLAG_DONE, chunk::FLAG_DONE);
            let (e, msg) = proto::decode_error_payload(&payload).expect("error payload");
            assert_eq!(e, Errno::Inval as u32);
            assert_eq!(payload.len(), 6 + msg.len(), "error payload has trailing bytes");
        }
        other => panic!("READ error must be a structured chunk once negotiated: {other:?}"),
    }
    assert!(c.structured_read(4, 0, 512, 0).is_ok());
}

#[test]
fn writes_to_a_read_only_export_are_eperm_and_change_nothing() {
    let (s, data) = serve_pattern(&["--read-only"]);
    for structured in [false, true] {
        let (mut c, flags) = Raw::open(&s.socket, structured);
        assert_ne!(flags & tflags::READ_ONLY, 0, "read-only export without NBD_FLAG_READ_ONLY");
        c.write_req(1, 0, &[0x55; 4096]);
        assert_eq!(c.error_of(1), Errno::Perm as u32);
        c.write_req(2, 8192, &vec![0x55; 1 << 20]);
        assert_eq!(c.error_of(2), Errno::Perm as u32);
        c.request(cmd::TRIM, 0, 3, 0, 65536);
        assert_eq!(c.error_of(3), Errno::Perm as u32);
        c.request(cmd::WRITE_ZEROES, 0, 4, 0, 65536);
        assert_eq!(c.error_of(4), Errno::Perm as u32);
        // The write payloads were consumed: reads are in step and see the original bytes.
        let got = if structured {
            c.structured_read(5, 0, 16384, 0).expect("READ").0
        } else {
            c.simple_read(5, 0, 16384).expect("READ")
        };
        assert_eq!(got, &data[..16384]);
        c.request(cmd::FLUSH, 0, 6, 0, 0);
        assert_eq!(c.error_of(6), 0);
    }
    assert!(s.contents() == data, "read-only image was modified");
}

#[test]
fn bad_request_magic_closes_the_connection_after_earlier_replies() {
    let (s, data) = serve_pattern(&[]);
    let (mut c, _) = Raw::open(&s.socket, false);
    let mut model = data.clone();
    let d = pattern(4096, 5);
    c.write_req(1, 0, &d);
    model[..4096].copy_from_slice(&d);
    let mut bad = Request { flags: 0, kind: cmd::READ, cookie: 2, offset: 0, length: 512 }.encode();
    bad[0] ^= 0xff;
    c.send(&bad);
    // The write before the bad header is answered, then the connection ends.
    assert_eq!(c.simple(1), 0);
    c.expect_closed();

    // A truncated request header, then EOF.
    let (mut c, _) = Raw::open(&s.socket, true);
    c.send(&Request { flags: 0, kind: cmd::READ, cookie: 3, offset: 0, length: 512 }.encode()[..20]);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    // A WRITE whose payload is cut short: the connection ends and the partial write is not
    // applied.
    let (mut c, _) = Raw::open(&s.socket, false);
    let mut m = Request { flags: 0, kind: cmd::WRITE, cookie: 4, offset: 65536, length: 8192 }.encode().to_vec();
    m.extend_from_slice(&[0x77; 4000]);
    c.send(&m);
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    c.expect_closed();

    assert_serving(&s.socket, &model);
    assert!(s.contents() == model, "image changed by a broken connection");
}

#[test]
fn structured_reads_over_holes_cover_the_range_exactly() {
    let s = harness::serve(8 << 20, &[]);
    let mut model = vec![0u8; 8 << 20];
    let (mut c, _) = Raw::open(&s.socket, true);
    // Data islands in a sparse image, some unaligned.
    for (i, (at, len)) in
        [(0usize, 4096usize), (1 << 20, 100_000), ((3 << 20) + 5, 70_001), ((8 << 20) - 4096, 4096)].into_iter().enumerate()
    {
        let d = pattern(len, i as u64 + 40);
        c.write_req(i as u64, at as u64, &d);
        assert_eq!(c.error_of(i as u64), 0);
        model[at..at + len].copy_from_slice(&d);
    }
    for (cookie, (at, len)) in
        [(0u64, 8u32 << 20), (4096, 2 << 20), (1000, 65536), ((3 << 20) - 7, 1 << 20), (2 << 20, 512 << 10)]
            .into_iter()
            .enumerate()
    {
        let (got, kinds) = c.structured_read(cookie as u64 + 10, at, len, 0).expect("structured READ");
        assert!(got == model[at as usize..at as usize + len as usize], "READ {at}+{len} returned wrong bytes");
        if len >= 1 << 20 {
            assert!(kinds.contains(&chunk::OFFSET_HOLE), "a sparse {len}-byte READ sent no hole chunk: {kinds:?}");
        }
    }
    // DF: exactly one data chunk for the whole range.
    let (got, kinds) = c.structured_read(50, 0, 2 << 20, cmd_flags::DF).expect("DF READ");
    assert!(got == model[..2 << 20]);
    assert_eq!(kinds, vec![chunk::OFFSET_DATA], "DF READ must be one chunk");
}

#[test]
fn zero_length_requests_are_answered() {
    let (s, data) = serve_pattern(&[]);
    for structured in [false, true] {
        let (mut c, _) = Raw::open(&s.socket, structured);
        c.write_req(1, 4096, &[]);
        assert_eq!(c.error_of(1), 0, "zero-length WRITE");
        c.request(cmd::TRIM, 0, 2, 4096, 0);
        c.error_of(2);
        c.request(cmd::WRITE_ZEROES, 0, 3, 4096, 0);
        c.error_of(3);
        c.request(cmd::FLUSH, 0, 4, 0, 0);
        assert_eq!(c.error_of(4), 0);
        if !structured {
            // A simple READ of 0 bytes: a bare reply header (success or EINVAL).
            c.request(cmd::READ, 0, 5, 4096, 0);
            c.simple(5);
            assert_eq!(c.simple_read(6, 0, 512).expect("READ after empty READ"), &data[..512]);
        } else {
            assert_eq!(c.structured_read(6, 0, 512, 0).expect("READ").0, &data[..512]);
        }
    }
    assert!(s.contents() == data, "zero-length requests changed the image");
}

/// Regression: a zero-length `NBD_CMD_READ` with structured replies once got no reply at all
/// (no chunk was built for an empty range) and the client waited forever. proto.md: "a read
/// request MUST result in a structured reply with one or more chunks ... where the final chunk
/// has the flag NBD_REPLY_FLAG_DONE". The server now sends a NONE chunk with DONE.
#[test]
fn zero_length_structured_read_gets_a_reply() {
    let (s, data) = serve_pattern(&[]);
    let (mut c, _) = Raw::open(&s.socket, true);
    c.request(cmd::READ, 0, 5, 4096, 0);
    // Success (a NONE chunk) or an error chunk will do; a timeout fails the test.
    let _ = c.structured_read_reply(5, 4096, 0);
    assert_eq!(c.structured_read(6, 0, 512, 0).expect("READ after empty READ").0, &data[..512]);
}

#[test]
fn disconnect_flushes_earlier_replies_then_closes() {
    let (s, data) = serve_pattern(&[]);
    let (mut c, _) = Raw::open(&s.socket, false);
    let d = pattern(65536, 9);
    c.write_req(1, 0, &d);
    c.request(cmd::FLUSH, 0, 2, 0, 0);
    c.request(cmd::DISC, 0, 3, 0, 0);
    // Replies may come in any order.
    let mut got: Vec<(u64, u32)> = (0..2)
        .map(|_| match c.reply() {
            Reply::Simple { error, cookie } => (cookie, error),
            other => panic!("{other:?}"),
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![(1, 0), (2, 0)]);
    c.expect_closed();
    let mut model = data;
    model[..65536].copy_from_slice(&d);
    assert!(s.contents() == model);
}

#[test]
fn block_status_replies_fit_the_request() {
    let s = harness::serve(4 << 20, &[]);
    let mut c = Raw::start(&s.socket, proto::client_flags::KNOWN);
    let id = c.structured();
    c.go("").expect("GO");
    c.write_req(1, 1 << 20, &pattern(65536, 1));
    assert_eq!(c.error_of(1), 0);

    let status = |c: &mut Raw, cookie: u64, flags: u16, offset: u64, len: u32| -> Vec<proto::Descriptor> {
        c.request(cmd::BLOCK_STATUS, flags, cookie, offset, len);
        match c.reply() {
            Reply::Chunk { flags, kind, cookie: got, payload } => {
                assert_eq!(got, cookie);
                assert_eq!(kind, chunk::BLOCK_STATUS, "BLOCK_STATUS answered with chunk {kind}");
                assert_ne!(flags & chunk::FLAG_DONE, 0, "one context, one chunk: it must be the last");
                let (ctx, ds) = proto::decode_block_status(&payload).expect("block status payload");
                assert_eq!(ctx, id, "descriptors for a context we did not select");
                assert!(!ds.is_empty() && ds.iter().all(|d| d.length > 0), "empty descriptor: {ds:?}");
                let sum: u64 = ds.iter().map(|d| u64::from(d.length)).sum();
                assert!(sum <= u64::from(len), "descriptors cover {sum} bytes of a {len}-byte request");
                ds
            }
            other => panic!("BLOCK_STATUS answered with {other:?}"),
        }
    };
    let hole = proto::alloc_flags::HOLE | proto::alloc_flags::ZERO;
    let ds = status(&mut c, 2, 0, 0, 4 << 20);
    assert_eq!((ds[0].length, ds[0].flags), (1 << 20, hole), "{ds:?}");
    assert_eq!((ds[1].length, ds[1].flags & proto::alloc_flags::HOLE), (65536, 0), "{ds:?}");
    let ds = status(&mut c, 3, cmd_flags::REQ_ONE, 0, 4 << 20);
    assert_eq!(ds.len(), 1, "REQ_ONE answered with {} descriptors", ds.len());
    let ds = status(&mut c, 4, 0, (1 << 20) + 100, 1000);
    assert_eq!(ds[0].flags & proto::alloc_flags::HOLE, 0);
    let ds = status(&mut c, 5, 0, (4 << 20) - 1, 1);
    assert_eq!(ds[0].flags, hole);
    c.request(cmd::BLOCK_STATUS, 0, 6, (4 << 20) - 1, 2);
    assert_eq!(c.error_of(6), Errno::Inval as u32);
    assert_eq!(status(&mut c, 7, 0, 0, 512)[0].flags, hole, "stream out of step after an error");
}

#[test]
fn many_connections_and_pipelined_reads_do_not_wedge_the_server() {
    let (s, data) = serve_pattern(&[]);
    // 50 connections at once, each with 100 READs pipelined before any reply is read.
    let mut conns: Vec<Raw> = (0..50).map(|i| Raw::open(&s.socket, i % 2 == 0).0).collect();
    for (n, c) in conns.iter_mut().enumerate() {
        let mut batch = Vec::new();
        for i in 0..100u64 {
            batch.extend_from_slice(
                &Request { flags: 0, kind: cmd::READ, cookie: i, offset: (i * 4096 + n as u64) % (SIZE - 4096), length: 4096 }
                    .encode(),
            );
        }
        c.send(&batch);
    }
    for (n, c) in conns.iter_mut().enumerate() {
        let mut seen = [false; 100];
        for _ in 0..100 {
            // Replies to one connection's reads may come in any order.
            let (cookie, got) = if n % 2 == 0 {
                match c.reply() {
                    Reply::Chunk { flags, kind, cookie, payload } => {
                        assert_eq!((kind, flags & chunk::FLAG_DONE), (chunk::OFFSET_DATA, chunk::FLAG_DONE));
                        (cookie, payload[8..].to_vec())
                    }
                    other => panic!("{other:?}"),
                }
            } else {
                match c.reply() {
                    Reply::Simple { error: 0, cookie } => (cookie, c.read_n(4096)),
                    other => panic!("{other:?}"),
                }
            };
            assert!(!std::mem::replace(&mut seen[cookie as usize], true), "cookie {cookie} answered twice");
            let at = ((cookie * 4096 + n as u64) % (SIZE - 4096)) as usize;
            assert!(got == data[at..at + 4096], "connection {n} cookie {cookie}: wrong bytes");
        }
    }
}

/// A server whose log and stdout cannot be written (their file system full: here `/dev/full`)
/// serves on, with every request answered: a log line that fails is lost, never the request
/// whose line it was (the default `eprintln!` report of a failed log write panicked, and with
/// it the request's task), and the ready line that fails is only a warning.
#[test]
fn a_server_whose_log_cannot_be_written_serves_on() {
    crate::require!("qemu-io");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(4 << 20)).expect("image");
    let socket = dir.path().join("nbd.sock");
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let mut child = std::process::Command::new(harness::tapmirror())
        .arg("serve")
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        // Every request logs, so every request meets the full log.
        .env("RUST_LOG", "trace")
        .stdout(full())
        .stderr(full())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(child.try_wait().expect("try_wait").is_none(), "the server died at start");
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    for round in 0..3 {
        let out = std::process::Command::new("timeout")
            .args(["20", "qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 64k", "-c", "read -P 0x5c 0 64k", "-c", "read 8M 4k", &uri])
            .output()
            .expect("qemu-io");
        // The write and read answered, and the read past the end too (with its error).
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("wrote 65536/65536") && said.contains("read 65536/65536"), "round {round}: {out:?}");
        assert!(said.contains("read failed"), "round {round}: the read past the end got no answer: {out:?}");
    }
    assert!(child.try_wait().expect("try_wait").is_none(), "the server died");
    let _ = child.kill();
    let _ = child.wait();
}
