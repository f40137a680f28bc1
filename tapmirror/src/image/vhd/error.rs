//! Errors of the VHD driver: one enum, a stable [`VhdErrorKind`] to match on, and the path of
//! the file concerned in every variant.

use std::io;
use std::path::{Path, PathBuf};

use crate::image::ImageError;

/// What kind of failure a [`VhdError`] is, for callers that act on it (the CLI's exit codes, the
/// SR backend deciding between "repair", "find the parent" and "retry").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VhdErrorKind {
    /// The file is not a valid VHD, or its metadata contradicts itself.
    Corrupt,
    /// A differencing disk's parent cannot be found, or the file found is not the parent.
    MissingParent,
    /// The operating system refused an operation.
    Io,
    /// The caller asked for something impossible (bad size, existing target, shrink...).
    InvalidArgument,
    /// A valid VHD we do not handle (fixed disks, raw parents).
    Unsupported,
    /// Another process holds the file open for writing.
    Busy,
}

/// Why a VHD operation failed. Messages name the file; the OS error, when there is one, is the
/// `source` and is not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// See [`VhdErrorKind::Corrupt`].
    #[error("{}: corrupt VHD: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The first problem found.
        reason: String,
    },
    /// See [`VhdErrorKind::MissingParent`].
    #[error("{}: {reason}", path.display())]
    MissingParent {
        /// The child whose parent is missing.
        path: PathBuf,
        /// What was looked for and where.
        reason: String,
    },
    /// See [`VhdErrorKind::Io`].
    #[error("{}: {op}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// See [`VhdErrorKind::InvalidArgument`].
    #[error("{}: {reason}", path.display())]
    InvalidArgument {
        /// The file.
        path: PathBuf,
        /// What is wrong with the request.
        reason: String,
    },
    /// See [`VhdErrorKind::Unsupported`].
    #[error("{}: unsupported VHD: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },
    /// See [`VhdErrorKind::Busy`].
    #[error("{}: in use by another writer", path.display())]
    Busy {
        /// The file.
        path: PathBuf,
    },
}

impl VhdError {
    /// The kind, to match on.
    pub fn kind(&self) -> VhdErrorKind {
        match self {
            VhdError::Corrupt { .. } => VhdErrorKind::Corrupt,
            VhdError::MissingParent { .. } => VhdErrorKind::MissingParent,
            VhdError::Io { .. } => VhdErrorKind::Io,
            VhdError::InvalidArgument { .. } => VhdErrorKind::InvalidArgument,
            VhdError::Unsupported { .. } => VhdErrorKind::Unsupported,
            VhdError::Busy { .. } => VhdErrorKind::Busy,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            VhdError::Corrupt { path, .. }
            | VhdError::MissingParent { path, .. }
            | VhdError::Io { path, .. }
            | VhdError::InvalidArgument { path, .. }
            | VhdError::Unsupported { path, .. }
            | VhdError::Busy { path } => path,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> VhdError {
        VhdError::Corrupt { path: path.to_owned(), reason: reason.into() }
    }

    pub(crate) fn io(path: &Path, op: impl Into<String>, source: io::Error) -> VhdError {
        VhdError::Io { path: path.to_owned(), op: op.into(), source }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> VhdError {
        VhdError::InvalidArgument { path: path.to_owned(), reason: reason.into() }
    }

    pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> VhdError {
        VhdError::Unsupported { path: path.to_owned(), reason: reason.into() }
    }

    pub(crate) fn missing_parent(path: &Path, reason: impl Into<String>) -> VhdError {
        VhdError::MissingParent { path: path.to_owned(), reason: reason.into() }
    }

    /// The error as an [`ImageError`] for the `Image` trait: OS errors keep their errno, anything
    /// else becomes `EIO`-like `InvalidData` carrying this error.
    pub fn into_image_error(self, op: &'static str, offset: u64) -> ImageError {
        let source = match self {
            VhdError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        };
        ImageError::Io { op, offset, source }
    }
}

/// Result of VHD operations.
pub type Result<T> = std::result::Result<T, VhdError>;
