//! The storage interface's types, decoded from and encoded to the value tree
//! (`../shared/research/xapi-sxm.md` §1.3 and §3).

pub mod error;

pub use error::{Rw, StorageError, VdiState};
