//! sxm-smapiv1: the `ext` SR, SMAPIv1 style.
//!
//! This crate will own the `ext` storage repository, one VHD file per VDI (dynamic or
//! differencing) in the SR's folder, with its metadata persisted atomically, and its migration
//! procedure (leaf, dummy snapshot, copied parent, compose). It implements the engine's `Backend`
//! trait and drives `tapmirror` datapaths; it knows nothing of RPC encodings.
