//! The Network Block Device protocol: wire codec, server and client, and the Unix sockets they
//! share (`unix`: split so that neither end wakes for nothing).
//!
//! Fixed newstyle negotiation with `NBD_OPT_GO`/`INFO` (block sizes), structured replies and the
//! `base:allocation` meta context; commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`
//! (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` and `DISC`, with `FUA`. Reference: the protocol
//! document of NetworkBlockDevice/nbd, `doc/proto.md`.

pub mod client;
pub mod proto;
pub mod server;
pub mod unix;

pub use client::{ClientError, ClientOptions, Endpoint, ExportInfo, NbdClient, NbdUri, Payload, StatusExtent};
pub use server::{ExportConfig, Limits, NbdServer, Session};
