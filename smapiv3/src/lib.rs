//! sxm-smapiv3: the `qcow2` SR, SMAPIv3 style.
//!
//! This crate will own the `qcow2` storage repository, one qcow2 volume per VDI, and its
//! migration procedure (one full mirror into a single destination volume: dirty bitmap, background
//! copy and synchronous guest writes, with no snapshot or compose). It implements the engine's
//! `Backend` trait and drives `tapmirror` datapaths.
