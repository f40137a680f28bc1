//! Datapaths: one `tapmirror serve` per attached VDI. Not built yet: every datapath call answers
//! `Unimplemented`, and no VDI is ever attached.

use std::path::{Path, PathBuf};

use sxm_engine::backend::{AttachedVdi, SrContext, StorageResult};
use sxm_engine::model::{AttachInfo, Rw, StorageError};

/// The SR's datapath processes.
pub struct Datapaths {
    #[allow(dead_code)]
    exe: PathBuf,
}

fn unimplemented<T>(what: &str) -> StorageResult<T> {
    Err(StorageError::Unimplemented(what.to_owned()))
}

impl Datapaths {
    pub fn new(exe: PathBuf) -> Datapaths {
        Datapaths { exe }
    }

    pub fn attach(&self, _sr: &SrContext, _vdi: &str, _image: &Path, _rw: Rw) -> StorageResult<AttachInfo> {
        unimplemented("VDI.attach")
    }

    pub fn activate(&self, _sr: &SrContext, _vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.activate")
    }

    pub fn deactivate(&self, _sr: &SrContext, _vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.deactivate")
    }

    pub fn detach(&self, _sr: &SrContext, _vdi: &str) -> StorageResult<()> {
        unimplemented("VDI.detach")
    }

    pub fn attach_info(&self, _sr: &SrContext, _vdi: &str) -> StorageResult<AttachInfo> {
        unimplemented("DP.attach_info")
    }

    pub fn attached(&self, _sr: &SrContext) -> Vec<String> {
        Vec::new()
    }

    pub fn is_attached(&self, _sr: &SrContext, _vdi: &str) -> bool {
        false
    }

    pub fn forget(&self, _sr: &SrContext) {}

    pub fn with_quiesced<T>(&self, _sr: &SrContext, _vdi: &str, _op: &str, f: impl FnOnce() -> StorageResult<T>) -> StorageResult<T> {
        f()
    }

    pub fn recover(
        &self,
        _sr: &SrContext,
        _datapaths: &[AttachedVdi],
        _image_of: &dyn Fn(&str) -> StorageResult<(PathBuf, bool)>,
    ) -> StorageResult<()> {
        Ok(())
    }
}
