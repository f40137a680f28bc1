//! The storage interface's types, decoded from and encoded to the value tree
//! (`../shared/research/xapi-sxm.md` §1.3 and §3), and the calls this host serves.

pub mod call;
pub mod error;
pub mod types;

pub use call::Call;
pub use error::{Rw, StorageError, VdiState};
pub use types::*;
