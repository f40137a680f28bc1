//! The storage interface's wire formats: one value tree, carried as XML-RPC (between hosts, as
//! xapi sends it to `/services/SM`) or as JSON-RPC (xapi to its storage plugins, and our CLI).
//!
//! Reference: `../shared/research/xapi-sxm.md` §1 (ocaml-rpc's `Rpc.t` and `Rpcmarshal`). The
//! tree is the same in both encodings; typed calls and results are decoded from it.

pub mod json;
pub mod marshal;
pub mod value;
pub mod xmlrpc;

pub use value::Value;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The XML is not well formed, or not the XML-RPC shape expected here.
    #[error("malformed XML-RPC at byte {at}: {what}")]
    Xml {
        /// Byte offset of the problem.
        at: usize,
        /// What was expected or found.
        what: String,
    },
    /// The JSON does not have the JSON-RPC shape expected here.
    #[error("malformed JSON-RPC: {0}")]
    Json(String),
}
