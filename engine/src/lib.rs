//! sxm-engine: the control plane of an sxm host.
//!
//! This crate will own the storage interface's model (`vdi_info`, `Mirror.t`, task records and
//! the `Storage_error` variants with their exact wire tags), the `Backend` trait that each SR type
//! implements, the mux that routes `SR.*`, `VDI.*` and `DP.*` calls by SR type, the staged
//! migration with rollback, persisted state, tasks, the JSON-RPC and XML-RPC codecs, and the HTTP
//! server and client. It names no backend and uses nothing else of ours: the `sxm` binary
//! registers the backends (see `../shared/DESIGN.md`, "Layout").
//!
//! Built so far: [`rpc`], the value tree and its XML-RPC and JSON encodings, and [`model`]'s
//! storage errors, checked against xapi's recorded wire vectors.

pub mod backend;
pub mod datapaths;
pub mod http;
pub mod model;
pub mod mux;
pub mod rpc;
pub mod srs;
pub mod state;
pub mod tasks;
