//! sxm-engine: the control plane of an sxm host.
//!
//! It owns xapi's storage interface (SMAPIv2) as a host serves it: the wire, the typed model,
//! the mux that routes `SR.*`, `VDI.*` and `DP.*` calls by SR type, datapath states, tasks and
//! persisted state. It names no backend and uses nothing else of ours: the `sxm` binary
//! registers the backends (see `../shared/DESIGN.md`, "Layout").
//!
//! Modules, from the wire inwards:
//!
//! - [`rpc`]: the value tree, its XML-RPC and JSON encodings, and typed marshalling;
//! - [`http`]: the server (`/services/SM`, `/jsonrpc`, on TCP with the host secret and on a
//!   Unix socket) and the client other hosts and the CLI use;
//! - [`model`]: the interface's records, variants, errors, and every call typed;
//! - [`mux`]: routes each call to the backend of the SR it names; keeps [`srs`] (the SR
//!   registry), [`datapaths`] (which VDI each datapath holds) and [`tasks`] (tasks, updates);
//! - [`migrate`]: the staged live migration (`DATA.*`) on both sides, with rollback and
//!   recovery, and jobs moving a VM's disks together;
//! - [`backend`]: the trait an SR type implements;
//! - [`state`]: atomic, durable records on disk;
//! - [`fault`]: named fault points the end-to-end tests use to break each stage.

pub mod backend;
pub mod datapaths;
pub mod fault;
pub mod http;
pub mod migrate;
pub mod model;
pub mod mux;
pub mod rpc;
pub mod srs;
pub mod state;
pub mod tasks;
