//! The NBD wire format: constants and pure encode/decode functions.
//!
//! Everything here works on byte slices and owns no I/O, so the server, the client, the property
//! tests and the fuzz target share one codec. Names and numbers follow the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`): fixed newstyle negotiation, `NBD_OPT_GO`/`INFO` with
//! `NBD_INFO_BLOCK_SIZE`, structured replies and the `base:allocation` meta context. All integers
//! are big-endian on the wire.

use std::fmt;

/// `NBDMAGIC`, the first eight bytes a newstyle server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBD_MAGIC` from the server and opens every option from the client.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Follows `NBD_MAGIC` in the old-style greeting, which names the export's size and flags at
/// once and takes no options (what tapdisk's NBD server speaks, and its client expects).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client, 16 bits).
pub mod handshake {
    /// The server speaks fixed newstyle: unknown options get an error reply, not a hang-up.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits): the same two bits, acknowledged.
pub mod client_flags {
    /// The client understands fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this implementation knows; any other bit set makes the server hang up.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (per export, 16 bits).
pub mod tflags {
    /// Always set: the other bits are meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes, trims and zeroes fail with `EPERM`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational disk (never set by us).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported (with `NO_HOLE`).
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads (needs structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA on one connection are visible to every connection of this export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported (never set by us).
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// Old way to pick an export and enter transmission; errors can only hang up.
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS upgrade (not offered).
    pub const STARTTLS: u32 = 5;
    /// Describe an export without entering transmission.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List meta contexts matching queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select meta contexts for `NBD_CMD_BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit headers (not offered).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types. Error types have bit 31 set.
pub mod rep {
    /// The option succeeded (and, for lists, the list is complete).
    pub const ACK: u32 = 1;
    /// One export of an `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One information item of `NBD_OPT_INFO`/`GO`.
    pub const INFO: u32 = 3;
    /// One meta context of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    /// The option is not known or not supported.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// The option's data is malformed or the option is used out of order.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// The client must request block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// The option's data is larger than the server accepts.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types in `NBD_OPT_INFO`/`GO`.
pub mod info {
    /// Size and transmission flags; always sent.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read `length` bytes.
    pub const READ: u16 = 0;
    /// Write `length` bytes that follow the header.
    pub const WRITE: u16 = 1;
    /// Disconnect: no reply.
    pub const DISC: u16 = 2;
    /// Make every replied write durable.
    pub const FLUSH: u16 = 3;
    /// Hint that a range is unused.
    pub const TRIM: u16 = 4;
    /// Prefetch (not offered).
    pub const CACHE: u16 = 5;
    /// Make a range read as zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query the selected meta contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access: the reply means durable.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not deallocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ` must be answered in one chunk.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS` wants one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES` must fail fast with `ENOTSUP` unless zeroing is faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Flag on the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload; used to end a reply.
    pub const NONE: u16 = 0;
    /// u64 offset, then data.
    pub const OFFSET_DATA: u16 = 1;
    /// u64 offset, u32 length of a range that reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// u32 context id, then (u32 length, u32 flags) descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// u32 error, u16 message length, message.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// As `ERROR`, followed by the u64 offset the error concerns.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// `base:allocation` descriptor flags.
pub mod alloc_flags {
    /// The range is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The only meta context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values of transmission replies (the protocol's fixed list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument (bad range, unknown command or flag).
    Inval = 22,
    /// No space left (write past the end, out of space).
    NoSpc = 28,
    /// Value too large (length over the maximum).
    Overflow = 75,
    /// Not supported (fast zero refused).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// Maps a wire value back; unknown values are treated as `EINVAL`, as the spec advises.
    pub fn from_wire(v: u32) -> Errno {
        match v {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// The protocol's name for the error.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option header from the client (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flags`).
    pub flags: u16,
    /// Command type (`cmd`).
    pub kind: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length; for `WRITE` also the payload length.
    pub length: u32,
}

/// Why a byte sequence is not a valid message. Any of these desynchronises the stream, so the
/// connection that sent it is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The magic number is not the one this message must start with.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// What arrived.
        found: u64,
        /// What the protocol requires here.
        expected: u64,
    },
    /// The message is shorter than its fixed part or than a length it declares.
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A field has a value the protocol forbids here.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        Err(WireError::Truncated { need: n, have: b.len() })
    } else {
        Ok(())
    }
}

impl Request {
    /// Encodes the 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a 28-byte header.
    pub fn decode(b: &[u8]) -> Result<Request, WireError> {
        need(b, REQUEST_LEN)?;
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic { found: magic.into(), expected: REQUEST_MAGIC.into() });
        }
        Ok(Request {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured chunk header; `length` is the payload length that follows.
pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// The fixed part of any reply, told apart by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes).
    Simple {
        /// Error value, 0 for success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk header (20 bytes).
    Chunk {
        /// Chunk flags (`chunk::FLAG_DONE`).
        flags: u16,
        /// Chunk type (`chunk`).
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Decodes the magic (first 4 bytes) to learn how long the header is.
    pub fn header_len(magic: u32) -> Result<usize, WireError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
            other => Err(WireError::BadMagic { found: other.into(), expected: SIMPLE_REPLY_MAGIC.into() }),
        }
    }

    /// Decodes a whole header (16 or 20 bytes, as `header_len` said).
    pub fn decode(b: &[u8]) -> Result<ReplyHeader, WireError> {
        need(b, 4)?;
        let magic = be_u32(b, 0);
        let len = Self::header_len(magic)?;
        need(b, len)?;
        Ok(if magic == SIMPLE_REPLY_MAGIC {
            ReplyHeader::Simple { error: be_u32(b, 4), cookie: be_u64(b, 8) }
        } else {
            ReplyHeader::Chunk { flags: be_u16(b, 4), kind: be_u16(b, 6), cookie: be_u64(b, 8), length: be_u32(b, 16) }
        })
    }
}

/// One `base:allocation` (or any context's) descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Length of the run in bytes.
    pub length: u32,
    /// Context-defined flags (`alloc_flags` for `base:allocation`).
    pub flags: u32,
}

/// Encodes a `BLOCK_STATUS` chunk payload.
pub fn encode_block_status(context_id: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * descriptors.len());
    v.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        v.extend_from_slice(&d.length.to_be_bytes());
        v.extend_from_slice(&d.flags.to_be_bytes());
    }
    v
}

/// Decodes a `BLOCK_STATUS` chunk payload into its context id and descriptors.
pub fn decode_block_status(b: &[u8]) -> Result<(u32, Vec<Descriptor>), WireError> {
    need(b, 4)?;
    if !(b.len() - 4).is_multiple_of(8) || b.len() < 12 {
        return Err(WireError::Invalid("block status payload length"));
    }
    let id = be_u32(b, 0);
    let descriptors = b[4..]
        .chunks_exact(8)
        .map(|c| Descriptor { length: be_u32(c, 0), flags: be_u32(c, 4) })
        .collect();
    Ok((id, descriptors))
}

/// Encodes an `ERROR` chunk payload (error value, message).
pub fn encode_error_payload(error: Errno, message: &str) -> Vec<u8> {
    let msg = truncate_str(message, 4096);
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&(error as u32).to_be_bytes());
    // The message is at most 4096 bytes, so it fits the 16-bit length.
    v.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// Decodes an `ERROR`/`ERROR_OFFSET` chunk payload into the error value and message.
pub fn decode_error_payload(b: &[u8]) -> Result<(u32, String), WireError> {
    need(b, 6)?;
    let err = be_u32(b, 0);
    let len = usize::from(be_u16(b, 4));
    need(b, 6 + len)?;
    Ok((err, String::from_utf8_lossy(&b[6..6 + len]).into_owned()))
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes an option header sent by a client.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    // Callers never build options of 4 GiB; saturate rather than wrap if one did.
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Encodes an option reply (header and data).
pub fn encode_option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The header of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option it answers.
    pub option: u32,
    /// Reply type (`rep`).
    pub kind: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes the 20-byte header.
    pub fn decode(b: &[u8]) -> Result<OptionReplyHeader, WireError> {
        need(b, OPTION_REPLY_HEADER_LEN)?;
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic { found: magic, expected: OPTION_REPLY_MAGIC });
        }
        Ok(OptionReplyHeader { option: be_u32(b, 8), kind: be_u32(b, 12), length: be_u32(b, 16) })
    }
}

/// The header of an option sent by a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`opt`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header.
    pub fn decode(b: &[u8]) -> Result<OptionHeader, WireError> {
        need(b, OPTION_HEADER_LEN)?;
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic { found: magic, expected: IHAVEOPT });
        }
        Ok(OptionHeader { option: be_u32(b, 8), length: be_u32(b, 12) })
    }
}

/// Longest string (export name, context query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export ("" is the default export).
    pub name: String,
    /// Information types requested (`info`).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string32(&mut v, &self.name);
        v.extend_from_slice(&u16::try_from(self.requests.len()).unwrap_or(u16::MAX).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    /// Decodes the option data; the lengths inside must match the data exactly.
    pub fn decode(b: &[u8]) -> Result<InfoRequest, WireError> {
        let (name, rest) = take_string32(b)?;
        need(rest, 2)?;
        let n = usize::from(be_u16(rest, 0));
        let rest = &rest[2..];
        if rest.len() != 2 * n {
            return Err(WireError::Invalid("information request count"));
        }
        let requests = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
        Ok(InfoRequest { name, requests })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Context names or query prefixes.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string32(&mut v, &self.export);
        v.extend_from_slice(&u32::try_from(self.queries.len()).unwrap_or(u32::MAX).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut v, q);
        }
        v
    }

    /// Decodes the option data; the lengths inside must match the data exactly.
    pub fn decode(b: &[u8]) -> Result<MetaContextRequest, WireError> {
        let (export, rest) = take_string32(b)?;
        need(rest, 4)?;
        let n = be_u32(rest, 0);
        let mut rest = &rest[4..];
        // Each query takes at least 4 bytes; this bounds the allocation by the data we hold.
        if u64::from(n) * 4 > rest.len() as u64 {
            return Err(WireError::Invalid("meta context query count"));
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (q, r) = take_string32(rest)?;
            queries.push(q);
            rest = r;
        }
        if !rest.is_empty() {
            return Err(WireError::Invalid("trailing bytes in meta context request"));
        }
        Ok(MetaContextRequest { export, queries })
    }
}

fn put_string32(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

fn take_string32(b: &[u8]) -> Result<(String, &[u8]), WireError> {
    need(b, 4)?;
    let len = be_u32(b, 0) as usize;
    if len > MAX_STRING {
        return Err(WireError::Invalid("string longer than 4096 bytes"));
    }
    need(b, 4 + len)?;
    let s = std::str::from_utf8(&b[4..4 + len]).map_err(|_| WireError::Invalid("string is not UTF-8"))?;
    if s.contains('\0') {
        return Err(WireError::Invalid("string contains NUL"));
    }
    Ok((s.to_owned(), &b[4 + len..]))
}

/// Encodes the `NBD_INFO_EXPORT` item: size and transmission flags.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest request granularity.
    pub minimum: u32,
    /// Preferred granularity.
    pub preferred: u32,
    /// Largest payload.
    pub maximum: u32,
}

impl BlockSize {
    /// Encodes the `NBD_INFO_BLOCK_SIZE` item.
    pub fn encode_info(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(14);
        v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        v.extend_from_slice(&self.minimum.to_be_bytes());
        v.extend_from_slice(&self.preferred.to_be_bytes());
        v.extend_from_slice(&self.maximum.to_be_bytes());
        v
    }
}

/// An information item received by a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoItem {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Canonical name.
    Name(String),
    /// Description.
    Description(String),
    /// Block size constraints.
    BlockSize(BlockSize),
    /// An item type this implementation does not know (ignored, as the spec allows).
    Unknown(u16),
}

impl InfoItem {
    /// Decodes the data of an `NBD_REP_INFO` reply.
    pub fn decode(b: &[u8]) -> Result<InfoItem, WireError> {
        need(b, 2)?;
        let kind = be_u16(b, 0);
        let body = &b[2..];
        Ok(match kind {
            info::EXPORT => {
                if body.len() != 10 {
                    return Err(WireError::Invalid("NBD_INFO_EXPORT length"));
                }
                InfoItem::Export { size: be_u64(body, 0), flags: be_u16(body, 8) }
            }
            info::NAME => InfoItem::Name(String::from_utf8_lossy(body).into_owned()),
            info::DESCRIPTION => InfoItem::Description(String::from_utf8_lossy(body).into_owned()),
            info::BLOCK_SIZE => {
                if body.len() != 12 {
                    return Err(WireError::Invalid("NBD_INFO_BLOCK_SIZE length"));
                }
                InfoItem::BlockSize(BlockSize {
                    minimum: be_u32(body, 0),
                    preferred: be_u32(body, 4),
                    maximum: be_u32(body, 8),
                })
            }
            other => InfoItem::Unknown(other),
        })
    }
}

/// Encodes the data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Decodes the data of an `NBD_REP_META_CONTEXT` reply.
pub fn decode_meta_context_reply(b: &[u8]) -> Result<(u32, String), WireError> {
    need(b, 4)?;
    Ok((be_u32(b, 0), String::from_utf8_lossy(&b[4..]).into_owned()))
}

/// Encodes the data of an `NBD_REP_SERVER` reply (one export of a list).
pub fn encode_server_reply(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    put_string32(&mut v, name);
    v
}

/// Decodes the data of an `NBD_REP_SERVER` reply into the export name.
pub fn decode_server_reply(b: &[u8]) -> Result<String, WireError> {
    need(b, 4)?;
    let len = be_u32(b, 0) as usize;
    need(b, 4 + len)?;
    Ok(String::from_utf8_lossy(&b[4..4 + len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn request_with_wrong_magic_is_rejected(mut bytes in proptest::collection::vec(any::<u8>(), 28)) {
            prop_assume!(bytes[0..4] != REQUEST_MAGIC.to_be_bytes());
            let is_bad_magic = matches!(Request::decode(&bytes), Err(WireError::BadMagic { .. }));
            prop_assert!(is_bad_magic);
            bytes.truncate(27);
            let truncated = matches!(Request::decode(&bytes), Err(WireError::Truncated { .. }));
            prop_assert!(truncated);
        }

        #[test]
        fn simple_reply_round_trips(error: u32, cookie: u64) {
            let b = encode_simple_reply(error, cookie);
            prop_assert_eq!(ReplyHeader::decode(&b), Ok(ReplyHeader::Simple { error, cookie }));
        }

        #[test]
        fn chunk_header_round_trips(flags: u16, kind: u16, cookie: u64, length: u32) {
            let b = encode_chunk_header(flags, kind, cookie, length);
            prop_assert_eq!(ReplyHeader::decode(&b), Ok(ReplyHeader::Chunk { flags, kind, cookie, length }));
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9/._-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn meta_context_request_round_trips(export in "[a-z0-9]{0,16}", queries in proptest::collection::vec("[a-z:]{0,24}", 0..6)) {
            let r = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn block_status_round_trips(id: u32, ds in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..32)) {
            let ds: Vec<Descriptor> = ds.into_iter().map(|(length, flags)| Descriptor { length, flags }).collect();
            prop_assert_eq!(decode_block_status(&encode_block_status(id, &ds)), Ok((id, ds)));
        }

        #[test]
        fn error_payload_round_trips(msg in ".{0,200}") {
            let (err, m) = decode_error_payload(&encode_error_payload(Errno::NoSpc, &msg)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(err, 28);
            prop_assert_eq!(m, msg);
        }

        /// Arbitrary bytes never panic the option-data decoders, and whatever they accept
        /// re-encodes to exactly the bytes given (the lengths inside must match the data).
        #[test]
        fn option_decoders_are_total_and_exact(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            if let Ok(r) = InfoRequest::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes.clone());
            }
            if let Ok(r) = MetaContextRequest::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes.clone());
            }
            let _ = decode_block_status(&bytes);
            let _ = decode_error_payload(&bytes);
            let _ = InfoItem::decode(&bytes);
        }
    }

    #[test]
    fn meta_context_count_larger_than_data_is_invalid_not_an_allocation() {
        // Export "" and a claimed 4 billion queries in 8 bytes of data.
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::decode(&b), Err(WireError::Invalid("meta context query count")));
    }

    #[test]
    fn export_name_over_4096_bytes_is_invalid() {
        let r = InfoRequest { name: "x".repeat(4097), requests: vec![] };
        assert_eq!(InfoRequest::decode(&r.encode()), Err(WireError::Invalid("string longer than 4096 bytes")));
    }

    #[test]
    fn known_magic_values_spell_the_protocol_words() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
