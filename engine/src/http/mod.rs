//! The host's HTTP face: xapi's `/services/SM` (XML-RPC) and `/jsonrpc` (JSON-RPC 1.0 and 2.0)
//! on TCP and on a Unix socket, and the client other hosts and the CLI use to call it.
//!
//! - [`server`]: the routes, the secret check on TCP, the Unix socket's housekeeping, and the
//!   accept loop that sends xapi's NBD `PUT`s to an [`NbdHandover`] and the rest to the router.
//! - [`nbd`]: those `PUT`s, which turn their connection into an NBD connection.
//! - [`client`]: [`Endpoint`] and [`RpcClient`], over TCP or a Unix socket, and
//!   [`connect_nbd`], which opens an NBD connection with such a `PUT`.
//! - [`envelope`]: the call and reply envelopes both share, including the JSON-RPC 2.0 error
//!   object xapi writes.
//! - [`tls`]: HTTPS (xapi's default between hosts): the server's certificate, the client's
//!   trust, and the relay that hands a TLS connection's plaintext to a datapath.

use std::future::Future;

use crate::model::StorageError;
use crate::rpc::Value;

pub mod client;
pub mod envelope;
pub mod nbd;
pub mod server;
pub mod tls;

pub use client::{CallError, CallErrorKind, Endpoint, EndpointError, RpcClient, connect_nbd};
pub use envelope::JsonVersion;
pub use nbd::{HandoverError, NbdHandover, NbdKind, NbdRequest};
pub use server::{Bound, Running, ServeError, ServerConfig, Transport, router, serve, serve_with};

/// What the server runs for each call. The mux implements it; the server only decodes the
/// envelope, authenticates, and encodes the answer in the caller's own encoding and version.
pub trait Dispatch: Send + Sync + 'static {
    /// Runs `method` with its parameters (xapi sends one struct of named arguments) and answers
    /// its result, or the storage error to send back.
    fn dispatch(&self, method: String, params: Vec<Value>) -> impl Future<Output = Result<Value, StorageError>> + Send;
}
