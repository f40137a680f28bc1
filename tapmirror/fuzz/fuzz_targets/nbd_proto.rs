//! Fuzzes the pure NBD wire codec (`tapmirror::nbd::proto`): every decoder gets the same
//! arbitrary bytes, must not panic, must fail with the error its contract names, and whatever it
//! accepts must re-encode, through the matching encoder, to exactly the bytes it consumed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tapmirror::nbd::proto::{
    self, CHUNK_HEADER_LEN, Errno, IHAVEOPT, InfoItem, InfoRequest, MAX_STRING, MetaContextRequest, OPTION_HEADER_LEN,
    OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OptionHeader, OptionReplyHeader, REQUEST_LEN, REQUEST_MAGIC,
    ReplyHeader, Request, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, WireError,
};

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn is_truncated(r: &Result<impl Sized, WireError>) -> bool {
    matches!(r, Err(WireError::Truncated { .. }))
}

fn is_bad_magic(r: &Result<impl Sized, WireError>) -> bool {
    matches!(r, Err(WireError::BadMagic { .. }))
}

fn request(b: &[u8]) {
    let r = Request::decode(b);
    if b.len() < REQUEST_LEN {
        assert!(is_truncated(&r), "short request: {r:?}");
        return;
    }
    if be_u32(b, 0) != REQUEST_MAGIC {
        assert!(is_bad_magic(&r), "request with wrong magic: {r:?}");
        return;
    }
    let req = r.expect("28 bytes with the request magic decode");
    assert_eq!(req.encode(), b[..REQUEST_LEN], "request re-encodes differently");
}

fn reply_header(b: &[u8]) {
    let r = ReplyHeader::decode(b);
    if b.len() < 4 {
        assert!(is_truncated(&r), "short reply header: {r:?}");
        return;
    }
    let magic = be_u32(b, 0);
    let want_len = match magic {
        SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
        STRUCTURED_REPLY_MAGIC => CHUNK_HEADER_LEN,
        _ => {
            assert!(is_bad_magic(&r), "reply with wrong magic: {r:?}");
            assert!(ReplyHeader::header_len(magic).is_err());
            return;
        }
    };
    assert_eq!(ReplyHeader::header_len(magic), Ok(want_len));
    if b.len() < want_len {
        assert!(is_truncated(&r), "short reply header: {r:?}");
        return;
    }
    match r.expect("a whole reply header decodes") {
        ReplyHeader::Simple { error, cookie } => {
            assert_eq!(magic, SIMPLE_REPLY_MAGIC);
            assert_eq!(proto::encode_simple_reply(error, cookie), b[..SIMPLE_REPLY_LEN]);
        }
        ReplyHeader::Chunk { flags, kind, cookie, length } => {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            assert_eq!(proto::encode_chunk_header(flags, kind, cookie, length), b[..CHUNK_HEADER_LEN]);
        }
    }
}

fn option_header(b: &[u8]) {
    let r = OptionHeader::decode(b);
    if b.len() < OPTION_HEADER_LEN {
        assert!(is_truncated(&r), "short option header: {r:?}");
        return;
    }
    if be_u64(b, 0) != IHAVEOPT {
        assert!(is_bad_magic(&r), "option with wrong magic: {r:?}");
        return;
    }
    let h = r.expect("16 bytes with IHAVEOPT decode");
    assert_eq!(h.option, be_u32(b, 8));
    assert_eq!(h.length, be_u32(b, 12));
    // When the declared data is all present, header and data re-encode to the same bytes.
    let end = OPTION_HEADER_LEN as u64 + u64::from(h.length);
    if end <= b.len() as u64 {
        let end = end as usize;
        assert_eq!(
            proto::encode_option(h.option, &b[OPTION_HEADER_LEN..end]),
            b[..end],
            "option re-encodes differently"
        );
    }
}

fn option_reply_header(b: &[u8]) {
    let r = OptionReplyHeader::decode(b);
    if b.len() < OPTION_REPLY_HEADER_LEN {
        assert!(is_truncated(&r), "short option reply header: {r:?}");
        return;
    }
    if be_u64(b, 0) != OPTION_REPLY_MAGIC {
        assert!(is_bad_magic(&r), "option reply with wrong magic: {r:?}");
        return;
    }
    let h = r.expect("20 bytes with the option reply magic decode");
    let end = OPTION_REPLY_HEADER_LEN as u64 + u64::from(h.length);
    if end <= b.len() as u64 {
        let end = end as usize;
        assert_eq!(
            proto::encode_option_reply(h.option, h.kind, &b[OPTION_REPLY_HEADER_LEN..end]),
            b[..end],
            "option reply re-encodes differently"
        );
    }
}

fn info_request(b: &[u8]) {
    if let Ok(r) = InfoRequest::decode(b) {
        assert!(r.name.len() <= MAX_STRING && !r.name.contains('\0'));
        assert_eq!(r.encode(), b, "info request re-encodes differently");
    }
}

fn meta_context_request(b: &[u8]) {
    if let Ok(r) = MetaContextRequest::decode(b) {
        for s in std::iter::once(&r.export).chain(&r.queries) {
            assert!(s.len() <= MAX_STRING && !s.contains('\0'));
        }
        // Each query is at least its 4-byte length: the count is bounded by the data.
        assert!(r.queries.len() * 4 <= b.len());
        assert_eq!(r.encode(), b, "meta context request re-encodes differently");
    }
}

fn block_status(b: &[u8]) {
    let r = proto::decode_block_status(b);
    if b.len() < 4 {
        assert!(is_truncated(&r), "short block status: {r:?}");
        return;
    }
    match r {
        Ok((id, ds)) => {
            assert!(!ds.is_empty(), "block status with no descriptor accepted");
            assert_eq!(proto::encode_block_status(id, &ds), b, "block status re-encodes differently");
        }
        Err(e) => {
            let well_formed = b.len() >= 12 && (b.len() - 4).is_multiple_of(8);
            assert!(!well_formed, "well-formed block status refused: {e}");
        }
    }
}

fn error_payload(b: &[u8]) {
    let r = proto::decode_error_payload(b);
    let declared = if b.len() >= 6 { Some(6 + usize::from(be_u16(b, 4))) } else { None };
    let Some(end) = declared.filter(|&end| end <= b.len()) else {
        assert!(is_truncated(&r), "short error payload: {r:?}");
        return;
    };
    let (err, msg) = r.expect("a whole error payload decodes");
    assert_eq!(err, be_u32(b, 0));
    let raw = &b[6..end];
    assert_eq!(msg, String::from_utf8_lossy(raw));
    // The encoder takes an `Errno` and a `&str` of at most 4096 bytes: exact when both fit.
    let errno = Errno::from_wire(err);
    if errno as u32 == err && std::str::from_utf8(raw).is_ok() && raw.len() <= 4096 {
        assert_eq!(proto::encode_error_payload(errno, &msg), b[..end], "error payload re-encodes differently");
    }
}

fn info_item(b: &[u8]) {
    let r = InfoItem::decode(b);
    if b.len() < 2 {
        assert!(is_truncated(&r), "short info item: {r:?}");
        return;
    }
    let kind = be_u16(b, 0);
    let body = &b[2..];
    match r {
        Ok(InfoItem::Export { size, flags }) => {
            assert_eq!(kind, proto::info::EXPORT);
            assert_eq!(proto::encode_info_export(size, flags), b, "NBD_INFO_EXPORT re-encodes differently");
        }
        Ok(InfoItem::BlockSize(bs)) => {
            assert_eq!(kind, proto::info::BLOCK_SIZE);
            assert_eq!(bs.encode_info(), b, "NBD_INFO_BLOCK_SIZE re-encodes differently");
        }
        // The server builds these inline: type, then the string's bytes.
        Ok(InfoItem::Name(s)) => {
            assert_eq!(kind, proto::info::NAME);
            assert_eq!(s, String::from_utf8_lossy(body));
        }
        Ok(InfoItem::Description(s)) => {
            assert_eq!(kind, proto::info::DESCRIPTION);
            assert_eq!(s, String::from_utf8_lossy(body));
        }
        Ok(InfoItem::Unknown(k)) => {
            assert_eq!(k, kind);
            assert!(k > proto::info::BLOCK_SIZE, "known info type {k} decoded as unknown");
        }
        Err(e) => {
            let refusable = (kind == proto::info::EXPORT && body.len() != 10)
                || (kind == proto::info::BLOCK_SIZE && body.len() != 12);
            assert!(refusable, "info item type {kind} with {} bytes refused: {e}", body.len());
        }
    }
}

fn meta_context_reply(b: &[u8]) {
    match proto::decode_meta_context_reply(b) {
        Ok((id, name)) => {
            assert_eq!(id, be_u32(b, 0));
            if std::str::from_utf8(&b[4..]).is_ok() {
                assert_eq!(proto::encode_meta_context_reply(id, &name), b, "meta context reply re-encodes differently");
            }
        }
        Err(e) => assert!(b.len() < 4, "meta context reply of {} bytes refused: {e}", b.len()),
    }
}

fn server_reply(b: &[u8]) {
    match proto::decode_server_reply(b) {
        Ok(name) => {
            let end = 4 + be_u32(b, 0) as usize;
            if std::str::from_utf8(&b[4..end]).is_ok() {
                assert_eq!(proto::encode_server_reply(&name), b[..end], "server reply re-encodes differently");
            }
        }
        Err(e) => {
            let whole = b.len() >= 4 && 4 + be_u32(b, 0) as u64 <= b.len() as u64;
            assert!(!whole, "whole server reply refused: {e}");
        }
    }
}

fn errno(b: &[u8]) {
    if b.len() >= 4 {
        let v = be_u32(b, 0);
        let e = Errno::from_wire(v);
        // Known values map back to themselves; anything else is EINVAL.
        assert!(e as u32 == v || e == Errno::Inval);
        assert_eq!(Errno::from_wire(e as u32), e);
        assert!(!e.name().is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    request(data);
    reply_header(data);
    option_header(data);
    option_reply_header(data);
    info_request(data);
    meta_context_request(data);
    block_status(data);
    error_payload(data);
    info_item(data);
    meta_context_reply(data);
    server_reply(data);
    errno(data);
});
